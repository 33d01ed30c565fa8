"""A random ERNIE-4.5-MoE checkpoint dressed as ERNIE-4.5-21B-A3B-Thinking: a sentencepiece-style
tokenizer (byte fallback, so a newline is the token ``<0x0A>`` as in Baidu's vocabulary) carrying
the Thinking tokens, and a Thinking-style chat template of its own in the tokenizer config.

The template is written here (the hub's cannot be downloaded). It follows the output format that
vLLM's ``ernie45`` parsers document, ``reasoning\\n</think>\\n\\n<response>\\nanswer\\n</response>``
or ``reasoning\\n</think>\\n\\n<tool_call>\\n{json}\\n</tool_call>``; a prompt ends in
``<think>\\n``.
"""

from __future__ import annotations

import json
from pathlib import Path

from vllm_ernie_moe.tools.random_checkpoint import (
    _TOKENIZER_TEXT,
    SPECIAL_TOKENS,
    build_checkpoint,
    ernie_tokenizer,
)

THINK, END_THINK = "<think>", "</think>"
RESPONSE, END_RESPONSE = "<response>", "</response>"
TOOL_CALL, END_TOOL_CALL = "<tool_call>", "</tool_call>"
NEWLINE = "<0x0A>"
THINKING_TOKENS = [THINK, END_THINK, RESPONSE, END_RESPONSE, TOOL_CALL, END_TOOL_CALL]
VOCAB_SIZE = 1024

THINKING_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- if tools -%}{{- 'Tools: ' + (tools | map(attribute='function') | list | tojson) + '\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{- message['content'] + '\n' -}}"
    "{%- elif message['role'] == 'user' -%}{{- 'User: ' + message['content'] + '\n' -}}"
    "{%- elif message['role'] == 'tool' -%}"
    "{{- '<tool_output>\n' + message['content'] + '\n</tool_output>\n' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- 'Assistant: ' -}}"
    "{%- if message.get('content') -%}"
    "{{- '<response>\n' + message['content'] + '\n</response>' -}}{%- endif -%}"
    "{%- for call in message.get('tool_calls') or [] -%}"
    "{{- '<tool_call>\n' + ({'name': call['function']['name'], "
    "'arguments': call['function']['arguments']} | tojson) + '\n</tool_call>' -}}"
    "{%- endfor -%}{{- eos_token + '\n' -}}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'Assistant: <think>\n' -}}{%- endif -%}"
)


def build_thinking_tokenizer(out_dir: Path):
    """Byte-fallback BPE: the 256 byte tokens, then merges trained on the embedded text without
    newlines (so that ``\\n`` is always ``<0x0A>``), and the Thinking tokens as added, non-special
    tokens (they stay in the decoded text, where the parsers look for them)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    spaces = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=False)
    trainer_tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tokenizer.pre_tokenizer = spaces
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    budget = VOCAB_SIZE - len(SPECIAL_TOKENS) - len(byte_tokens) - len(THINKING_TOKENS)
    trainer = trainers.BpeTrainer(vocab_size=budget, show_progress=False)
    trainer_tokenizer.train_from_iterator([_TOKENIZER_TEXT.replace("\n", " ")] * 4, trainer)
    trained = json.loads(trainer_tokenizer.to_str())["model"]
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + byte_tokens)}
    for token in sorted(trained["vocab"], key=trained["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tokenizer = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    tokenizer.pre_tokenizer = spaces
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINKING_TOKENS])
    fast = ernie_tokenizer(tokenizer, chat_template=THINKING_CHAT_TEMPLATE)
    assert len(fast) <= VOCAB_SIZE, len(fast)
    fast.save_pretrained(str(out_dir))
    return fast


def build_thinking_checkpoint(out_dir: Path) -> Path:
    """The tiny 21B-like geometry in bf16, with the Thinking tokenizer in place of the default."""
    path = build_checkpoint(out_dir, "tiny-21b", dtype="bfloat16", vocab_size=VOCAB_SIZE)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (path / name).unlink(missing_ok=True)
    build_thinking_tokenizer(path)
    return path
