"""ERNIE-4.5-21B-A3B-Thinking's serving path with the plugin: ``vllm serve`` with
``--reasoning-parser ernie45 --tool-call-parser ernie45 --enable-auto-tool-choice`` on a checkpoint
carrying the Thinking tokens and a chat template of its own.

Random weights never write ``</think>``: each request forces a bounded output with a regex
(``enable_in_reasoning``, so the grammar covers the reasoning too) and a logit bias that makes the
model spell the Thinking markers as their single tokens, as the real model does. The expected split
comes from the raw text, which ``/v1/completions`` returns unparsed for the same prompt and
constraint (greedy, so the same tokens).
"""

import json
import re

import openai
import pytest
import requests
from thinking_checkpoint import (
    END_RESPONSE,
    END_THINK,
    END_TOOL_CALL,
    RESPONSE,
    THINKING_TOKENS,
    TOOL_CALL,
    build_thinking_checkpoint,
)
from transformers import AutoTokenizer

from vllm_ernie_moe.chat import CHAT_TEMPLATE_PATH
from vllm_ernie_moe.tools.served import vllm_serve

WORDS = r"[a-z]{1,6}( [a-z]{1,6}){1,3}"  # bounded: random weights would write one word forever
ANSWER_REGEX = rf"{WORDS}\n{END_THINK}\n\n{RESPONSE}\n{WORDS}\n{END_RESPONSE}"
CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": CITY}}
CALL_JSON = r'\{"name": "get_weather", "arguments": \{"city": "(Paris|Rome)"\}\}'
TOOL_CALL_REGEX = rf"{WORDS}\n{END_THINK}\n\n{TOOL_CALL}\n{CALL_JSON}\n{END_TOOL_CALL}"
MESSAGES = [{"role": "user", "content": "is the sky blue?"}]


@pytest.fixture(scope="module")
def thinking(tmp_path_factory):
    """(checkpoint, tokenizer, client) of a server started as Thinking model users start it."""
    path = build_thinking_checkpoint(tmp_path_factory.mktemp("thinking"))
    args = ["--max-model-len", "256", "--enforce-eager", "--max-num-seqs", "4",
            "--reasoning-parser", "ernie45", "--tool-call-parser", "ernie45",
            "--enable-auto-tool-choice", "--structured-outputs-config",
            json.dumps({"backend": "xgrammar", "enable_in_reasoning": True})]  # fmt: skip
    with vllm_serve(path, *args, log=tmp_path_factory.mktemp("serve") / "server.log") as served:
        client = openai.OpenAI(base_url=f"{served.base_url}/v1", api_key="none", max_retries=0)
        yield str(path), AutoTokenizer.from_pretrained(str(path)), client


def forced(tokenizer, regex: str) -> dict:
    """Greedy request fields that force ``regex``, the markers as single tokens."""
    markers = {str(tokenizer.convert_tokens_to_ids(t)): 100 for t in THINKING_TOKENS}
    return dict(
        temperature=0,
        max_tokens=96,
        logit_bias=markers,
        extra_body={"structured_outputs": {"regex": regex}},
    )


def raw_reply(thinking, regex: str, tools=None) -> str:
    """The model's text for MESSAGES, unparsed: the completions endpoint on the prompt the chat
    endpoint renders (vLLM's /tokenize, which hands the template the tools as chat requests do)."""
    model, tokenizer, client = thinking
    server = str(client.base_url).removesuffix("/").removesuffix("/v1")
    rendered = requests.post(
        f"{server}/tokenize",
        json={"model": model, "messages": MESSAGES, "tools": tools, "add_generation_prompt": True},
        timeout=30,
    ).json()
    request = forced(tokenizer, regex)
    text = client.completions.create(model=model, prompt=rendered["tokens"], **request)
    text = text.choices[0].text
    assert re.fullmatch(regex, text), text
    return text


def chat(thinking, regex: str, stream: bool = False, **request):
    model, tokenizer, client = thinking
    return client.chat.completions.create(
        model=model, messages=MESSAGES, stream=stream, **forced(tokenizer, regex), **request
    )


def streamed(chunks) -> tuple[str, str, list]:
    """Reasoning, content and tool-call deltas of a stream, concatenated."""
    reasoning, content, calls = [], [], []
    for chunk in chunks:
        for choice in chunk.choices:
            reasoning.append(getattr(choice.delta, "reasoning", None) or "")  # a vLLM extra
            content.append(choice.delta.content or "")
            calls.extend(choice.delta.tool_calls or [])
    return "".join(reasoning), "".join(content), calls


def test_the_checkpoints_own_template_wins_over_the_fallback(thinking):
    model, tokenizer, client = thinking
    own, fallback = (
        tokenizer.apply_chat_template(
            MESSAGES, add_generation_prompt=True, tokenize=False, chat_template=template
        )
        for template in (None, CHAT_TEMPLATE_PATH.read_text())
    )
    assert own.endswith("Assistant: <think>\n") and own != fallback
    own = tokenizer(own, add_special_tokens=False).input_ids
    reply = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=1)
    assert reply.usage.prompt_tokens == len(own)


def test_reasoning_is_separated_from_the_answer(thinking):
    raw = raw_reply(thinking, ANSWER_REGEX)
    reasoning, answer = raw.split(END_THINK)
    answer = answer.removeprefix(f"\n\n{RESPONSE}").removesuffix(END_RESPONSE)
    message = chat(thinking, ANSWER_REGEX).choices[0].message
    assert message.reasoning == reasoning
    assert message.content == answer  # "\nwords\n": vLLM keeps the newlines inside <response>
    streamed_reasoning, _, _ = streamed(chat(thinking, ANSWER_REGEX, stream=True))
    assert streamed_reasoning == reasoning


@pytest.mark.xfail(
    strict=True,
    reason="vLLM streams every delta after </think> as raw content when no tool parser phase is "
    "active, so ernie45's <response> handling never runs; non-streamed replies drop the tags "
    "(docs/workflows.md). strict: passes once vLLM fixes it",
)
def test_streamed_answer_equals_the_non_streamed(thinking):
    message = chat(thinking, ANSWER_REGEX).choices[0].message
    _, content, _ = streamed(chat(thinking, ANSWER_REGEX, stream=True))
    assert content == message.content


def test_tool_calls_are_parsed(thinking):
    raw = raw_reply(thinking, TOOL_CALL_REGEX, tools=[TOOL])
    reasoning, _ = raw.split(END_THINK)
    expected = json.loads(raw.split(TOOL_CALL)[1].split(END_TOOL_CALL)[0])
    choice = chat(thinking, TOOL_CALL_REGEX, tools=[TOOL]).choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.reasoning == reasoning
    (call,) = choice.message.tool_calls
    assert call.function.name == expected["name"]
    assert json.loads(call.function.arguments) == expected["arguments"]

    streamed_reasoning, content, calls = streamed(
        chat(thinking, TOOL_CALL_REGEX, stream=True, tools=[TOOL])
    )
    assert streamed_reasoning == reasoning
    assert not content.strip()
    (call,) = calls
    assert call.function.name == expected["name"]
    assert json.loads(call.function.arguments) == expected["arguments"]
