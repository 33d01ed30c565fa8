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
from transformers import AutoTokenizer

from vllm_ernie_moe.chat import CHAT_TEMPLATE_PATH

VLLM_CLI = Path(sys.executable).with_name("vllm")
MAX_MODEL_LEN = 256


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
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
                client.completions.create(model=str(path), prompt=f"Question {i}:", max_tokens=16)
                for i in range(32)
            )
        )

    replies = asyncio.run(all_requests())
    assert len(replies) == 32
    assert all(r.usage.completion_tokens == 16 for r in replies)


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
