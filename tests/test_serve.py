"""The real ``vllm serve`` CLI on a tiny checkpoint, driven with the openai client over loopback."""

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
import requests
from peft_adapter import DENSE_MODULES, merged, write_adapter
from reference import (
    Generation,
    check_logprobs_close,
    prompt_token_ids,
    transformers_greedy,
)
from transformers import AutoTokenizer

from vllm_ernie_moe.chat import CHAT_TEMPLATE_PATH

VLLM_CLI = Path(sys.executable).with_name("vllm")
MAX_MODEL_LEN = 256
LORA_NAME = "tiny-lora"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def adapter(checkpoint, tmp_path_factory):
    """The LoRA adapter the server serves as LORA_NAME."""
    path = checkpoint("tiny-21b", "bfloat16")
    return write_adapter(path, tmp_path_factory.mktemp("adapter"), DENSE_MODULES)


@pytest.fixture(scope="module")
def server(checkpoint, adapter, tmp_path_factory):
    path = checkpoint("tiny-21b", "bfloat16")
    port = free_port()
    log = (tmp_path_factory.mktemp("serve") / "server.log").open("w")
    process = subprocess.Popen(
        [
            str(VLLM_CLI),
            "serve",
            str(path),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--max-model-len",
            str(MAX_MODEL_LEN),
            "--enforce-eager",
            "--max-num-seqs",
            "32",
            "--trust-request-chat-template",
            "--enable-lora",
            "--max-lora-rank",
            "8",
            "--lora-modules",
            f"{LORA_NAME}={adapter}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=dict(os.environ),
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert process.poll() is None, f"vllm serve exited; see {log.name}"
        try:
            if requests.get(f"{base}/health", timeout=2).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        time.sleep(1)
    else:
        pytest.fail(f"vllm serve did not become healthy; see {log.name}")
    yield path, base, openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
    process.terminate()
    process.wait(timeout=60)


def test_chat_uses_the_official_template_when_the_tokenizer_has_none(server):
    path, _, client = server
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
    path, _, client = server
    reply = client.chat.completions.create(
        model=str(path),
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=4,
        extra_body={"chat_template": "{{ messages[0]['content'] }}"},
    )
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    assert reply.usage.prompt_tokens == len(tokenizer("hello").input_ids)


def test_completion_and_streaming(server):
    path, _, client = server
    request = dict(model=str(path), prompt="Deep learning is", max_tokens=8, temperature=0)
    reply = client.completions.create(**request)
    assert reply.usage.completion_tokens == 8
    streamed = "".join(c.choices[0].text for c in client.completions.create(**request, stream=True))
    assert streamed == reply.choices[0].text  # greedy: the same text either way


def test_32_concurrent_requests_are_all_answered(server):
    path, base, _ = server

    async def all_requests():
        client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
        return await asyncio.gather(
            *(
                client.completions.create(
                    model=str(path), prompt=f"Question {i}:", max_tokens=16,
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
    path, base, client = server
    with pytest.raises(openai.BadRequestError):
        client.completions.create(
            model=str(path), prompt="word " * (MAX_MODEL_LEN * 2), max_tokens=4
        )
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=str(path), prompt="hi", max_tokens=4, temperature=-1)
    assert requests.get(f"{base}/health", timeout=5).status_code == 200
    assert client.completions.create(model=str(path), prompt="hi", max_tokens=2).choices


def served_greedy(
    client, model: str, prompts: list[list[int]], max_tokens: int
) -> list[Generation]:
    """Greedy completions with the top-5 log-probabilities per step, by token id."""
    generations = []
    for ids in prompts:
        reply = client.completions.create(
            model=model,
            prompt=ids,
            max_tokens=max_tokens,
            temperature=0,
            logprobs=5,
            extra_body={"return_tokens_as_token_ids": True, "ignore_eos": True},
        )
        logprobs = reply.choices[0].logprobs

        def token_id(token: str) -> int:
            return int(token.removeprefix("token_id:"))

        generations.append(
            Generation(
                [token_id(t) for t in logprobs.tokens],
                [{token_id(t): lp for t, lp in step.items()} for step in logprobs.top_logprobs],
            )
        )
    return generations


def test_a_lora_module_is_served_by_its_name(server, adapter):
    """``--lora-modules NAME=PATH``: requests naming the adapter get transformers' output with the
    adapter merged into the weights; the base model's differs."""
    path, _, client = server
    assert LORA_NAME in {m.id for m in client.models.list()}
    prompts = prompt_token_ids(path)
    reference = transformers_greedy(path, "bfloat16", 8, 5, prepare=merged(adapter))
    with_adapter = served_greedy(client, LORA_NAME, prompts, 8)
    check_logprobs_close(reference, with_adapter)
    without = served_greedy(client, str(path), prompts, 8)
    assert any(a.token_ids != b.token_ids for a, b in zip(with_adapter, without))
