"""User tools: precision, perf, parity and soak runs, the offline quantizer, checkpoint builders
and the small model, the CPU-wheel alias. vLLM never imports them: the runtime is the package
above (``register``, the model, ``quant/``, the patches).
"""
