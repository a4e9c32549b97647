"""`cura eval`: loss and generation metrics of a model (with an adapter), or a before/after comparison."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from cura.cli import SUBCOMMANDS, add_loading_arguments, add_model_argument, model_source
from cura.constants import DEFAULT_MAX_NEW_TOKENS


def register(sub) -> None:
    p = sub.add_parser("eval", help=SUBCOMMANDS["eval"])
    add_model_argument(p)
    p.add_argument("--adapter", default=None, help="an adapter folder (cura or PEFT)")
    p.add_argument(
        "--adapter-b", default=None, help="with --compare: a second adapter to compare against --adapter"
    )
    p.add_argument("--data", required=True, help="data file (jsonl/json/csv) or a plain text file of prompts")
    p.add_argument(
        "--references", default=None, help="line-aligned text file of references for a text --data"
    )
    p.add_argument("--instruction", default=None, help="text put before each prompt of a text --data")
    p.add_argument("--format", default="auto", help="data format (as for cura data; default: detected)")
    p.add_argument(
        "--field",
        action="append",
        default=[],
        metavar="KEY=COLUMN",
        help="column names, e.g. prompt=dialogue, reference=summary1,summary2,summary3 (several references)",
    )
    p.add_argument("--system", default=None, help="a system prompt for every row")
    p.add_argument(
        "--metrics", default=None, help="comma list of loss,rouge,bleu,chrf,exact_match (default: by data)"
    )
    p.add_argument(
        "--extractor", default=None, help="answer extractor for exact match: gsm8k, choice, regex:PAT, none"
    )
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N rows only")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--compare", action="store_true", help="base vs --adapter (or --adapter vs --adapter-b)")
    p.add_argument("--output", default=None, help="report folder (default with --compare: eval-<timestamp>)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument(
        "--objective",
        choices=("dpo", "orpo", "kto"),
        default=None,
        help="preference data: held-out preference accuracy, margin and rewards of the base and --adapter",
    )
    p.add_argument("--beta", type=float, default=0.1, help="with --objective: the reward scale beta")
    p.add_argument("--max-length", type=int, default=1024, help="with --objective: tokens per sequence")
    add_loading_arguments(p)
    p.set_defaults(func=run)


def _check_args(args) -> None:
    from cura.errors import CuraError

    if args.compare and not args.adapter:
        raise CuraError("--compare needs --adapter (base vs adapter) or --adapter and --adapter-b")
    if args.adapter_b and not args.compare:
        raise CuraError("--adapter-b only makes sense with --compare; add --compare")
    if args.limit is not None and args.limit < 1:
        raise CuraError(f"--limit {args.limit} must be at least 1")
    if args.max_new_tokens < 1 or args.batch_size < 1:
        raise CuraError("--max-new-tokens and --batch-size must be at least 1")


def _compare_base(args, quantize):
    """(model, tokenizer): the base --adapter was trained on, without it; --adapter-b must share it."""
    from cura.adapters import check_same_base, load_base_for_adapter

    base = load_base_for_adapter(
        args.adapter, args.model, quantize=quantize, compute_dtype=args.dtype, with_adapter=False
    )
    if args.adapter_b:
        check_same_base(args.adapter_b, base.spec)
    base.model.config.use_cache = True
    return base.model, base.tokenizer


def _print_table(result_or_cmp) -> None:
    from cura.evaluate.report import comparison_markdown, result_markdown
    from cura.evaluate.run import Comparison

    if isinstance(result_or_cmp, Comparison):
        print(comparison_markdown(result_or_cmp, examples=0))
    else:
        print(result_markdown(result_or_cmp))


def run(args) -> int:
    args.model = model_source(args)  # None with --adapter: its recorded base
    from cura.evaluate import (
        compare,
        evaluate,
        get_extractor,
        parse_fields,
        parse_metrics,
        read_eval_rows,
        use_adapter_template,
        write_comparison,
        write_result,
    )

    _check_args(args)
    _check_output(args)
    if args.objective:
        return run_preference(args)
    fields = parse_fields(args.field)
    metrics = parse_metrics(args.metrics)
    get_extractor(args.extractor)
    rows = read_eval_rows(
        args.data,
        format=args.format,
        fields=fields,
        references=args.references,
        system_prompt=args.system,
        instruction=args.instruction,
    )
    quantize = False if args.no_quantize else None
    kwargs = dict(
        limit=args.limit,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        extractor=args.extractor,
    )
    settings = {"model": args.model, "adapter": args.adapter, "adapter_b": args.adapter_b, "data": args.data}
    if args.compare:
        model, tokenizer = _compare_base(args, quantize)
        for folder in (args.adapter, args.adapter_b):  # the template first, so the loss rows use it too
            if folder and use_adapter_template(tokenizer, folder):
                break
        outcome = compare(
            model, tokenizer, rows, metrics, adapter=args.adapter, adapter_b=args.adapter_b, **kwargs
        )
        output = Path(args.output or f"eval-{time.strftime('%Y%m%d-%H%M%S')}")
        paths = write_comparison(outcome, output, extra={"settings": settings})
    else:
        from cura.generate import load_for_inference

        model, tokenizer = load_for_inference(
            args.model, args.adapter, quantize=quantize, compute_dtype=args.dtype
        )
        outcome = evaluate(model, tokenizer, rows, metrics, label=args.adapter or args.model, **kwargs)
        paths = write_result(outcome, Path(args.output), extra={"settings": settings}) if args.output else {}
    if args.json:
        print(json.dumps(outcome.to_dict(), indent=2, ensure_ascii=False))
    else:
        _print_table(outcome)
    for path in paths.values():
        print(f"wrote {path}", file=sys.stderr)
    return 0


def _check_output(args) -> None:
    """Refuse a --output that holds files cura eval did not write, before anything is loaded."""
    if not args.output:
        return
    from cura.evaluate.outputs import COMPARISON_FILES, PREFERENCE_FILES, RESULT_FILES, check_report_folder

    names = PREFERENCE_FILES if args.objective else COMPARISON_FILES if args.compare else RESULT_FILES
    check_report_folder(args.output, names)


def run_preference(args) -> int:
    """`cura eval --objective ...`: base (adapter off) and adapter on the same preference rows."""
    from cura.evaluate import parse_fields
    from cura.evaluate.preference import evaluate_preference_file, preference_table
    from cura.generate import load_for_inference
    from cura.train.preference_config import PreferenceConfig

    quantize = False if args.no_quantize else None
    model, tokenizer = load_for_inference(
        args.model, args.adapter, quantize=quantize, compute_dtype=args.dtype
    )
    result = evaluate_preference_file(
        model,
        tokenizer,
        args.data,
        objective=args.objective,
        preference=PreferenceConfig(beta=args.beta),
        batch_size=args.batch_size,
        max_length=args.max_length,
        limit=args.limit,
        fields=parse_fields(args.field),
        system_prompt=args.system,
    )
    if args.output:
        from cura.atomic import write_json
        from cura.evaluate.outputs import PREFERENCE_FILES, REPORT_MARK, check_report_folder

        check_report_folder(args.output, PREFERENCE_FILES)
        Path(args.output).mkdir(parents=True, exist_ok=True)
        write_json(Path(args.output) / "preference_eval.json", {"written_by": REPORT_MARK, **result})
        print(f"wrote {Path(args.output) / 'preference_eval.json'}", file=sys.stderr)
    print(json.dumps(result, indent=2) if args.json else preference_table(result))
    return 0
