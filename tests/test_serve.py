"""The real ``vllm serve`` CLI on a tiny checkpoint, driven with the openai client over loopback."""

import asyncio
import contextlib
import json
import re

import jsonschema
import openai
import pytest
import requests
from peft_adapter import DENSE_MODULES, merged, write_adapter
from reference import (
    check_logprobs_close,
    prompt_token_ids,
    served_greedy,
    transformers_greedy,
)
from settings import default_process_layout
from transformers import AutoTokenizer

from vllm_ernie_moe.chat import CHAT_TEMPLATE_PATH
from vllm_ernie_moe.tools.served import vllm_serve
from vllm_ernie_moe.tools.soak import soak

MAX_MODEL_LEN = 256
LORA_NAME = "tiny-lora"
# Random weights put any whitespace the JSON grammar allows between tokens, up to max_tokens.
STRUCTURED_OUTPUTS = {"backend": "xgrammar", "disable_any_whitespace": True}
# Every string in the schemas has a pattern: xgrammar's JSON strings admit raw control characters
# (random weights draw them), which strict JSON parsers refuse (docs/workflows.md).
ANSWER_SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"enum": ["yes", "no"]},
        "confidence": {"type": "integer", "minimum": 0, "maximum": 100},
        "reason": {"type": "string", "pattern": "^[a-z ]{1,12}$"},
    },
    "required": ["answer", "confidence", "reason"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": name, "parameters": {
        "type": "object", "properties": {arg: {"enum": values}}, "required": [arg],
        "additionalProperties": False}}}
    for name, arg, values in [("get_weather", "city", ["Paris", "Rome"]),
                              ("get_time", "zone", ["UTC", "CET"])]
]  # fmt: skip
QUESTION = [{"role": "user", "content": "is the sky blue?"}]


@pytest.fixture(scope="module")
def adapter(checkpoint, tmp_path_factory):
    """The LoRA adapter the server serves as LORA_NAME."""
    path = checkpoint("tiny-21b", "bfloat16")
    return write_adapter(path, tmp_path_factory.mktemp("adapter"), DENSE_MODULES)


@pytest.fixture(scope="module")
def server(checkpoint, adapter, tmp_path_factory):
    path = checkpoint("tiny-21b", "bfloat16")
    args = ["--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager", "--max-num-seqs", "32",
            "--trust-request-chat-template", "--enable-lora", "--max-lora-rank", "8",
            "--lora-modules", f"{LORA_NAME}={adapter}",
            "--tool-call-parser", "ernie45", "--enable-auto-tool-choice",
            "--structured-outputs-config", json.dumps(STRUCTURED_OUTPUTS)]  # fmt: skip
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with contextlib.ExitStack() as stack:
        with default_process_layout():  # as users run it
            served = stack.enter_context(vllm_serve(path, *args, log=log))
        client = openai.OpenAI(base_url=f"{served.base_url}/v1", api_key="none", max_retries=0)
        yield path, served.base_url, client, served.pid


def test_chat_uses_the_official_template_when_the_tokenizer_has_none(server):
    path, _, client, _ = server
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    assert not tokenizer.chat_template
    messages = [{"role": "user", "content": "hello"}]
    rendered = tokenizer.apply_chat_template(
        messages, chat_template=CHAT_TEMPLATE_PATH.read_text(), add_generation_prompt=True,
        tokenize=False,
    )  # fmt: skip
    assert rendered == "<|begin_of_sentence|>User: hello Assistant: "
    expected = tokenizer(rendered, add_special_tokens=False).input_ids
    reply = client.chat.completions.create(model=str(path), messages=messages, max_tokens=8)
    assert reply.choices[0].message.content is not None
    assert reply.usage.prompt_tokens == len(expected)


def test_an_explicit_chat_template_wins(server):
    path, _, client, _ = server
    reply = client.chat.completions.create(
        model=str(path),
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=4,
        extra_body={"chat_template": "{{ messages[0]['content'] }}"},
    )
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    assert reply.usage.prompt_tokens == len(tokenizer("hello").input_ids)


def test_completion_and_streaming(server):
    path, _, client, _ = server
    request = dict(model=str(path), prompt="Deep learning is", max_tokens=8, temperature=0)
    reply = client.completions.create(**request)
    assert reply.usage.completion_tokens == 8
    streamed = "".join(c.choices[0].text for c in client.completions.create(**request, stream=True))
    assert streamed == reply.choices[0].text  # greedy: the same text either way


def test_32_concurrent_requests_are_all_answered(server):
    path, base, _, _ = server

    async def all_requests():
        client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
        return await asyncio.gather(
            *(
                client.completions.create(
                    model=str(path),
                    prompt=f"Question {i}:",
                    max_tokens=16,
                    extra_body={"ignore_eos": True},  # sampled: a random model may draw EOS
                )
                for i in range(32)
            )
        )

    replies = asyncio.run(all_requests())
    assert len(replies) == 32
    assert all(r.usage.completion_tokens == 16 for r in replies)
    assert all(r.choices[0].finish_reason == "length" for r in replies)


def test_bad_requests_get_http_errors_and_the_server_stays_up(server):
    path, base, client, _ = server
    with pytest.raises(openai.BadRequestError):
        client.completions.create(
            model=str(path), prompt="word " * (MAX_MODEL_LEN * 2), max_tokens=4
        )
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=str(path), prompt="hi", max_tokens=4, temperature=-1)
    assert requests.get(f"{base}/health", timeout=5).status_code == 200
    assert client.completions.create(model=str(path), prompt="hi", max_tokens=2).choices


def test_a_lora_module_is_served_by_its_name(server, adapter):
    """``--lora-modules NAME=PATH``: requests naming the adapter get transformers' output with the
    adapter merged into the weights; the base model's differs."""
    path, _, client, _ = server
    assert LORA_NAME in {m.id for m in client.models.list()}
    prompts = prompt_token_ids(path)
    reference = transformers_greedy(path, "bfloat16", 8, 5, prepare=merged(adapter))
    with_adapter = served_greedy(client, LORA_NAME, prompts, 8)
    check_logprobs_close(reference, with_adapter)
    without = served_greedy(client, str(path), prompts, 8)
    assert any(a.token_ids != b.token_ids for a, b in zip(with_adapter, without))


def sampled_chat(client, model: str, n: int, **request) -> list:
    """``n`` sampled replies (temperature 1, a seed each): a constraint must hold every time."""
    return [
        client.chat.completions.create(
            model=model, messages=QUESTION, temperature=1, seed=seed, **request
        ).choices[0]
        for seed in range(n)
    ]


def test_json_schema_replies_are_valid_json_matching_the_schema(server):
    path, _, client, _ = server
    schema = {"type": "json_schema", "json_schema": {"name": "a", "schema": ANSWER_SCHEMA}}
    for choice in sampled_chat(client, str(path), 8, max_tokens=64, response_format=schema):
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), ANSWER_SCHEMA)


def test_regex_and_choice_constrain_the_reply(server):
    path, _, client, _ = server
    pattern = r"\d{3}-[a-z]{2,4}"
    for choice in sampled_chat(client, str(path), 4, max_tokens=16,
                               extra_body={"structured_outputs": {"regex": pattern}}):  # fmt: skip
        assert re.fullmatch(pattern, choice.message.content)
    options = ["yes", "no", "maybe"]
    for choice in sampled_chat(client, str(path), 4, max_tokens=16,
                               extra_body={"structured_outputs": {"choice": options}}):  # fmt: skip
        assert choice.message.content in options


def arguments(call, tool_name: str) -> dict:
    """The call's arguments, checked against the parameters of the tool it names."""
    assert call.type == "function" and call.function.name == tool_name
    (parameters,) = [
        t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == tool_name
    ]
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, parameters)
    return args


def test_a_named_tool_is_called_with_valid_arguments(server):
    path, _, client, _ = server
    named = {"type": "function", "function": {"name": "get_time"}}
    for choice in sampled_chat(client, str(path), 4, max_tokens=32, tools=TOOLS, tool_choice=named):
        (call,) = choice.message.tool_calls
        arguments(call, "get_time")


def test_tool_choice_required_calls_a_tool(server):
    """``required``'s grammar is an unbounded array of calls; a logit bias on the tokens holding
    ``]`` closes it after the first call (random weights would add calls up to max_tokens)."""
    path, _, client, _ = server
    vocab = AutoTokenizer.from_pretrained(str(path)).get_vocab()
    close = {str(i): 100 for token, i in vocab.items() if "]" in token}
    for choice in sampled_chat(client, str(path), 4, max_tokens=64, tools=TOOLS,
                               tool_choice="required", logit_bias=close):  # fmt: skip
        assert choice.finish_reason == "tool_calls"
        (call,) = choice.message.tool_calls
        arguments(call, call.function.name)


def test_a_short_soak_under_faults(server):
    """CI's cut of ``python -m vllm_ernie_moe.tools.soak`` (docs/benchmarks.md has the full run):
    every valid request answered in full, every bad one a 4xx with a message, memory flat."""
    path, base, _, pid = server
    result = soak(base, str(path), requests=400, seconds=120, max_model_len=MAX_MODEL_LEN,
                  lora=LORA_NAME, pid=pid)  # fmt: skip
    assert result["failures"] == []
    assert result["requests"] == 400 and result["healthy_after"]
    assert all(row["sent"] == row["as_expected"] for row in result["by_kind"].values())
    assert result["rss_mib_after"] < 1.1 * result["rss_mib_after_warmup"]
