"""Alias: `python -m vllm_ernie_moe.quantize` runs vllm_ernie_moe.tools.quantize (moved there)."""

if __name__ == "__main__":
    import runpy

    runpy.run_module("vllm_ernie_moe.tools.quantize", run_name="__main__", alter_sys=True)
