"""`cura train`: fine-tune from a YAML config, flags, or nothing at all (the demo).

Every key of `TrainConfig` is a flag (`--lora.r 8`, `--data.packing false`, `--grad-accum 4`), generated from
the dataclasses so no default is restated here; a few short aliases cover the common ones.
"""

from __future__ import annotations

import argparse
from typing import get_args

from cura.cli import SUBCOMMANDS, config_settings
from cura.config import field_help, from_dict, leaf_docs, leaf_fields, set_path

# short flag -> config key
ALIASES = {
    "data": "data.path",
    "eval_data": "data.eval_path",
    "format": "data.format",
    "output": "output_dir",
    "seq_len": "data.max_length",
    "packing": "data.packing",
}


DESCRIPTION = """Fine-tune a model with QLoRA (a frozen 4-bit NF4 base, LoRA adapters on every linear layer).

With no config and no --data it runs the demo: the bundled SmolLM2-135M-Instruct learns a fixed JSON
answer format, and its answers before and after are shown.

examples:
  cura train                                          # the demo (a few minutes on 2 CPU cores)
  cura train --demo dpo                               # the preference demo: DPO towards a house style
  cura train --data my.jsonl --output runs/mine       # your data on the bundled model
  cura train --model path/to/model --data chats.jsonl --lora.r 32 --lr 1e-4 --max-steps 500
  cura train run.yaml --batch-size 2                  # a YAML file of the keys below; flags win
  cura train --data my.jsonl --auto-fit 12GB          # shrink batch / sequence to fit 12 GB
  cura train --data my.jsonl --output runs/mine --resume   # continue an interrupted run
  cura train --data my.jsonl --report-to tensorboard,wandb  # also report to trackers (offline by default)
  cura train run.yaml --nproc 2                       # data parallel on 2 processes (torchrun under the hood)

Every key of the run's config is a flag below ('--lora.r 8' is the key lora.r); 'cura estimate' takes the
same flags and prints the memory a run needs before you start it."""


def register(sub) -> None:
    from cura.train.config import TrainConfig

    p = sub.add_parser(
        "train",
        help=SUBCOMMANDS["train"],
        usage="cura train [CONFIG.yaml] [--KEY VALUE ...]",
        description=DESCRIPTION,
        formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(
            prog, max_help_position=30, width=116
        ),
    )
    p.add_argument("config", nargs="?", help="a YAML file with any of the keys below (flags override it)")
    for alias, key in ALIASES.items():
        p.add_argument(
            f"--{alias.replace('_', '-')}",
            dest=f"cfg:{key}",
            default=argparse.SUPPRESS,
            metavar="VALUE",
            help=f"same as --{key.replace('_', '-')}",
        )
    p.add_argument(
        "--field",
        dest="fields",
        action="append",
        default=[],
        metavar="NAME=COLUMN",
        help="column mapping for custom data, e.g. --field prompt=question --field completion=answer",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set any config key, e.g. --set lora.r=8",
    )
    p.add_argument(
        "--auto-fit",
        metavar="MEMORY",
        default=None,
        help="shrink batch size / sequence length so the run fits in MEMORY (e.g. 12GB or a GPU name)",
    )
    add_launch_flags(p)
    add_config_flags(p, TrainConfig, taken=set(ALIASES))
    p.add_argument(
        "--demo",
        choices=("sft", "dpo"),
        default=None,
        help="run a demo on the bundled model: sft (the default with no --data) learns a JSON format, dpo "
        "learns a house style from preference pairs (cura.demo.dpo)",
    )
    p.add_argument(  # the demo only: how many held-out prompts it scores (CI runs a short demo)
        "--demo-prompts", type=int, default=None, help=argparse.SUPPRESS
    )
    p.set_defaults(func=run)


def add_launch_flags(p: argparse.ArgumentParser) -> None:
    """torchrun's own settings (not run settings: a run trained on 2 processes is the same run)."""
    g = p.add_argument_group("several processes or machines (torchrun; see cura.train.distributed)")
    g.add_argument(
        "--nproc", type=int, default=0, help="processes on this machine (one per GPU); 0: this one"
    )
    g.add_argument("--nnodes", type=int, default=1, help="machines taking part (with --nproc)")
    g.add_argument("--node-rank", type=int, default=0, help="this machine's index, 0 .. nnodes-1")
    g.add_argument("--rdzv-endpoint", default=None, help="HOST:PORT of machine 0, where the machines meet")


def add_config_flags(p: argparse.ArgumentParser, cls, taken: set[str]) -> None:
    """One flag per leaf key of the config class (`--lora.r`), its help read from the field's own doc."""
    docs = leaf_docs(cls)
    for key, tp, f in leaf_fields(cls):
        if key in taken:
            continue
        # a bare `--flag` means true, also for `bool | "auto"` (gradient_checkpointing)
        extra = {"nargs": "?", "const": "true"} if tp is bool or bool in get_args(tp) else {}
        p.add_argument(
            "--" + key.replace("_", "-"),
            dest=f"cfg:{key}",
            default=argparse.SUPPRESS,
            metavar="VALUE",
            help=field_help(tp, f, docs.get(key)),
            **extra,
        )


def build_config(args):
    """Merge YAML, flags and overrides into one validated TrainConfig; returns (config, is_demo): False,
    True (the SFT demo) or "dpo" (`--demo dpo`)."""
    from cura.errors import CuraError
    from cura.train.config import TrainConfig

    data = config_settings(args)
    if args.fields:
        mapping = {}
        for item in args.fields:
            if "=" not in item:
                raise CuraError(f"--field expects NAME=COLUMN (e.g. prompt=question), got {item!r}")
            k, v = item.split("=", 1)
            mapping[k.strip()] = v.strip()
        set_path(data, "data.fields", mapping)
    demo = getattr(args, "demo", None)
    if demo == "dpo":
        from cura.demo.dpo import dpo_demo_settings

        return from_dict(TrainConfig, dpo_demo_settings(data)), "dpo"
    is_demo = demo == "sft" or not (data.get("data") or {}).get("path")
    if is_demo and data.get("objective", "sft") != "sft":
        raise CuraError(
            f"--objective {data['objective']} needs --data: a file of preference pairs (or, for kto, labelled "
            "answers); see 'cura data inspect FILE --objective ...' and the README's preference section"
        )
    if is_demo:
        from cura.demo import demo_settings

        data = demo_settings(data)
    return from_dict(TrainConfig, data), is_demo


def run(args) -> int:
    config, is_demo = build_config(args)
    if args.auto_fit:
        from cura.train.autofit import auto_fit

        config = auto_fit(config, args.auto_fit)
    if args.nproc:
        from cura.errors import CuraError
        from cura.train.distributed import launch

        if is_demo:
            raise CuraError(
                "--nproc trains your data on several processes; add --data FILE (the demo runs on one)"
            )
        return launch(
            config,
            nproc=args.nproc,
            nnodes=args.nnodes,
            node_rank=args.node_rank,
            rdzv_endpoint=args.rdzv_endpoint,
        )
    if is_demo == "dpo":
        from cura.demo.dpo import run_dpo_demo

        return run_dpo_demo(config)
    if is_demo:
        from cura.demo import run_demo

        return run_demo(config, args.demo_prompts)
    from cura.train import train

    try:
        result = train(config)
    except OSError as exc:  # a full disk mid-run: say which checkpoint --resume continues from
        from cura.train.rundir import full_disk_error

        error = full_disk_error(exc, config.output_dir)
        if error is None:
            raise
        raise error from exc
    return 0 if result.get("completed") or result.get("interrupted_by") else 1
