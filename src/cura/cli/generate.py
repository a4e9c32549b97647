"""`cura generate`: one completion with the chat template applied (greedy by default)."""

from __future__ import annotations

from cura.cli import (
    SUBCOMMANDS,
    add_loading_arguments,
    add_model_argument,
    add_sampling_arguments,
    model_source,
)


def register(sub) -> None:
    p = sub.add_parser("generate", help=SUBCOMMANDS["generate"])
    add_model_argument(p)
    p.add_argument("--adapter", default=None, help="an adapter folder (cura or PEFT)")
    p.add_argument("--prompt", required=True, help="the user message")
    add_sampling_arguments(p, max_new_tokens=256)
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    add_loading_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    args.model = model_source(args)  # None with --adapter: its recorded base
    from transformers import TextStreamer

    from cura.generate import generate, load_for_inference

    model, tokenizer = load_for_inference(
        args.model, args.adapter, quantize=False if args.no_quantize else None, compute_dtype=args.dtype
    )
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.prompt}
    ]
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    generate(
        model,
        tokenizer,
        [args.prompt if args.raw else messages],
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        chat=not args.raw,
        streamer=streamer,
        batch_size=1,
    )
    return 0
