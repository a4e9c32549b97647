"""`cura generate`: one completion with the chat template applied (greedy by default)."""

from __future__ import annotations

from cura.cli import SUBCOMMANDS, add_model_argument, model_source
from cura.hardware import COMPUTE_DTYPES


def register(sub) -> None:
    p = sub.add_parser("generate", help=SUBCOMMANDS["generate"])
    add_model_argument(p)
    p.add_argument("--adapter", default=None, help="an adapter folder (cura or PEFT)")
    p.add_argument("--prompt", required=True, help="the user message")
    p.add_argument("--system", default=None, help="a system message")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument("--no-quantize", action="store_true", help="load the base in full precision")
    p.add_argument(
        "--dtype", default="auto", choices=COMPUTE_DTYPES, help="compute dtype (auto: bf16 if native)"
    )
    p.set_defaults(func=run)


def run(args) -> int:
    args.model = model_source(args)
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
