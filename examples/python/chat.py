"""Chat with an exported GGUF through llama-cpp-python, as a laptop app embeds it.

    edgellm export smollm2-135m --weights q4_k_m --ollama --out models
    python examples/python/chat.py models/SmolLM2-135M-Instruct.Q4_1-q4_k_m.gguf
    python examples/python/chat.py MODEL.gguf --prompt "Name three planets."   # one turn

The GGUF carries its chat template and stop tokens (edgellm writes them), so llama.cpp
formats the conversation itself: no template here.
"""

from __future__ import annotations

import argparse
import os

from llama_cpp import Llama


def reply(llm: Llama, history: list[dict], max_tokens: int) -> str:
    """Stream the assistant's answer to stdout and return it."""
    text = ""
    for chunk in llm.create_chat_completion(history, max_tokens=max_tokens, temperature=0.0,
                                            stream=True):
        piece = chunk["choices"][0]["delta"].get("content") or ""
        print(piece, end="", flush=True)
        text += piece
    print()
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a .gguf file")
    parser.add_argument("--prompt", help="answer this one message and exit")
    parser.add_argument("--system", default="You are a helpful assistant.")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    llm = Llama(model_path=args.model, n_ctx=2048, n_threads=args.threads, verbose=False)
    history = [{"role": "system", "content": args.system}]
    prompts = [args.prompt] if args.prompt else iter(lambda: input("> "), "/bye")
    for prompt in prompts:
        history.append({"role": "user", "content": prompt})
        history.append({"role": "assistant", "content": reply(llm, history, args.max_tokens)})


if __name__ == "__main__":
    try:
        main()
    except (EOFError, KeyboardInterrupt):
        print()
