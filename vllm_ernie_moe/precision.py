"""Alias: `python -m vllm_ernie_moe.precision` runs vllm_ernie_moe.tools.precision (moved there)."""

if __name__ == "__main__":
    import runpy

    runpy.run_module("vllm_ernie_moe.tools.precision", run_name="__main__", alter_sys=True)
