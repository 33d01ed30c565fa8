"""patch_cpu_aot_compile_cache: a second engine start on the same vLLM cache loads the compiled
model the first start saved, instead of compiling again, and answers the same; a start with
another plugin setting compiles its own.

The third start also sets ``VLLM_ERNIE_MOE_FULL_WARMUP=1``, so the same starts check
patch_cpu_warmup_size: the graphs traced on its 16-token warm-up are those traced on vLLM's
2048-token one (one set of engine starts for both patches). The model is the msModelSlim W4A16
fixture, the format the brief warm-up was made for: int4 linears and experts on vLLM's kernels
where exact (VNNI), the portable ones elsewhere."""

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO

import pytest

from vllm_ernie_moe import native_int4
from vllm_ernie_moe.patches import patch_cpu_aot_compile_cache as patch
from vllm_ernie_moe.patches import patch_cpu_warmup_size
from vllm_ernie_moe.patches.patching import unpatched
from vllm_ernie_moe.quant.cpu_experts import vllm_kernel_serves

W4A16 = Path(__file__).parent / "fixtures" / "ernie-tiny-w4a16-msmodelslim"
#: One engine start: greedy tokens for a fixed prompt of token ids, then the process ends.
START = """
import json, sys
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
llm = LLM(model=sys.argv[1], max_model_len=128, max_num_seqs=1, max_num_batched_tokens=2048)
params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
out = llm.generate([TokensPrompt(prompt_token_ids=[5, 17, 42, 99, 7])], params, use_tqdm=False)
print("TOKENS", json.dumps(list(out[0].outputs[0].token_ids)))
"""
BRIEF_WARMUP = f"warming up for the compilation on {patch_cpu_warmup_size.WARMUP_TOKENS} tokens"
#: Dynamo's log of each graph it traces, one line per line of the graph's code.
GRAPH_LINE = re.compile(r"\[__graph_code\](.*)")
#: The traced function's name carries a random id.
COMPILED_FN = re.compile(r"__compiled_fn_\w+")


def traced_graphs(log: str) -> list[str]:
    """The code of the graphs torch.compile traced, as Dynamo logged it."""
    return [COMPILED_FN.sub("__compiled_fn", line) for line in GRAPH_LINE.findall(log)]


def launch(model, cache_root, **env) -> tuple[subprocess.Popen, IO[str], IO[str]]:
    """One engine start in a fresh process (explicit KV cache size, traced graphs logged), its
    output in files: through pipes, a start whose log fills them would wait for a reader."""
    stdout, stderr = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    process = subprocess.Popen(
        [sys.executable, "-c", START, str(model)],
        env=dict(
            os.environ,
            VLLM_CACHE_ROOT=str(cache_root),
            VLLM_CPU_KVCACHE_SPACE="1",
            TORCH_LOGS="graph_code",
            **env,
        ),
        stdout=stdout,
        stderr=stderr,
    )
    return process, stdout, stderr


def finish(started: tuple[subprocess.Popen, IO[str], IO[str]]) -> tuple[list[int], str]:
    """A :func:`launch`'s greedy tokens and log, once it ended."""
    process, *outputs = started
    try:
        process.wait(timeout=900)
    finally:
        process.kill()
    for output in outputs:
        output.seek(0)
    stdout, stderr = (output.read() for output in outputs)
    log = stdout + stderr
    assert process.returncode == 0, log[-3000:]
    line = next(line for line in stdout.splitlines() if line.startswith("TOKENS "))
    return json.loads(line.removeprefix("TOKENS ")), log


def test_unpatched_vllm_calls_finalize_loading_unguarded():
    """The bug the patch exists for; when this fails, upstream fixed it: remove the patch."""
    from vllm.compilation import decorators

    assert patch._finalizes_unguarded(unpatched(decorators._try_load_aot_compiled_fn))


def test_second_start_loads_the_saved_compilation(tmp_path):
    """The second and the third start run at the same time, once the first saved its compilation
    (each start keeps about one of the two cores busy): the third must find it and not load it."""
    model = W4A16
    first, first_log = finish(launch(model, tmp_path))
    assert "saved AOT compiled function" in first_log
    assert BRIEF_WARMUP in first_log
    second_start = launch(model, tmp_path)
    # Another build setting, one that leaves this W4A16 model as it is (it is W8A16's): without
    # the plugin's settings in the key this start loaded the first one's graph, and with a
    # setting that changes the graph died (VLLM_ERNIE_MOE_SGL_KERNELS=0 on a Zen 4 host;
    # VLLM_ERNIE_MOE_W4A16_INT8_ACTIVATIONS=0 on W4A16: KeyError 'weight_zero').
    full_start = launch(
        model, tmp_path, VLLM_ERNIE_MOE_W8A16_INT8="0", VLLM_ERNIE_MOE_FULL_WARMUP="1"
    )
    try:
        second, second_log = finish(second_start)
        full, full_log = finish(full_start)
    finally:
        full_start[0].kill()  # ended already unless the second start failed
    assert "Compiling model again" not in second_log, second_log[-3000:]
    assert "Directly load AOT compilation" in second_log
    assert second == first
    assert "Directly load AOT compilation" not in full_log
    assert "saved AOT compiled function" in full_log
    # patch_cpu_warmup_size: vLLM keeps no shape guards, so a branch on the token count taken
    # while tracing would serve every size. The first start traced on 16 tokens, this one on
    # vLLM's full size (2048): the same graphs, the same answer.
    assert BRIEF_WARMUP not in full_log
    graph = traced_graphs(full_log)
    assert any("routed_experts" in line for line in graph)  # the whole model was traced
    # W4A16's kernels, where their size branches live, are in the traced graph.
    if vllm_kernel_serves("w4a16"):
        kernels = ("vllm_ernie_moe.int4_linear", "_C.fused_experts_cpu")
    elif native_int4.serves(64, 32):
        kernels = ("vllm_ernie_moe.avx2_int4_linear", "vllm_ernie_moe.portable_experts")
    else:
        kernels = ("vllm_ernie_moe.int4_group_linear", "vllm_ernie_moe.portable_experts")
    assert all(any(kernel in line for line in graph) for kernel in kernels), kernels
    assert traced_graphs(first_log) == graph
    assert full == first


@pytest.mark.parametrize(
    "switch",
    [
        "VLLM_ERNIE_MOE_W4A16_INT8_ACTIVATIONS",
        "VLLM_ERNIE_MOE_SGL_KERNELS",
        # Not in the key at first: a start with it off loaded the widened graph saved by a start
        # with it on (docs/results/engines-4layers-bf16-llamacpp-zen3.txt, the A/B's first attempt).
        "VLLM_ERNIE_MOE_BF16_WIDENING",
        "VLLM_ERNIE_MOE_W4A16_AVX2_KERNEL",
    ],
)
def test_the_key_follows_build_settings_not_others(monkeypatch, switch):
    monkeypatch.delenv(switch, raising=False)
    default = patch.plugin_factors()
    monkeypatch.setenv(switch, "1")  # the default, set
    assert patch.plugin_factors() == default
    monkeypatch.setenv(switch, "0")
    assert patch.plugin_factors() != default
    monkeypatch.delenv(switch)
    monkeypatch.setenv("VLLM_ERNIE_MOE_FULL_WARMUP", "1")  # the graph is the same (above)
    assert patch.plugin_factors() == default
