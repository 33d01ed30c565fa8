"""Chat with a running ``vllm serve`` (see examples/serve.sh) through the OpenAI client.

python examples/openai_client.py [--base-url http://127.0.0.1:8000/v1] [--stream] "Hello!"
"""

import argparse

import openai


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("message", nargs="?", default="What's Deep Learning?")
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", help="served model name (default: the server's first)")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--stream", action="store_true")
    args = parser.parse_args()
    client = openai.OpenAI(base_url=args.base_url, api_key="EMPTY")
    model = args.model or client.models.list().data[0].id
    messages = [{"role": "user", "content": args.message}]
    if not args.stream:
        reply = client.chat.completions.create(
            model=model, messages=messages, max_tokens=args.max_tokens
        )
        print(reply.choices[0].message.content)
        return
    for chunk in client.chat.completions.create(
        model=model, messages=messages, max_tokens=args.max_tokens, stream=True
    ):
        print(chunk.choices[0].delta.content or "", end="", flush=True)
    print()


if __name__ == "__main__":
    main()
