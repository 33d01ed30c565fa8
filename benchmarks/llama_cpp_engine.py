"""llama.cpp as a comparison engine for bench_engines.py; never a dependency of the package.

Needs llama-cpp-python (it compiles llama.cpp from the registry's source package) and that source
package unpacked, for llama.cpp's own HF -> GGUF converter::

    CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \
        pip install llama-cpp-python==0.3.36
    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36
    tar xzf llama_cpp_python-0.3.36.tar.gz
    python benchmarks/bench_engines.py --llama-cpp-src llama_cpp_python-0.3.36/vendor/llama.cpp

The benchmark checkpoint's tokenizer is a locally built byte-level BPE that llama.cpp's converter
does not recognise (it expects ERNIE's SentencePiece model). The benchmark feeds token ids, never
text, so the GGUF gets llama.cpp's "none" vocabulary of the same size instead.

A msModelSlim checkpoint (the 28-layer W4A8_DYNAMIC one) is converted from its dequantized weights
(int8 or int4 values times their scales, in bf16): the same weights the plugin serves. llama.cpp's
4-bit formats (Q4_0, Q4_K_M) are made by llama.cpp's own quantizer from its Q8_0 file, as users of
llama.cpp make them.
"""

import os
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

#: llama.cpp's ``llama_ftype`` values of the 4-bit formats its quantizer makes.
QUANTIZER_TYPES = {"q4_0": 2, "q4_k_m": 15}


def convert(checkpoint: Path, outfile: Path, outtype: str, converter_dir: Path) -> None:
    """Writes ``outfile`` (outtype bf16 or q8_0) with llama.cpp's converter, in a subprocess."""
    subprocess.run(
        [
            sys.executable,
            __file__,
            "convert",
            str(checkpoint),
            str(outfile),
            outtype,
            str(converter_dir),
        ],
        check=True,
    )


def quantize(source: Path, outfile: Path, outtype: str) -> None:
    """Writes ``outfile`` (a :data:`QUANTIZER_TYPES` outtype) from the GGUF ``source`` with
    llama.cpp's quantizer (``llama-quantize``'s C API), on every core."""
    import llama_cpp as lc

    params = lc.llama_model_quantize_default_params()
    params.ftype, params.nthread = QUANTIZER_TYPES[outtype], os.cpu_count() or 1
    params.allow_requantize = True  # the source is Q8_0
    partial_file = outfile.with_suffix(".partial")
    if lc.llama_model_quantize(str(source).encode(), str(partial_file).encode(), params) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {source} to {outtype}")
    partial_file.rename(outfile)


def dequantized(tensors: dict) -> dict:
    """The converter's lazy tensors of a msModelSlim checkpoint as bf16 weights: each int8 weight
    (or int4 pairs) times its per-row or per-group scale, computed only when the converter writes
    it; the scales, offsets (zero: symmetric) and ``scale_bias`` left out."""
    import torch

    from vllm_ernie_moe.quant.msmodelslim import dequantized_weight

    def weight(name: str) -> torch.Tensor:
        return dequantized_weight(tensors[name](), tensors[f"{name}_scale"]()).to(torch.bfloat16)

    side_tensors = ("_scale", "_offset", ".scale_bias")
    return {
        name: partial(weight, name) if f"{name}_scale" in tensors else load
        for name, load in tensors.items()
        if not name.endswith(side_tensors)
    }


def _convert_in_process(checkpoint: str, outfile: str, outtype: str, converter_dir: str) -> None:
    sys.path[:0] = [converter_dir, str(Path(converter_dir) / "gguf-py")]
    import convert_hf_to_gguf
    from conversion.base import ModelBase
    from conversion.ernie import Ernie4_5Model

    from vllm_ernie_moe.quant.msmodelslim import find_description

    if find_description(checkpoint) is not None:  # msModelSlim's file names and int weights
        from vllm_ernie_moe.tools.quantize import WEIGHTS_PREFIX

        part_names, index_tensors = ModelBase.get_model_part_names, ModelBase.index_tensors
        ModelBase.get_model_part_names = staticmethod(
            lambda directory, prefix, suffix: part_names(directory, WEIGHTS_PREFIX, suffix)
        )
        ModelBase.index_tensors = lambda self, **kw: dequantized(index_tensors(self, **kw))

    def vocab_of_ids_only(self) -> None:
        self.gguf_writer.add_tokenizer_model("none")
        self.gguf_writer.add_vocab_size(self.hparams["vocab_size"])

    Ernie4_5Model.set_vocab = vocab_of_ids_only
    sys.argv = ["convert_hf_to_gguf.py", checkpoint, "--outfile", outfile, "--outtype", outtype]
    convert_hf_to_gguf.main()


class LlamaCppEngine:
    """Greedy generation from token ids through llama.cpp's C API (llama-cpp-python bindings):
    one context with a sequence slot per prompt, batched decode of all sequences per step."""

    def __init__(self, gguf: Path, n_ctx: int, n_seq: int, n_batch: int, threads: int) -> None:
        import llama_cpp as lc

        self.lc = lc
        lc.llama_backend_init()
        self.model = lc.llama_model_load_from_file(
            str(gguf).encode(), lc.llama_model_default_params()
        )
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        params = lc.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = n_ctx, n_batch, n_batch
        params.n_seq_max, params.n_threads, params.n_threads_batch = n_seq, threads, threads
        self.ctx = lc.llama_init_from_model(self.model, params)
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.batch = lc.llama_batch_init(n_batch, 0, n_seq)
        self.batch_size = n_batch

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """entries: (token, position, sequence, wants logits)."""
        b = self.batch
        for i, (token, pos, seq, logits) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, logits
            b.seq_id[i][0] = seq
        b.n_tokens = len(entries)
        if self.lc.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")

    def _argmax(self, index: int) -> int:
        import numpy as np

        logits = self.lc.llama_get_logits_ith(self.ctx, index)
        return int(np.ctypeslib.as_array(logits, shape=(self.n_vocab,)).argmax())

    def generate(self, prompts: list[list[int]], tokens: int) -> float:
        """Greedy ``tokens`` per prompt; returns the seconds from the prompts' first tokens to
        their last (the decode steps, no prefill)."""
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)
        last = []
        for seq, prompt in enumerate(prompts):  # prefill each prompt, logits of its last token
            entries = [(t, p, seq, p == len(prompt) - 1) for p, t in enumerate(prompt)]
            for chunk in range(0, len(entries), self.batch_size):
                self._decode(entries[chunk : chunk + self.batch_size])
            last.append(self._argmax((len(prompt) - 1) % self.batch_size))
        decode_start = time.perf_counter()
        for step in range(tokens - 1):
            self._decode([(last[s], len(prompts[s]) + step, s, True) for s in range(len(prompts))])
            last = [self._argmax(s) for s in range(len(prompts))]
        return time.perf_counter() - decode_start


def timed_engine(gguf: Path, threads: int):
    """generate(prompts, max_tokens) for bench_engines.measure, plus the load time in seconds."""
    start = time.perf_counter()
    engine = LlamaCppEngine(gguf, n_ctx=8 * 2048, n_seq=8, n_batch=2048, threads=threads)
    return engine.generate, time.perf_counter() - start


if __name__ == "__main__" and sys.argv[1] == "convert":
    _convert_in_process(*sys.argv[2:6])
