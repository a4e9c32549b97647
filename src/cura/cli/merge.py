"""`cura merge`: fold an adapter into its (dequantized NF4) base and save a plain transformers folder."""

from __future__ import annotations

from cura.cli import SUBCOMMANDS, add_check_arguments, add_model_argument


def register(sub) -> None:
    from cura.export.merge import DEFAULT_DTYPE, DTYPES, TOLERANCES

    p = sub.add_parser("merge", help=SUBCOMMANDS["merge"])
    add_model_argument(p, "the base model the adapter was trained on (must match its record)")
    p.add_argument("--adapter", required=True, help="the adapter folder (cura or PEFT)")
    p.add_argument("--output", required=True, help="the folder to write the merged model to")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=DEFAULT_DTYPE, help="weight dtype on disk")
    p.add_argument(
        "--quantize-4bit",
        action="store_true",
        help="re-quantize the merged model (bitsandbytes 4-bit layout)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier merge in --output (never a folder cura did not write)",
    )
    add_check_arguments(p, "skip the logits parity check", TOLERANCES, "dtype")
    p.set_defaults(func=run)


def run(args) -> int:
    from cura.export import merge

    merge(
        args.model,
        args.adapter,
        args.output,
        dtype=args.dtype,
        check=not args.no_check,
        tolerance=args.tolerance,
        quantize_4bit=args.quantize_4bit,
        overwrite=args.overwrite,
    )
    return 0
