"""patch_cpu_aot_compile_cache: a second engine start on the same vLLM cache loads the compiled
model the first start saved, instead of compiling again, and answers the same."""

import json
import os
import subprocess
import sys

from vllm_ernie_moe.patches import patch_cpu_aot_compile_cache as patch
from vllm_ernie_moe.patches.patching import unpatched

#: One engine start: greedy tokens for a fixed prompt of token ids, then the process ends.
START = """
import json, sys
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
llm = LLM(model=sys.argv[1], max_model_len=128, max_num_seqs=1)
params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
out = llm.generate([TokensPrompt(prompt_token_ids=[5, 17, 42, 99, 7])], params, use_tqdm=False)
print("TOKENS", json.dumps(list(out[0].outputs[0].token_ids)))
"""


def start(model, cache_root) -> tuple[list[int], str]:
    done = subprocess.run(
        [sys.executable, "-c", START, str(model)],
        env=dict(os.environ, VLLM_CACHE_ROOT=str(cache_root)),
        capture_output=True,
        text=True,
        timeout=900,
    )
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("TOKENS "))
    return json.loads(line.removeprefix("TOKENS ")), log


def test_unpatched_vllm_calls_finalize_loading_unguarded():
    """The bug the patch exists for; when this fails, upstream fixed it: remove the patch."""
    from vllm.compilation import decorators

    assert patch._finalizes_unguarded(unpatched(decorators._try_load_aot_compiled_fn))


def test_second_start_loads_the_saved_compilation(checkpoint, tmp_path):
    model = checkpoint("tiny-21b")
    first, first_log = start(model, tmp_path)
    assert "saved AOT compiled function" in first_log
    second, second_log = start(model, tmp_path)
    assert "Compiling model again" not in second_log, second_log[-3000:]
    assert "Directly load AOT compilation" in second_log
    assert second == first
