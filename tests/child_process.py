"""A Python child whose result is one JSON line on its stdout, marked by a tag: the tests' way to
run something in a fresh interpreter (an engine, vllm-ascend's own code) and read what it saw."""

from __future__ import annotations

import json
import subprocess
import sys


def tagged_json(arguments: list[str], tag: str, timeout: float, env: dict | None = None) -> dict:
    """Run ``python *arguments`` (with ``env`` as its whole environment if given) and return the
    JSON after ``tag`` on its stdout; the output's tail names the failure if no such line came."""
    done = subprocess.run(
        [sys.executable, *arguments], env=env, capture_output=True, text=True, timeout=timeout
    )
    line = next((x for x in done.stdout.splitlines() if x.startswith(f"{tag} ")), None)
    assert line is not None, done.stdout[-3000:] + done.stderr[-5000:]
    return json.loads(line.removeprefix(f"{tag} "))
