"""Resume checks what it resumes: the run record (`cura_run.json`) against the config of the resuming run.

The record, written when a run starts, holds what fixes its trajectory:

    settings   every config key that changes what is trained (not output, logging, eval or checkpoint keys)
    model      the source and its weights' fingerprint (name, size and a hash of the first and last MiB of
               each weight file: a changed or replaced file is seen without reading gigabytes) and a hash of
               the loaded model's tensor names and shapes
    data       each training file's size and content hash (the whole file up to 256 MiB, else its ends)

A resume with any difference is refused in one sentence that lists them, unless `--allow-change` names
each changed key; then the new values take effect (`apply_settings`: learning rate, betas, weight decay,
and the schedule rebuilt for the new length) and the change is appended to the record's `changes`.
The model, its quantization, the method, the LoRA shape and the optimizer can never change: the
checkpoint's weights and optimizer state only mean something for the ones they were trained with.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from cura.atomic import write_json
from cura.config import to_dict
from cura.errors import CuraError
from cura.train.rundir import RUN_RECORD

NEUTRAL = {
    "output_dir",
    "resume",
    "overwrite",
    "allow_change",
    "progress",
    "threads",
    "cpu_malloc",
    "log_every",
    "save_every",
    "keep_checkpoints",
    "eval_every",
    "eval_batches",
    "max_bad_steps",
    "data.eval_path",
    "data.max_errors",
    "report_to",  # trackers may be added or dropped on a resume (train/tracking.py)
    "optim_paging",  # where the optimizer state lives, not its values
    "force",  # starting although the plan does not fit changes nothing trained
    "gradient_checkpointing",  # memory, not numbers: bit-identical weights (tests/test_train.py); `auto` may differ
}
"""Config keys that do not change the trained weights: never compared."""

FIXED_PREFIXES = ("model", "method", "quant_type", "blocksize", "double_quant", "lora.", "optimizer", "fsdp")
"""Keys `--allow-change` cannot name: the checkpoint is meaningless with other values."""

_HEAD = 1 << 20
_WHOLE_LIMIT = 256 << 20


def flat_settings(config) -> dict[str, Any]:
    """The trajectory keys of `config` as {dotted key: value} (JSON values)."""
    out: dict[str, Any] = {}

    def walk(prefix: str, data: dict[str, Any]) -> None:
        for key, value in data.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict) and key != "fields":
                walk(name + ".", value)
            elif name not in NEUTRAL:
                out[name] = value

    walk("", json.loads(json.dumps(to_dict(config))))
    return out


def file_digest(path: Path, *, whole: bool) -> dict[str, Any]:
    """Size and sha256 of a file: all of it when `whole` and it is under 256 MiB, else its first and last MiB."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if whole and size <= _WHOLE_LIMIT:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        else:
            digest.update(f.read(_HEAD))
            if size > 2 * _HEAD:
                f.seek(size - _HEAD)
                digest.update(f.read(_HEAD))
    return {"name": path.name, "size": size, "sha256": digest.hexdigest()}


def model_identity(config, model) -> dict[str, Any]:
    """Where the base came from, its weight files' fingerprint, and the shapes of the loaded model."""
    from cura.models import resolve_source

    kind, path = resolve_source(config.model)
    path = Path(path)
    weights = (
        [path]
        if path.is_file()
        else sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".gguf", ".bin"))
    )
    shapes = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        shapes.update(f"{name}:{tuple(tensor.shape)};".encode())
    return {
        "source": str(path.resolve()),
        "kind": kind,
        "weights": [file_digest(p, whole=False) for p in weights],
        "shapes": shapes.hexdigest(),
    }


def data_identity(config) -> list[dict[str, Any]]:
    """Size and content hash of each training data file."""
    from cura.data.readers import data_files

    if not config.data.path:
        return []
    return [file_digest(p, whole=True) for p in data_files(config.data.path)]


def run_record(config, model) -> dict[str, Any]:
    """The content of cura_run.json for a run of `config` on the loaded `model`."""
    return {
        "format": 1,
        "settings": flat_settings(config),
        "model": model_identity(config, model),
        "data": data_identity(config),
        "changes": [],
    }


def write_run_record(out: Path, record: dict[str, Any]) -> None:
    write_json(out / RUN_RECORD, record)


def read_run_record(out: Path) -> dict[str, Any] | None:
    """The saved record, or for a run written before records existed one made of its config.json only."""
    path = out / RUN_RECORD
    if path.is_file():
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CuraError(f"{path} is unreadable ({exc}); resume is refused: start a new run") from None
    config = out / "config.json"
    if config.is_file():
        from cura.config import from_dict
        from cura.train.config import TrainConfig

        try:
            saved = from_dict(TrainConfig, json.loads(config.read_text(encoding="utf-8")))
        except (OSError, ValueError, CuraError):
            return None
        return {"format": 0, "settings": flat_settings(saved), "changes": []}
    return None


def differences(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{key: (old, new)} for every setting, the model and the data that differ."""
    changed: dict[str, tuple[Any, Any]] = {}
    old_s, new_s = saved.get("settings", {}), current["settings"]
    for key in sorted(set(old_s) | set(new_s)):
        if key in old_s and key in new_s and old_s[key] != new_s[key]:
            changed[key] = (old_s[key], new_s[key])
    old_m, new_m = saved.get("model"), current["model"]
    if old_m is not None:
        for part, label in (("weights", "weights"), ("shapes", "tensor shapes"), ("source", "path")):
            if old_m.get(part) != new_m.get(part) and "model" not in changed:
                changed["model"] = (f"the saved {label}", f"other {label}")
    if saved.get("data") is not None and saved["data"] != current["data"]:
        changed.setdefault("data.path", ("the saved file contents", "other contents"))
    return changed


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."


def check_resume(out: Path, config, model) -> tuple[dict[str, Any], dict[str, tuple[Any, Any]]]:
    """(the record to keep, the allowed changes); CuraError listing the changes `config.allow_change` does
    not name (or that can never change)."""
    current = run_record(config, model)
    saved = read_run_record(out)
    if saved is None:
        return current, {}
    changed = differences(saved, current)
    allowed = {k.strip() for k in (config.allow_change or "").split(",") if k.strip()}
    unknown = sorted(k for k in allowed if k not in current["settings"] and k != "model")
    if unknown:
        raise CuraError(
            f"--allow-change names {', '.join(unknown)}, which no config key of the run is; use the keys as "
            "in --help (e.g. lr,max_steps)"
        )
    fixed = [k for k in changed if k.startswith(FIXED_PREFIXES)]
    refused = [k for k in changed if k not in allowed or k in fixed]
    if refused:
        listing = "; ".join(f"{k}: {_short(changed[k][0])} -> {_short(changed[k][1])}" for k in refused)
        movable = [k for k in refused if k not in fixed]
        how = (
            f"resume with the run's own settings, or pass --allow-change {','.join(movable)} to continue "
            "with the new values"
            if movable
            else "resume with the run's own settings"
        )
        never = f" ({', '.join(fixed)} cannot change on resume: train into a new --output)" if fixed else ""
        raise CuraError(f"--resume of {out} refused, the run's settings changed: {listing}{never}; {how}")
    record = dict(saved) if saved.get("format") else current
    record.setdefault("changes", [])
    record["settings"], record["model"], record["data"] = (
        current["settings"],
        current["model"],
        current["data"],
    )
    return record, changed


def apply_settings(run, state, changed: dict[str, tuple[Any, Any]]) -> None:
    """Make the allowed changes take effect on the restored optimizer and schedule (which hold the old ones).

    The schedule's base learning rate and multiplier are rebuilt from the new config and its length
    (`run.total_steps`), and the current learning rate set to what the new schedule gives at this step."""
    from cura.train.steps import lr_lambda

    if not changed:
        return
    c = run.config
    factor = lr_lambda(c.schedule, c.warmup_steps, run.total_steps)
    sched = run.scheduler
    sched.base_lrs = [c.lr for _ in run.optimizer.param_groups]
    sched.lr_lambdas = [factor for _ in run.optimizer.param_groups]
    for group in run.optimizer.param_groups:
        group["initial_lr"] = c.lr
        group["lr"] = c.lr * factor(sched.last_epoch)
        group["weight_decay"] = c.weight_decay
        if "betas" in group:
            group["betas"] = (c.adam_beta1, c.adam_beta2)
    sched._last_lr = [g["lr"] for g in run.optimizer.param_groups]


def record_changes(out: Path, record: dict[str, Any], changed: dict, step: int, say) -> None:
    """Append the allowed changes to the record, write it, and say them."""
    if changed:
        record["changes"].append({"step": step, "changed": {k: list(v) for k, v in changed.items()}})
        say(
            f"resuming at step {step} with changed settings: "
            + "; ".join(f"{k}: {_short(a)} -> {_short(b)}" for k, (a, b) in changed.items())
        )
    write_run_record(out, record)
