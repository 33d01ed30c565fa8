"""Where the weight processing of an engine's start goes: cProfile of vLLM's
``process_weights_after_loading`` (every layer's repacks and kernel set-up, after the weights are
read), top functions by cumulative time.

The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) and eager (no compilation:
that is timed by ``startup.py``); ``VLLM_ERNIE_MOE_REPACK_CACHE=off`` profiles a cold start.

    VLLM_ERNIE_MOE_REPACK_CACHE=off python benchmarks/profile_load.py CHECKPOINT [--top 40]
"""

import argparse
import cProfile
import os
import pstats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM
    from vllm.model_executor.model_loader import base_loader

    process = base_loader.process_weights_after_loading

    def profiled(*call_args, **kwargs):
        profile = cProfile.Profile()
        profile.enable()
        try:
            return process(*call_args, **kwargs)
        finally:
            profile.disable()
            pstats.Stats(profile).sort_stats("cumulative").print_stats(args.top)

    base_loader.process_weights_after_loading = profiled
    LLM(model=args.checkpoint, enforce_eager=True, max_model_len=512, max_num_seqs=2)


if __name__ == "__main__":
    main()
