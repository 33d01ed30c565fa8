"""Alias: `python -m vllm_ernie_moe.soak` runs vllm_ernie_moe.tools.soak (moved there)."""

if __name__ == "__main__":
    import runpy

    runpy.run_module("vllm_ernie_moe.tools.soak", run_name="__main__", alter_sys=True)
