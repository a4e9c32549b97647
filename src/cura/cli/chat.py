"""`cura chat`: an interactive, streaming conversation with a model (and optionally an adapter)."""

from __future__ import annotations

import sys
import threading

from cura.cli import (
    SUBCOMMANDS,
    add_loading_arguments,
    add_model_argument,
    add_sampling_arguments,
    model_source,
)

HELP = "commands: /reset clears the conversation, /exit (or Ctrl-D) quits"


def register(sub) -> None:
    p = sub.add_parser("chat", help=SUBCOMMANDS["chat"])
    add_model_argument(p)
    p.add_argument("--adapter", default=None, help="an adapter folder (cura or PEFT)")
    add_sampling_arguments(p, max_new_tokens=512)
    add_loading_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    args.model = model_source(args)
    from transformers import TextIteratorStreamer

    from cura.generate import load_for_inference

    model, tokenizer = load_for_inference(
        args.model, args.adapter, quantize=False if args.no_quantize else None, compute_dtype=args.dtype
    )
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []
    interactive = sys.stdin.isatty()
    print(f"cura chat with {args.model}{' + ' + args.adapter if args.adapter else ''}. {HELP}", flush=True)
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history.clear()
            print("(conversation cleared)", flush=True)
            continue
        history.append({"role": "user", "content": text})
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        result: list[str] = []
        conversation = system + history
        worker = threading.Thread(
            target=_complete,
            args=(model, tokenizer, conversation, args, streamer, result),
        )
        worker.start()
        print("assistant> ", end="", flush=True)
        for piece in streamer:
            print(piece, end="", flush=True)
        worker.join()
        print(flush=True)
        history.append({"role": "assistant", "content": result[0] if result else ""})
    return 0


def _complete(model, tokenizer, conversation, args, streamer, result: list[str]) -> None:
    from cura.generate import generate

    result.extend(
        generate(
            model,
            tokenizer,
            [conversation],
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            streamer=streamer,
            batch_size=1,
        )
    )
