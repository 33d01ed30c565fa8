"""A soak of ``vllm serve`` under faults, on loopback, bounded in requests and time.

    python -m vllm_ernie_moe.tools.soak --model M [--lora-adapter DIR] [--requests 3000] \
        [--minutes 10]
    python -m vllm_ernie_moe.tools.soak --url http://127.0.0.1:8000 --model M [--lora NAME]

It mixes valid requests (completions, streamed chat, LoRA, named tool calls) with faults (clients
that drop a stream, requests aborted by a client timeout, malformed JSON, prompts over the context
length, invalid sampling parameters, unknown model names). Every valid request must be answered in
full, every bad one must get a 4xx whose body says what is wrong, the server must stay healthy, and
its memory (the API server and its engine processes) after the run is compared with after warm-up.
Without ``--url`` it starts ``vllm serve`` itself: the ernie45 tool parser on, JSON without free
whitespace (random weights fill any whitespace a grammar allows), LoRA on with ``--lora-adapter``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import httpx

TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Rome"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


SOAK_LORA = "soak-lora"
COMPACT_JSON = {"backend": "xgrammar", "disable_any_whitespace": True}


class Unexpected(Exception):
    """A reply the server should not have given."""


@dataclass
class Soak:
    base_url: str
    model: str
    max_model_len: int
    lora: str | None = None
    sent: Counter = field(default_factory=Counter)
    passed: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    # Valid requests: each must be answered in full.
    async def completion(self, client: httpx.AsyncClient, model: str | None = None) -> None:
        tokens = random.randint(1, 16)
        body = {"model": model or self.model, "prompt": f"Question {random.random()}:",
                "max_tokens": tokens, "ignore_eos": True}  # fmt: skip
        reply = await self._post(client, "/v1/completions", body, 200)
        if reply["usage"]["completion_tokens"] != tokens:
            raise Unexpected(f"{tokens} tokens asked, {reply['usage']['completion_tokens']} given")

    async def lora_completion(self, client: httpx.AsyncClient) -> None:
        await self.completion(client, self.lora)

    async def streamed_chat(self, client: httpx.AsyncClient) -> None:
        body = {"model": self.model, "messages": [{"role": "user", "content": "hello"}],
                "max_tokens": 12, "stream": True, "ignore_eos": True}  # fmt: skip
        async with client.stream("POST", "/v1/chat/completions", json=body) as reply:
            if reply.status_code != 200:
                raise Unexpected(f"HTTP {reply.status_code}")
            lines = [line async for line in reply.aiter_lines() if line.startswith("data: ")]
        if lines[-1] != "data: [DONE]":
            raise Unexpected(f"stream ended with {lines[-1]!r}")

    async def tool_call(self, client: httpx.AsyncClient) -> None:
        body = {"model": self.model, "messages": [{"role": "user", "content": "weather?"}],
                "tools": [TOOL], "max_tokens": 32,
                "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
                }  # fmt: skip
        reply = await self._post(client, "/v1/chat/completions", body, 200)
        (call,) = reply["choices"][0]["message"]["tool_calls"]
        if json.loads(call["function"]["arguments"])["city"] not in ("Paris", "Rome"):
            raise Unexpected(f"arguments {call['function']['arguments']}")

    # Faults: the client goes away, or the request is bad.
    async def dropped_stream(self, client: httpx.AsyncClient) -> None:
        body = {"model": self.model, "prompt": "Deep learning", "max_tokens": 64,
                "stream": True, "ignore_eos": True}  # fmt: skip
        async with client.stream("POST", "/v1/completions", json=body) as reply:
            async for _ in reply.aiter_lines():
                break  # close the connection mid-stream

    async def aborted(self, client: httpx.AsyncClient) -> None:
        body = {"model": self.model, "prompt": "Deep learning", "max_tokens": 64,
                "ignore_eos": True}  # fmt: skip
        try:
            await client.post("/v1/completions", json=body, timeout=0.05)
        except httpx.TimeoutException:
            return

    async def malformed_json(self, client: httpx.AsyncClient) -> None:
        await self._refused(client, "/v1/completions", b'{"model": "m", "prompt": ', 400)

    async def too_long(self, client: httpx.AsyncClient) -> None:
        body = {"model": self.model, "prompt": "word " * (2 * self.max_model_len), "max_tokens": 4}
        await self._refused(client, "/v1/completions", body, 400)

    async def bad_sampling(self, client: httpx.AsyncClient) -> None:
        bad = random.choice([{"temperature": -1}, {"top_p": 2}, {"max_tokens": -3}])
        body = {"model": self.model, "prompt": "hi", "max_tokens": 4, **bad}
        await self._refused(client, "/v1/completions", body, 400)

    async def unknown_model(self, client: httpx.AsyncClient) -> None:
        body = {"model": "no-such-model", "prompt": "hi", "max_tokens": 4}
        await self._refused(client, "/v1/completions", body, 404)

    async def _post(self, client: httpx.AsyncClient, path: str, body, status: int) -> dict:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        reply = await client.post(
            path, content=content, headers={"Content-Type": "application/json"}
        )
        if reply.status_code != status:
            raise Unexpected(f"HTTP {reply.status_code} (expected {status}): {reply.text[:200]}")
        return reply.json()

    async def _refused(self, client: httpx.AsyncClient, path: str, body, status: int) -> None:
        """A 4xx (``status``) with an error message in the body, as the OpenAI API has it."""
        reply = await self._post(client, path, body, status)
        message = reply.get("error", {}).get("message") or reply.get("message")
        if not message:
            raise Unexpected(f"HTTP {status} without a message: {reply}")

    def kinds(self) -> dict[str, Callable[[httpx.AsyncClient], Awaitable[None]]]:
        kinds = {
            "completion": self.completion,
            "streamed chat": self.streamed_chat,
            "named tool call": self.tool_call,
            "dropped stream": self.dropped_stream,
            "aborted": self.aborted,
            "malformed JSON": self.malformed_json,
            "over the context": self.too_long,
            "bad sampling": self.bad_sampling,
            "unknown model": self.unknown_model,
        }
        if self.lora:
            kinds["LoRA completion"] = self.lora_completion
        return kinds

    async def run(self, requests: int, seconds: float, concurrency: int) -> float:
        """Send ``requests`` (kinds drawn at random, seeded) until done or ``seconds`` pass."""
        kinds = self.kinds()
        plan = random.Random(0).choices(list(kinds), k=requests)
        deadline = time.monotonic() + seconds
        start = time.monotonic()
        limits = httpx.Limits(max_connections=concurrency)
        async with httpx.AsyncClient(base_url=self.base_url, timeout=120, limits=limits) as client:

            async def worker() -> None:
                while plan and time.monotonic() < deadline:
                    kind = plan.pop()
                    self.sent[kind] += 1
                    try:
                        await kinds[kind](client)
                        self.passed[kind] += 1
                    except (Unexpected, httpx.HTTPError, KeyError, ValueError) as error:
                        self.failures.append(f"{kind}: {type(error).__name__}: {error}")

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.monotonic() - start


def server_rss_mib(pid: int) -> float:
    """Resident memory of the API server and its children (the engine core), in MiB."""
    import psutil

    root = psutil.Process(pid)
    processes = [root, *root.children(recursive=True)]
    return sum(p.memory_info().rss for p in processes if p.is_running()) / 2**20


def soak(
    base_url: str,
    model: str,
    *,
    requests: int,
    seconds: float,
    concurrency: int = 16,
    max_model_len: int = 256,
    lora: str | None = None,
    pid: int | None = None,
) -> dict:
    """Warm up with a tenth of ``requests`` (at least 40), then soak; ``pid`` (the API server's)
    to measure its memory. The first thousands of requests raise the servers' RSS by a few percent
    (allocator high-water marks; LoRA adds ~200 MiB over the first 6000 on the small model), then
    it grows by ~20 MiB per 6000 requests, less each round (docs/benchmarks.md)."""
    runner = Soak(base_url, model, max_model_len, lora)
    asyncio.run(runner.run(max(40, requests // 10), seconds / 2, concurrency))
    warm = server_rss_mib(pid) if pid else None
    runner = Soak(base_url, model, max_model_len, lora)
    seconds = asyncio.run(runner.run(requests, seconds, concurrency))
    after = server_rss_mib(pid) if pid else None
    healthy = httpx.get(f"{base_url}/health", timeout=10).status_code == 200
    return {
        "requests": sum(runner.sent.values()),
        "seconds": round(seconds, 1),
        "by_kind": {
            k: {"sent": runner.sent[k], "as_expected": runner.passed[k]}
            for k in sorted(runner.sent)
        },  # fmt: skip
        "failures": runner.failures[:50],
        "healthy_after": healthy,
        "rss_mib_after_warmup": round(warm, 1) if warm else None,
        "rss_mib_after": round(after, 1) if after else None,
    }


def print_report(result: dict) -> None:
    print(f"{result['requests']} requests in {result['seconds']} s")
    print(f"{'kind':<18} {'sent':>6} {'as expected':>12}")
    for kind, row in result["by_kind"].items():
        print(f"{kind:<18} {row['sent']:>6} {row['as_expected']:>12}")
    print(f"healthy after: {result['healthy_after']}; RSS after warm-up "
          f"{result['rss_mib_after_warmup']} MiB, after {result['rss_mib_after']} MiB")  # fmt: skip
    for failure in result["failures"]:
        print("FAILED", failure)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m vllm_ernie_moe.tools.soak",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="checkpoint (the served model name)")
    parser.add_argument("--url", help="a running server; default: start vllm serve on loopback")
    parser.add_argument("--lora", help="with --url: a served LoRA module to send requests to")
    parser.add_argument("--lora-adapter", help="without --url: a PEFT adapter to serve, rank <= 16")
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-model-len", type=int, default=256)
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.minutes <= 0 or args.concurrency < 1:
        parser.error("--requests and --concurrency must be >= 1 and --minutes > 0")
    if args.url and args.lora_adapter:
        parser.error("--lora-adapter is for the server the soak starts; with --url give --lora")
    if args.lora_adapter:
        if not Path(args.lora_adapter, "adapter_config.json").is_file():
            parser.error(f"--lora-adapter {args.lora_adapter}: no adapter_config.json there")
        args.lora = SOAK_LORA
    return args


def main(argv: list[str] | None = None) -> int:
    from vllm_ernie_moe.tools.served import vllm_serve

    args = parse_args(argv)
    if args.url:
        server = nullcontext(None)
    else:
        serve_args = ["--max-model-len", str(args.max_model_len), "--enforce-eager",
                      "--max-num-seqs", str(args.concurrency), "--tool-call-parser", "ernie45",
                      "--enable-auto-tool-choice", "--structured-outputs-config",
                      json.dumps(COMPACT_JSON)]  # fmt: skip
        if args.lora_adapter:
            serve_args += ["--enable-lora", "--max-lora-rank", "16",
                           "--lora-modules", f"{SOAK_LORA}={args.lora_adapter}"]  # fmt: skip
        log = Path(tempfile.mkdtemp(prefix="soak-")) / "server.log"
        server = vllm_serve(args.model, *serve_args, log=log)
    with server as served:
        result = soak(
            args.url or served.base_url,
            args.model,
            requests=args.requests,
            seconds=60 * args.minutes,
            concurrency=args.concurrency,
            max_model_len=args.max_model_len,
            lora=args.lora,
            pid=None if args.url else served.pid,
        )
    print_report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if result["healthy_after"] and not result["failures"] else 1


if __name__ == "__main__":
    sys.exit(main())
