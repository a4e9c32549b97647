"""Checkpoints that never damage a run.

A checkpoint is a folder `checkpoints/step-000050/` holding everything an exact resume needs:

    adapter_model.safetensors + adapter_config.json   the LoRA weights (PEFT layout)
    optimizer.safetensors                             every tensor of the optimizer state
    trainer_state.json                                `TrainerState` (step, data position, counters),
                                                      the scheduler, optimizer param groups and scalar state
    rng.safetensors                                   torch (and CUDA) RNG states

It is written into a temporary sibling folder (`cura.atomic.atomic_folder`) and renamed into place only when
complete, so an interrupted save leaves the previous checkpoint untouched and `latest_checkpoint` ignores
the debris (and `trainer_state.json`, written last, marks a complete folder). Its files are flushed to
disk before the rename, and a re-save of the same step swaps the new folder with the old in one rename
(`cura.atomic.replace_folder`), so no moment exists without a complete copy. On resume,
`resumable_checkpoint` reads each candidate whole (every file parses, the adapter's weights are finite)
and falls back to the previous complete checkpoint, with a note, when the newest is damaged. No
pickle is involved: tensors go through safetensors, the rest through JSON.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from cura.atomic import atomic_folder
from cura.errors import CuraError
from cura.safetensors_check import load_safetensors

_STEP_DIR = re.compile(r"^step-(\d+)$")
COMPLETE_MARKER = "trainer_state.json"


@dataclass
class TrainerState:
    """What the loop counts, written to trainer_state.json with every checkpoint and restored on resume.

    The RNG states are tensors and travel beside it in rng.safetensors (restored by `load_checkpoint`); the
    optimizer and scheduler states are their own objects' `state_dict`s. Field names are those of the
    checkpoints written before this class existed, so those still resume.
    """

    step: int = 0  # optimizer steps done
    total_steps: int = 0
    epoch: int = 0  # data position: the epoch of the next micro-batch ...
    index: int = 0  # ... and its index in that epoch's order
    eval_loss_before: float | None = None  # held-out loss of the base model (measured once, kept on resume)
    eval_metrics_before: dict[str, float] | None = None  # preference objectives: held-out metrics of the base
    last_eval_loss: float | None = None  # the latest held-out loss measured during training
    bad_streak: int = 0  # non-finite steps in a row (the run stops at config.max_bad_steps)
    skipped: int = 0  # non-finite steps skipped in all
    world_size: int = 1  # processes that trained it (torchrun ranks); a resume must use as many

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainerState:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def checkpoint_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:06d}"


def _optimizer_to_flat(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, pstate in state_dict["state"].items():
        for name, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for idx, values in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> dict[str, torch.Tensor]:
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            states[f"cuda.{i}"] = s
    return states


def set_rng_state(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["torch"])
    cuda = [states[k] for k in sorted(states) if k.startswith("cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(
    root: Path,
    state: TrainerState,
    *,
    save_adapter_to,  # callable(folder) writing the adapter files
    optimizer: torch.optim.Optimizer,
    scheduler,
    keep: int = 2,
    extra_rng: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the checkpoint of `state.step` atomically and prune old ones, keeping the newest `keep`.
    `extra_rng`: the other ranks' RNG states (`cura.train.distributed.World.gather_rng`), kept beside ours."""
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(root, state.step)
    with atomic_folder(
        final
    ) as tmp:  # replaces a re-save of the same step (the final save after an interval)
        save_adapter_to(tmp)
        tensors, meta = _optimizer_to_flat(optimizer.state_dict())
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        rng = {**rng_state(), **(extra_rng or {})}
        save_file({k: v.contiguous() for k, v in rng.items()}, str(tmp / "rng.safetensors"))
        record = dict(state.to_json(), optimizer=meta, scheduler=scheduler.state_dict())
        # trainer_state.json is written last: its presence marks the folder as complete.
        (tmp / COMPLETE_MARKER).write_text(json.dumps(record, indent=2, sort_keys=True), encoding="utf-8")
    _prune(root, keep)
    return final


def _complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / COMPLETE_MARKER).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def _prune(root: Path, keep: int) -> None:
    for _, path in _complete_checkpoints(root)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def checkpoint_problem(path: Path) -> str | None:
    """None when every file of the checkpoint `path` reads back and its adapter weights are finite, else
    what is wrong (a damaged file, a truncated one, NaN weights)."""
    try:
        state = json.loads((path / COMPLETE_MARKER).read_text(encoding="utf-8"))
        if not isinstance(state, dict) or "optimizer" not in state or "scheduler" not in state:
            return f"{COMPLETE_MARKER} lacks the optimizer or scheduler state"
        for name in ("optimizer.safetensors", "rng.safetensors"):
            load_safetensors(path / name)
        adapter = load_safetensors(path / "adapter_model.safetensors")
    except Exception as exc:  # a damaged file raises whatever its parser raises (SafetensorError, ...)
        return f"{type(exc).__name__}: {str(exc)[:120]}"
    if not all(bool(torch.isfinite(t).all()) for t in adapter.values()):
        return "its adapter weights are not finite"
    return None


def resumable_checkpoint(root: Path, say) -> Path | None:
    """The newest complete checkpoint that reads back whole (`checkpoint_problem`); damaged newer ones are
    skipped with a note (and left on disk for the user to look at)."""
    for _, path in reversed(_complete_checkpoints(root)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        say(f"checkpoint {path} is damaged ({problem}): falling back to the previous complete one")
    return None


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint folder, ignoring temporary and incomplete ones."""
    found = _complete_checkpoints(root)
    return found[-1][1] if found else None


def load_checkpoint(
    path: Path, *, optimizer: torch.optim.Optimizer, scheduler, optimizer_file: str = "optimizer.safetensors"
) -> TrainerState:
    """Restore optimizer, scheduler and RNG from `path`; returns the trainer state (step, data position...).
    `optimizer_file`: under --fsdp rank r > 0 reads its own shard (`cura.train.fsdp.optimizer_file`)."""
    try:
        state = json.loads((path / COMPLETE_MARKER).read_text(encoding="utf-8"))
        tensors = load_safetensors(path / optimizer_file)  # headers checked: a damaged file is
        rng = load_safetensors(path / "rng.safetensors")  # a CuraError (cura.safetensors_check)
    except (OSError, ValueError) as exc:  # ValueError: bad JSON, bytes that are not UTF-8
        raise CuraError(
            f"checkpoint {path} is unreadable ({exc}); delete it to resume from an earlier one"
        ) from None
    optimizer.load_state_dict(_optimizer_from_flat(tensors, state.pop("optimizer")))
    scheduler.load_state_dict(state.pop("scheduler"))
    set_rng_state(rng)
    return TrainerState.from_json(state)
