"""The official ERNIE-4.5 chat template, used when a checkpoint's tokenizer has none.

Registered as vLLM's chat-template fallback for the model type ``ernie4_5_moe``: ``LLM.chat`` and
``vllm serve``'s ``/v1/chat/completions`` use it only when neither ``--chat-template`` nor the
tokenizer provides one (Baidu's hub tokenizer config may lack it).
"""

from pathlib import Path

from vllm.logger import init_logger

logger = init_logger(f"vllm.{__name__}")  # under "vllm.": vLLM's log handler shows it

CHAT_TEMPLATE_PATH = Path(__file__).with_name("chat_template.jinja")
ERNIE_MOE_MODEL_TYPE = "ernie4_5_moe"


def official_chat_template(tokenizer_name_or_path: str) -> Path:
    logger.info_once(
        "vllm-ernie-moe: the tokenizer of %s has no chat template; using the official ERNIE-4.5 "
        "template %s.",
        tokenizer_name_or_path,
        CHAT_TEMPLATE_PATH,
    )
    return CHAT_TEMPLATE_PATH


def register_chat_template() -> None:
    from vllm.transformers_utils.chat_templates.registry import (
        register_chat_template_fallback_path,
    )

    register_chat_template_fallback_path(ERNIE_MOE_MODEL_TYPE, official_chat_template)
