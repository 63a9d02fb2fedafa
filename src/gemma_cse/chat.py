"""``python -m gemma_cse.chat``: talk to the CSE assistant in the terminal, or ask one question.

Interactive: a multi-turn REPL (``/salir`` or Ctrl-D to leave, ``/nuevo`` to start over).
One shot: ``--question "…" [--json]`` prints the reply (or the whole typed reply as JSON).
"""

from __future__ import annotations

import argparse
import json
import sys

from gemma_cse.cli import run
from gemma_cse.engine import DEFAULT_ADAPTER, Engine, Mode, Reply
from gemma_cse.generation import DecodingConfig


def render(reply: Reply) -> str:
    sources = ", ".join(f"{s.entry_id} ({s.score:.2f})" for s in reply.sources[:1])
    meta = f"[{reply.status}"
    meta += f" · fuente: {sources}" if sources and reply.status in ("answered", "fallback") else ""
    if reply.timings.generation_ms:
        seconds, rate = reply.timings.generation_ms / 1e3, reply.timings.tokens_per_second
        meta += f" · {seconds:.1f} s, {rate:.0f} tok/s"
    return f"{reply.text}\n{meta}]"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gemma_cse.chat",
        description="Chat with the CSE school-services assistant (Spanish).",
    )
    parser.add_argument("--question", help="ask one question and exit")
    parser.add_argument(
        "--json", action="store_true", help="with --question: print the reply as JSON"
    )
    parser.add_argument(
        "--mode",
        choices=[m.value for m in Mode],
        default=Mode.rag_lora.value,
        help="how answers are made (default: %(default)s; retrieval: no LLM, fastest)",
    )
    parser.add_argument("--model", help="model spec (default: embedded:gemma3-270m)")
    parser.add_argument(
        "--adapter",
        default=str(DEFAULT_ADAPTER),
        help="run directory with adapter.lora.h5 and config.yaml, or 'none' (default: %(default)s)",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=DecodingConfig.max_new_tokens,
        help="longest generated answer, in tokens (default: %(default)s)",
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=DecodingConfig.temperature,
        help="0 for greedy decoding, above 0 to sample (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    if args.json and args.question is None:
        parser.error("--json needs --question")
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be at least 1")
    if args.temperature < 0:
        parser.error("--temperature must not be negative")
    decoding = DecodingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    adapter = None if args.adapter == "none" else args.adapter
    engine = Engine.build(args.mode, args.model, adapter, decoding=decoding)

    if args.question is not None:
        reply = engine.answer(args.question)
        print(
            json.dumps(reply.to_dict(), ensure_ascii=False, indent=2)
            if args.json
            else render(reply)
        )
        return 0

    print("Asistente de la Coordinación de Sistemas Escolares. /nuevo reinicia, /salir termina.")
    history: list[tuple[str, str]] = []
    while True:
        try:
            message = input("tú> ").strip()
        except EOFError:
            print()
            return 0
        if message in ("/salir", "/exit"):
            return 0
        if message == "/nuevo":
            history.clear()
            continue
        if not message:
            continue
        reply = engine.answer(message, history)
        print(f"cse> {render(reply)}")
        if reply.status in ("answered", "fallback"):
            history = [*history[-2:], (message, reply.text)]


if __name__ == "__main__":
    sys.exit(run(main))
