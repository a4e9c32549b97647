"""`cura estimate`: how much memory a run needs, term by term, and what makes it fit, without loading weights.

    cura estimate --model llama-3-8b --method qlora --seq-len 2048 --fit 12GB
    cura estimate run.yaml --device cpu --json
    cura estimate --list                      # the model names it knows

The settings are `cura train`'s (a YAML file, the flags below, `--set KEY=VALUE`), with its defaults; the
model is a known name, a model folder, a config.json or a .gguf (only its header is read).
"""

from __future__ import annotations

import argparse
import json
import sys

from cura.cli import SUBCOMMANDS, config_settings
from cura.config import from_dict
from cura.errors import CuraError

# flag -> TrainConfig key (the defaults come from TrainConfig; none is restated here)
FLAGS = {
    "model": "model",
    "method": "method",
    "quant_type": "quant_type",
    "blocksize": "blocksize",
    "double_quant": "double_quant",
    "compute_dtype": "compute_dtype",
    "r": "lora.r",
    "targets": "lora.target_modules",
    "dropout": "lora.dropout",
    "optimizer": "optimizer",
    "batch_size": "batch_size",
    "seq_len": "data.max_length",
    "gradient_checkpointing": "gradient_checkpointing",
    "loss_chunk_tokens": "loss_chunk_tokens",
    "packing": "data.packing",
    "objective": "objective",  # dpo/orpo: two sequences per example (cura.memory.planner)
    "fsdp": "fsdp",  # with --nproc N: the plan of one rank of a sharded run (cura.memory.sharding)
}


def register(sub) -> None:
    p = sub.add_parser(
        "estimate",
        help=SUBCOMMANDS["estimate"],
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", nargs="?", help="a `cura train` YAML config (flags override it)")
    for flag, key in FLAGS.items():
        extra = (
            {"nargs": "?", "const": "true"}
            if key in ("double_quant", "gradient_checkpointing", "data.packing", "fsdp")
            else {}
        )
        names = [f"--{flag.replace('_', '-')}"]
        if key != flag:  # also `cura train`'s spelling of the key, e.g. --lora.r
            names.append(f"--{key.replace('_', '-')}")
        p.add_argument(
            *names,
            dest=f"cfg:{key}",
            default=argparse.SUPPRESS,
            metavar="VALUE",
            help=f"config key {key} ('full' is also accepted for --method)"
            if flag == "method"
            else f"config key {key}",
            **extra,
        )
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="any config key"
    )
    p.add_argument(
        "--device", choices=("cuda", "cpu"), default=None, help="plan GPU memory (default) or this CPU's RAM"
    )
    p.add_argument(
        "--fit", metavar="MEMORY", default=None, help="a size (12GB, 24GiB) or a GPU name (rtx-4090)"
    )
    p.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="data-parallel processes (cura train --nproc): the plan is per process, batch size per process",
    )
    p.add_argument("--json", action="store_true", help="print the plan (and fit) as JSON")
    p.add_argument("--list", action="store_true", help="list the model names --model knows, and exit")
    p.set_defaults(func=run)


def list_models() -> str:
    """The known model names with their sizes, one per line (the table in cura.memory.shapes)."""
    from cura.memory.shapes import KNOWN_SHAPES

    lines = [f"{'name':18}{'params':>9}{'layers':>8}{'hidden':>8}{'heads':>7}{'kv':>4}{'vocab':>8}"]
    for name in sorted(KNOWN_SHAPES):
        s = KNOWN_SHAPES[name]
        lines.append(
            f"{name:18}{s.total_params / 1e9:>8.2f}B{s.num_layers:>8}{s.hidden_size:>8}{s.num_heads:>7}"
            f"{s.num_kv_heads:>4}{s.vocab_size:>8}"
        )
    lines.append(
        "any other model: give its folder, its config.json or a .gguf file (only the header is read)"
    )
    return "\n".join(lines)


def settings_from_args(args) -> tuple[dict, str | None]:
    """(TrainConfig data, method override) from the YAML file, the flags and --set."""
    data = config_settings(args)
    method = data.pop("method", None)
    if method is not None and method not in ("full", "lora", "qlora"):
        raise CuraError(f"--method must be full, lora or qlora, got {method!r}")
    if method in ("lora", "qlora"):
        data["method"] = method
    return data, method


def settle_estimate_checkpointing(config, shape, device: str, budget: int | None, nproc: int):
    """`gradient_checkpointing: auto` decided as `cura train` would: against the --fit budget, or with
    --device cpu against this machine's free memory; otherwise (a GPU not named) planned on. Says which on
    stderr (stdout may be --json)."""
    from cura.memory.allocator import available_memory
    from cura.train.plan import settle_checkpointing

    if isinstance(config.gradient_checkpointing, bool):
        return config
    if budget is None and device != "cpu" and nproc == 1:  # the GPU's free memory is `cura train`'s to read
        config = config.replace(gradient_checkpointing=True)
        why = (
            "gradient_checkpointing auto: planned on; `cura train` turns it off when the plan without it fits "
            "the GPU's free memory (--fit SIZE decides against a budget)"
        )
    else:
        available = budget if budget is not None else available_memory() if device == "cpu" else None
        config, why = settle_checkpointing(config, device, available, world_size=nproc, shape=shape)
    print(why, file=sys.stderr)
    return config


def run(args) -> int:
    from cura.memory import fit, plan, resolve_memory, shape_from_source
    from cura.memory.report import fit_to_dict, format_fit, format_plan, plan_to_dict
    from cura.train.config import TrainConfig
    from cura.train.plan import plan_spec

    if args.list:
        print(list_models())
        return 0
    data, method = settings_from_args(args)
    config = from_dict(TrainConfig, data)
    budget = resolve_memory(args.fit) if args.fit else None
    device = args.device or (budget.device if budget and budget.device else "cuda")
    native_bf16 = budget.bf16 if budget else None
    shape = shape_from_source(config.model)
    if args.nproc < 1:
        raise CuraError(f"--nproc must be at least 1, got {args.nproc}")
    if config.fsdp and args.nproc < 2:
        raise CuraError("--fsdp shards the model across processes: give --nproc N with N >= 2 as well")
    config = settle_estimate_checkpointing(
        config, shape, device, budget.bytes if budget else None, args.nproc
    )
    spec = plan_spec(config, device, method=method, native_bf16=native_bf16, world_size=args.nproc)
    the_plan = plan(shape, spec)
    result = fit(shape, spec, budget.bytes, bf16_ok=native_bf16 is not False) if budget else None
    if args.json:
        out = {"plan": plan_to_dict(the_plan), "fit": fit_to_dict(result, budget.label) if result else None}
        json.dump(out, sys.stdout, indent=2)
        print()
    else:
        print(format_plan(the_plan))
        if result:
            print()
            print(format_fit(result, budget.label))
    return 0
