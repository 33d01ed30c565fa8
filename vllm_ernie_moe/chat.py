"""The official ERNIE-4.5 chat template, shipped with the package for tokenizers that lack one."""

from pathlib import Path

CHAT_TEMPLATE_PATH = Path(__file__).with_name("chat_template.jinja")


def chat_template_for(tokenizer) -> str | None:
    """None when the tokenizer brings its own template, else the official ERNIE-4.5 one."""
    if getattr(tokenizer, "chat_template", None):
        return None
    return CHAT_TEMPLATE_PATH.read_text()
