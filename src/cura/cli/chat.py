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
    args.model = model_source(args)  # None with --adapter: its recorded base
    from cura.generate import load_for_inference

    model, tokenizer = load_for_inference(
        args.model, args.adapter, quantize=False if args.no_quantize else None, compute_dtype=args.dtype
    )
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []
    interactive = sys.stdin.isatty()
    base = args.model or "its base"
    print(f"cura chat with {base}{' + ' + args.adapter if args.adapter else ''}. {HELP}", flush=True)
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
        reply = _reply(model, tokenizer, system + history, args)
        if reply is None:
            return 1
        history.append({"role": "assistant", "content": reply})
    return 0


def _reply(model, tokenizer, conversation, args) -> str | None:
    """Stream one answer to stdout while a worker thread generates it; None (reported) if generation
    failed. The worker always ends the stream, so a failure can never leave this loop waiting."""
    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    result: list[str] = []
    failure: list[BaseException] = []
    worker = threading.Thread(
        target=_complete, args=(model, tokenizer, conversation, args, streamer, result, failure)
    )
    worker.start()
    print("assistant> ", end="", flush=True)
    for piece in streamer:
        print(piece, end="", flush=True)
    worker.join()
    print(flush=True)
    if failure:
        exc = failure[0]
        print(f"error: generation failed ({type(exc).__name__}: {exc}); chat stopped", file=sys.stderr)
        return None
    return result[0] if result else ""


def _complete(model, tokenizer, conversation, args, streamer, result: list[str], failure: list) -> None:
    from cura.generate import generate

    try:
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
    except BaseException as exc:  # reported by the main thread, which is waiting on the stream
        failure.append(exc)
        streamer.end()
