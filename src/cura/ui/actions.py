"""What each screen of the page asks, answered with the same functions the CLI calls.

Model: `cura.memory.shape_from_source` (the planner's shape reading). Data: `cura.data.build_datasets`, as
`cura data inspect` does. Plan: `cura.train.plan.plan_spec` + `cura.memory.plan` / `fit`, as `cura estimate`
does. Train / Eval / Export: argument lists of the real commands, run by `cura.ui.jobs`. Every answer
carries `command`: what a person would type to do the same. Paths from the page are workspace-relative and
go through `Workspace.path`; the commands get absolute paths so they work from any folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from cura.errors import CuraError
from cura.ui import jobs
from cura.ui.workspace import Workspace, read_metrics

# train settings the page may set (config key -> kind); anything else is refused
EDITABLE = {
    "max_steps": int,
    "epochs": int,
    "batch_size": int,
    "grad_accum": int,
    "lr": float,
    "data.max_length": int,
    "data.packing": bool,
    "lora.r": int,
    "lora.alpha": float,
    "gradient_checkpointing": str,  # true, false or auto
    "optimizer": str,
    "compute_dtype": str,
    "loss_chunk_tokens": int,
    "method": str,
    "save_every": int,
    "eval_every": int,
    "log_every": int,
    "data.eval_split": float,
    "seed": int,
}
HISTOGRAM_BINS = 12
MAX_ROW_ERRORS = 1000  # bad rows listed on the Data screen (the CLI lists data.max_errors, 20)
BUNDLED_NAME = (
    "smollm2-135m"  # cura.models.sources.BUNDLED_NAME (checked equal in tests; that module loads torch)
)
# cura.export.gguf.OUT_TYPES (checked equal in tests; torch-free here)
GGUF_TYPES = ("f16", "f32", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0")


def model_arg(ws: Workspace, model: str | None) -> str:
    """The model source for a command: the bundled name, or the absolute path of a workspace model."""
    if not model or model == BUNDLED_NAME:
        return BUNDLED_NAME
    return str(ws.path(model, must_exist=True))


def folder_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def model_info(ws: Workspace, model: str | None) -> dict:
    """Shape and size of a model source, read without loading weights."""
    from cura.memory import format_bytes, shape_from_source
    from cura.models.sources import bundled_model_path

    source = model_arg(ws, model)
    shape = shape_from_source(source)
    try:
        on_disk = folder_bytes(bundled_model_path() if source == BUNDLED_NAME else Path(source))
    except CuraError:
        on_disk = None
    return {
        "model": model or BUNDLED_NAME,
        "name": shape.name,
        "parameters": shape.total_params,
        "layers": shape.num_layers,
        "hidden_size": shape.hidden_size,
        "heads": shape.num_heads,
        "kv_heads": shape.num_kv_heads,
        "vocab_size": shape.vocab_size,
        "context_length": shape.context_length,
        "disk": format_bytes(on_disk) if on_disk is not None else None,
        "nf4_weights": format_bytes(shape.linear_params * 4.127 / 8),
        "command": jobs.display_command(["estimate", "--model", source]),
    }


_tokenizers: dict[str, object] = {}


def tokenizer_for(source: str):
    """The model's tokenizer (cached per source: loading the bundled one takes seconds)."""
    if source not in _tokenizers:
        from cura.models import load_tokenizer

        _tokenizers[source] = load_tokenizer(source)
    return _tokenizers[source]


def split_errors(message: str) -> tuple[str, list[str]]:
    """A data CuraError as (its first sentence, the `file:line: what` lines after it)."""
    first, *rest = message.split("\n")
    return first, [line for line in rest if line.strip()]


def histogram(lengths: list[int], bins: int = HISTOGRAM_BINS) -> list[dict]:
    """Counts of token lengths in equal-width bins: [{low, high, count}]."""
    low, high = min(lengths), max(lengths)
    width = max(1, -(-(high - low + 1) // bins))
    counts = [0] * bins
    for n in lengths:
        counts[min(bins - 1, (n - low) // width)] += 1
    return [
        {"low": low + i * width, "high": low + (i + 1) * width - 1, "count": c}
        for i, c in enumerate(counts)
        if low + i * width <= high
    ]


def inspect_data(ws: Workspace, data: str, model: str | None, max_length: int | None = None) -> dict:
    """What `cura data inspect` prints, as data: format, rows, lengths, one example, or every bad row."""
    from cura.cli.data import trained_runs
    from cura.data import DataConfig, build_datasets, length_stats

    path = ws.path(data, must_exist=True)
    source = model_arg(ws, model)
    args = ["data", "inspect", str(path), "--model", source]
    options = {"path": str(path), "packing": False, "max_errors": MAX_ROW_ERRORS}
    if max_length:
        options["max_length"] = int(max_length)
        args += ["--max-length", str(max_length)]
    out = {"data": data, "command": jobs.display_command(args), "errors": [], "ok": False}
    try:
        config = DataConfig(**options)
        tokenizer = tokenizer_for(source)
        train, _, report = build_datasets(config, tokenizer)
    except CuraError as exc:
        summary, errors = split_errors(str(exc).replace(str(ws.root) + "/", ""))
        out.update(summary=summary, errors=errors)
        return out
    sample = train[0]
    out.update(
        ok=True,
        format=report.format,
        rows=report.rows_read,
        usable=report.rows_used,
        train_samples=report.train_samples,
        eval_samples=report.eval_samples,
        stats=length_stats(report.lengths),
        histogram=histogram(report.lengths),
        max_length=config.max_length,
        over_max=sum(n > config.max_length for n in report.lengths),
        trained_tokens=report.trained_tokens,
        train_tokens=report.train_tokens,
        template="fallback ChatML" if report.template_is_fallback else "the model's own",
        example=[
            {"text": t, "trained": b}
            for t, b in trained_runs(tokenizer, sample["input_ids"], sample["labels"])
        ],
    )
    return out


def copy_demo_data(ws: Workspace) -> dict:
    """The demo's data (free-text orders -> one JSON shape, `cura.demo`) copied into `data/` of the
    workspace, so a first try needs no file of one's own; then checked as any data file is."""
    from importlib import resources

    from cura.atomic import write_bytes

    for name in ("orders_train.jsonl", "orders_eval.jsonl"):
        target = ws.path(f"data/{name}")
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            write_bytes(target, (resources.files("cura.demo") / name).read_bytes())
    return {"train": "data/orders_train.jsonl", "eval": "data/orders_eval.jsonl"}


def settings_data(ws: Workspace, model: str | None, data: str | None, settings: dict) -> dict:
    """TrainConfig data (nested) from the page's choices; refuses keys outside `EDITABLE`."""
    from cura.config import set_path

    nested: dict = {"model": model_arg(ws, model)}
    if data:
        set_path(nested, "data.path", str(ws.path(data, must_exist=True)))
    for key, value in (settings or {}).items():
        if key not in EDITABLE:
            raise CuraError(f"setting {key!r} cannot be set from the page; allowed: {', '.join(EDITABLE)}")
        if value is None or value == "":
            continue
        set_path(nested, key, value)
    return nested


def settings_flags(settings: dict) -> list[str]:
    """`--key value` for each set value (a checked key: see `settings_data`)."""
    flags = []
    for key, value in (settings or {}).items():
        if key in EDITABLE and value not in (None, ""):
            text = str(value).lower() if isinstance(value, bool) else str(value)
            flags += [f"--{key.replace('_', '-')}", text]
    return flags


def machine_budget() -> tuple[int, str, str]:
    """(bytes, label, device) of this machine: the first GPU when torch sees one, else the RAM."""
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            return props.total_memory, f"this machine's GPU ({props.name})", "cuda"
    except ImportError:
        pass
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    from cura.memory import format_bytes

    return total, f"this machine's memory ({format_bytes(total)})", "cpu"


def plan_run(ws: Workspace, model: str | None, data: str | None, settings: dict, target: str | None) -> dict:
    """The memory plan's terms, the peak, whether it fits `target` (a GPU name, a size, or None for this
    machine) and the changes that make it fit (config key, old, new, why)."""
    from cura.config import from_dict
    from cura.memory import fit, format_bytes, plan, resolve_memory, shape_from_source
    from cura.memory.report import PHASES, fit_to_dict
    from cura.train.config import TrainConfig
    from cura.train.plan import plan_spec, settle_checkpointing

    config = from_dict(TrainConfig, settings_data(ws, model, data, settings))
    if target:
        budget = resolve_memory(target)
        budget_bytes, label, device, bf16 = budget.bytes, budget.label, budget.device or "cuda", budget.bf16
        if budget.device is None:  # a bare size plans GPU memory, as `cura estimate --fit 12GB` does
            label = f"{label} of GPU memory"
    else:
        budget_bytes, label, device = machine_budget()
        bf16 = None
    shape = shape_from_source(config.model)
    config, why = settle_checkpointing(config, device, budget_bytes, native_bf16=bf16, shape=shape)
    spec = plan_spec(config, device, native_bf16=bf16)
    the_plan = plan(shape, spec)
    result = fit(shape, spec, budget_bytes, bf16_ok=bf16 is not False)
    args = ["estimate", "--model", config.model, *settings_flags(settings), "--device", device]
    args += ["--fit", target] if target else ["--fit", f"{budget_bytes // 2**20}MiB"]
    return {
        "terms": [
            {"name": t.name, "bytes": t.bytes, "size": format_bytes(t.bytes), "formula": t.formula}
            for t in the_plan.terms
            if t.bytes
        ],
        "peak_bytes": the_plan.peak_bytes,
        "peak": format_bytes(the_plan.peak_bytes),
        "peak_phase": PHASES[the_plan.peak_phase],
        "budget": label,
        "budget_bytes": budget_bytes,
        "device": device,
        "fit": fit_to_dict(result, label),
        "checkpointing": why,  # how `auto` was decided (None when the settings set it)
        "command": jobs.display_command(args),
    }


# ------------------------------------------------------------------------------------------------- runs


def train_args(ws: Workspace, name: str, model: str | None, data: str, settings: dict) -> list[str]:
    """`cura train` for a run of the page: its model, data, output folder runs/<name>, the settings."""
    from cura.config import from_dict
    from cura.train.config import TrainConfig

    from_dict(TrainConfig, settings_data(ws, model, data, settings))  # every value checked before it runs
    out = ws.run_dir(name)
    args = ["train", "--model", model_arg(ws, model), "--data", str(ws.path(data, must_exist=True))]
    return [*args, "--output", str(out), *settings_flags(settings), "--progress", "false"]


def start_train(ws: Workspace, name: str, model, data, settings, resume: bool = False) -> dict:
    """Start (or with `resume`, continue) run `name` as a real `cura train` process."""
    folder = ws.run_dir(name)
    record = jobs.status(ws.job_dir(name), "train")
    if resume:
        if record is None:
            raise CuraError(f"run {name} was not started from the page; resume it with cura train --resume")
        args = [a for a in record["args"] if a != "--resume"] + ["--resume"]
    else:
        if folder.exists() and any(folder.iterdir()):
            raise CuraError(f"run {name} already exists in runs/; pick another name or resume it")
        args = train_args(ws, name, model, data, settings)
    return jobs.start(ws.job_dir(name), "train", args, ws.root)


def read_json(path: Path) -> dict:
    """A JSON file the run wrote (config.json, summary.json), or {} while it does not exist."""
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def run_config(folder: Path) -> dict:
    """The run's config.json (what `cura train` resolved), or {} before it is written."""
    return read_json(folder / "config.json")


def run_state(ws: Workspace, name: str, since: int = 0) -> dict:
    """A run as the page shows it: job status, metrics rows from `since`, checkpoints, outputs, ETA."""
    folder = ws.run_dir(name)
    train = jobs.status(ws.job_dir(name), "train")
    rows = read_metrics(folder / "metrics.jsonl")
    config = run_config(folder)
    checkpoints = sorted(p.name for p in (folder / "checkpoints").glob("step-*") if p.is_dir())
    state = {
        "name": name,
        "train": train,
        "rows": rows[since:] if since <= len(rows) else rows,
        "total_rows": len(rows),
        "restart": since > len(rows),
        "checkpoints": checkpoints,
        "adapter": (folder / "adapter" / "adapter_config.json").is_file(),
        "summary": (folder / "summary.json").is_file(),
        "completed": bool(read_json(folder / "summary.json").get("completed")),
        "max_steps": config.get("max_steps") or None,
        "model": config.get("model"),
        "data": (config.get("data") or {}).get("path"),
        "eta_seconds": eta(rows, config.get("max_steps") or 0),
        "files": outputs(ws, folder),
    }
    for kind in ("eval", "merge", "export"):
        state[kind] = jobs.status(ws.job_dir(name), kind)
    state["commands"] = next_commands(ws, name) if state["adapter"] else {}
    return state


def eta(rows: list[dict], max_steps: int) -> float | None:
    """Seconds left: the mean step time of the last ten logged steps times the steps left."""
    timed = [r for r in rows if r.get("seconds")]
    if not timed or not max_steps:
        return None
    recent = timed[-10:]
    per_step = sum(r["seconds"] for r in recent) / len(recent)
    return max(0.0, (max_steps - rows[-1].get("step", 0)) * per_step)


def outputs(ws: Workspace, folder: Path) -> list[dict]:
    """Downloadable files of a run: the export, the eval report, the merged model's files."""
    found = []
    for sub in ("export", "eval", "merged"):
        for path in sorted((folder / sub).glob("*")) if (folder / sub).is_dir() else []:
            if path.is_file() and not path.name.startswith("."):
                found.append({"path": ws.relative(path), "size": path.stat().st_size})
    return found


def recorded_base(adapter: Path) -> str:
    """The base source an adapter names: cura's record (`base.source` in cura_adapter.json), else PEFT's
    `base_model_name_or_path`. Read as plain JSON (`cura.adapters.base.read_base_record` reads the same,
    but imports torch, which the page's status polls must not wait for)."""
    cura_record = read_json(adapter / "cura_adapter.json")
    source = (cura_record.get("base") or {}).get("source")
    return source or read_json(adapter / "adapter_config.json").get("base_model_name_or_path") or ""


def adapter_dir(ws: Workspace, name: str) -> Path:
    """The run's adapter folder, once its base (which chat, eval, merge and export load) is known to be
    the bundled model or a model inside the workspace: the page never reads a model from elsewhere."""
    folder = ws.run_dir(name) / "adapter"
    if not (folder / "adapter_config.json").is_file():
        raise CuraError(f"run {name} has no adapter yet; let its training finish (or resume it) first")
    base = recorded_base(folder)
    if base != BUNDLED_NAME:
        ws.path(base, must_exist=True)  # CuraError when the recorded base is outside the workspace
    return folder


def eval_args(ws: Workspace, name: str, data: str | None = None, max_new_tokens: int = 64, limit: int = 20):
    """`cura eval --compare` of run `name` (base vs the adapter) on `data` (default: the run's data)."""
    folder = ws.run_dir(name)
    adapter = adapter_dir(ws, name)
    path = str(ws.path(data, must_exist=True)) if data else run_config(folder).get("data", {}).get("path")
    if not path:
        raise CuraError(f"run {name} records no data file; pick one on the Data screen")
    ws.path(path, must_exist=True)
    args = ["eval", "--adapter", str(adapter), "--data", path, "--compare", "--output", str(folder / "eval")]
    return [*args, "--max-new-tokens", str(int(max_new_tokens)), "--limit", str(int(limit))]


def merge_args(ws: Workspace, name: str) -> list[str]:
    folder = ws.run_dir(name)
    return ["merge", "--adapter", str(adapter_dir(ws, name)), "--output", str(folder / "merged")]


def export_args(ws: Workspace, name: str, out_type: str = "f16") -> list[str]:
    """`cura export gguf` of run `name` (adapter merged in): runs/<name>/export/model.gguf + model.Modelfile
    (+ its verification report); a new export replaces the page's earlier one (`--overwrite`: only files
    cura wrote)."""
    if out_type not in GGUF_TYPES:
        raise CuraError(f"GGUF type must be one of {', '.join(GGUF_TYPES)}, got {out_type!r}")
    output = ws.run_dir(name) / "export" / "model.gguf"
    args = ["export", "gguf", "--adapter", str(adapter_dir(ws, name)), "--output", str(output)]
    return [*args, "--type", out_type, "--overwrite"]


def start_job(ws: Workspace, name: str, kind: str, args: list[str]) -> dict:
    folder = ws.run_dir(name)
    if kind == "export":
        (folder / "export").mkdir(parents=True, exist_ok=True)
    return jobs.start(ws.job_dir(name), kind, args, ws.root)


def next_commands(ws: Workspace, name: str) -> dict:
    """What Evaluate / Export would run for this run (shown before they are started)."""
    try:
        return {
            "eval": jobs.display_command(eval_args(ws, name)),
            "merge": jobs.display_command(merge_args(ws, name)),
            "export": jobs.display_command(export_args(ws, name)),
        }
    except CuraError:
        return {}


def eval_report(ws: Workspace, name: str) -> dict:
    """The `cura eval --compare` report of a run, if there is one: its markdown and whether a chart exists."""
    folder = ws.run_dir(name) / "eval"
    report = folder / "report.md"
    return {
        "report": report.read_text(encoding="utf-8") if report.is_file() else None,
        "chart": ws.relative(folder / "compare.png") if (folder / "compare.png").is_file() else None,
    }
