"""Alias: `python -m vllm_ernie_moe.perf` runs vllm_ernie_moe.tools.perf (moved there)."""

if __name__ == "__main__":
    import runpy

    runpy.run_module("vllm_ernie_moe.tools.perf", run_name="__main__", alter_sys=True)
