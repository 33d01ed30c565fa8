"""Alias: `python -m vllm_ernie_moe.parity` runs vllm_ernie_moe.tools.parity (moved there)."""

if __name__ == "__main__":
    import runpy

    runpy.run_module("vllm_ernie_moe.tools.parity", run_name="__main__", alter_sys=True)
