"""Dialog test: generate answers with vLLM + vllm-ernie-moe (MindIE ``run_pa.py`` counterpart).

python examples/run_pa.py                                   # embedded random checkpoint
python examples/run_pa.py --model_path /weights/ERNIE-4.5-21B-A3B-PT --tp 2
python examples/run_pa.py --model_path W --input_texts "Hi" "What is MoE?" --no-is_chat_model
"""

import argparse
import sys

from vllm_ernie_moe import envs
from vllm_ernie_moe.tools.cli import command


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="ERNIE-4.5 MoE dialog test on vLLM")
    parser.add_argument(
        "--model_path",
        help="checkpoint directory or hub id (default: a tiny RANDOM-weight local checkpoint)",
    )
    parser.add_argument(
        "--input_texts", "--input_text", nargs="+", default=["What's Deep Learning?"]
    )
    parser.add_argument("--max_output_length", type=int, default=20)
    parser.add_argument(
        "--is_chat_model",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="apply the chat template (default); --no-is_chat_model for base weights",
    )
    parser.add_argument("--trust_remote_code", action="store_true")
    parser.add_argument(
        "--tp", "--world_size", "--tensor_parallel_size", dest="tp", type=int, default=1
    )
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"]
    )
    parser.add_argument("--max_model_len", type=int, default=4096)
    parser.add_argument(
        "--enforce_eager", action="store_true", help="skip torch.compile: faster start, slower run"
    )
    args = parser.parse_args(argv)
    if args.max_output_length < 1:
        parser.error("--max_output_length must be at least 1")
    if args.tp < 1:
        parser.error("--tp must be at least 1")
    return args


@command
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    envs.use_all_cpu_cores()
    from vllm import LLM, SamplingParams

    from vllm_ernie_moe.tools.small_model import NOTICE, SMALL_MODEL_DIR

    model = args.model_path
    if model is None:
        model = str(SMALL_MODEL_DIR)
        print(f"\n*** No --model_path given: using {model},\n*** {NOTICE}.\n")
    llm = LLM(
        model=model,
        dtype=args.dtype,
        tensor_parallel_size=args.tp,
        max_model_len=args.max_model_len,
        trust_remote_code=args.trust_remote_code,
        enforce_eager=args.enforce_eager,
    )
    params = SamplingParams(max_tokens=args.max_output_length, temperature=0)
    if args.is_chat_model:
        # A tokenizer without a chat template gets the official ERNIE one (the plugin registers it).
        conversations = [[{"role": "user", "content": text}] for text in args.input_texts]
        outputs = llm.chat(conversations, params, use_tqdm=False)
    else:
        outputs = llm.generate(args.input_texts, params, use_tqdm=False)
    for text, output in zip(args.input_texts, outputs):
        print(f"Question: {text!r}\nAnswer:   {output.outputs[0].text!r}\n")
    llm.llm_engine.engine_core.shutdown()  # then `command` exits without the teardown
    return 0


if __name__ == "__main__":
    sys.exit(main())
