"""Run and output safety (issue 18, part A): one owner per run folder, resume checks what it resumes, a good
checkpoint is good, signals for the whole run, re-saves that kill -9 cannot break. Real processes where a
signal or a kill is involved, each bounded in time; tiny random models (tests/test_train.py's fixtures)."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import test_train
from cura.errors import CuraError
from cura.train import TrainConfig, TrainHooks, train
from cura.train.checkpoint import latest_checkpoint
from cura.train.rundir import LOCK_NAME
from cura.train.signals import RunInterrupted, RunSignals, run_signals
from test_train import _cura, losses, make_config

tiny_source, tiny_data = test_train.tiny_source, test_train.tiny_data  # the fixtures, shared

SRC = str(Path(__file__).resolve().parents[1] / "src")


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------ one owner per folder


def test_a_locked_folder_is_refused_and_a_stale_lock_taken_over(tiny_source, tiny_data, tmp_path):
    """A live owner (another process holding cura's lock) makes a second run fail in one sentence naming it;
    once that owner is killed (-9: its lock file stays behind) the next run takes the lock over with a note."""
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from cura.train.rundir import RunLock; "
            "p = Path(sys.argv[1]); p.mkdir(); RunLock(p).acquire(print); print('locked', flush=True); "
            "time.sleep(120)",
            str(out),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=SRC),
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        for flags in ({}, {"resume": True}, {"overwrite": True}):
            with pytest.raises(CuraError, match=f"in use by another cura run .PID {holder.pid} on host "):
                train(make_config(tiny_source, tiny_data, out, max_steps=2, **flags))
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert (out / LOCK_NAME).is_file()  # kill -9 leaves the file; the kernel dropped the flock
    said = []
    result = train(make_config(tiny_source, tiny_data, out, max_steps=2), say=said.append)
    assert result["completed"]
    assert any("stale lock" in s and f"PID {holder.pid}" in s for s in said)
    assert not (out / LOCK_NAME).exists()  # released at the end


def test_overwrite_clears_the_earlier_run_and_output_never_inside_data(tiny_source, tiny_data, tmp_path):
    out = tmp_path / "run"
    train(make_config(tiny_source, tiny_data, out, max_steps=4, save_every=1, keep_checkpoints=3))
    (out / "notes.txt").write_text("mine")  # a user's file beside the run is never deleted
    again = train(make_config(tiny_source, tiny_data, out, max_steps=2, save_every=2, overwrite=True))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]
    assert Path(again["checkpoint"]).is_dir() and (out / "notes.txt").read_text() == "mine"
    assert [r["step"] for r in rows(out)] == [1, 2]
    # a later --resume continues the new run (not the old one's step-4 checkpoint)
    resumed = train(
        make_config(tiny_source, tiny_data, out, max_steps=3, resume=True, allow_change="max_steps")
    )
    assert resumed["steps"] == 3 and [r["step"] for r in rows(out)] == [1, 2, 3]

    inside = tiny_data / "runs" / "x"  # the data folder as data.path: the run's JSON would become rows
    config = make_config(tiny_source, tiny_data, inside)
    config.data.path = str(tiny_data)
    with pytest.raises(CuraError, match="inside the data folder .* 'data.path'"):
        train(config)
    assert not (tiny_data / "runs").exists()


# ------------------------------------------------------------------------------- resume checks what it resumes


def test_resume_refuses_each_kind_of_change_and_allow_change_takes_effect(tiny_source, tiny_data, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    model, data = tmp_path / "model", tmp_path / "data"  # copies this test may change in place
    shutil.copytree(tiny_source, model)
    shutil.copytree(tiny_data, data)
    model, out = str(model), tmp_path / "run"
    base = dict(max_steps=4, save_every=2, schedule="constant")
    train(make_config(model, data, out, **base))
    (out / "checkpoints" / "step-000004").rename(out / "checkpoints" / "hidden")  # resume from step 2
    before = (out / "metrics.jsonl").read_text()

    cases = [
        ({"lr": 1e-2}, "lr: 0.005 -> 0.01", "--allow-change lr"),
        ({"seed": 4}, "seed: 3 -> 4", "--allow-change seed"),
        ({"batch_size": 3}, "batch_size: 2 -> 3", "--allow-change batch_size"),
        ({"max_steps": 8}, "max_steps: 4 -> 8", "--allow-change max_steps"),
        ({"optimizer": "adamw"}, r"optimizer: paged_adamw -> adamw \(optimizer cannot change", None),
        ({"method": "lora"}, "was trained on .*NF4.* not on .*full precision", None),
    ]
    for change, listed, advice in cases:
        with pytest.raises(CuraError, match=listed) as info:
            train(make_config(model, data, out, resume=True, **{**base, **change}))
        assert (advice in str(info.value)) if advice else "--allow-change" not in str(info.value)
    for section, key, value, listed in (
        ("lora", "alpha", 16.0, "lora.alpha: 8.0 -> 16.0"),
        ("data", "max_length", 96, "data.max_length: 128 -> 96"),
    ):
        config = make_config(model, data, out, resume=True, **base)
        setattr(getattr(config, section), key, value)
        with pytest.raises(CuraError, match=listed):
            train(config)
    rows_text = (data / "train.jsonl").read_text()
    (data / "train.jsonl").write_text("".join(reversed(rows_text.splitlines(keepends=True))))
    with pytest.raises(CuraError, match="data.path: the saved file contents -> other contents"):
        train(make_config(model, data, out, resume=True, **base))
    (data / "train.jsonl").write_text(rows_text)
    weights_file = Path(model) / "model.safetensors"
    original = weights_file.read_bytes()
    weights = load_file(str(weights_file))  # the same shapes, other values: another model of the same shape
    key = next(k for k in weights if k.endswith("down_proj.weight"))
    weights[key] = weights[key] * 1.01
    save_file(weights, str(weights_file), metadata={"format": "pt"})
    with pytest.raises(CuraError, match="model: the saved weights -> other weights"):
        train(make_config(model, data, out, resume=True, **base))
    weights_file.write_bytes(original)
    with pytest.raises(CuraError, match="--allow-change names lrr, which no config key"):
        train(make_config(model, data, out, resume=True, allow_change="lrr", **base))
    assert (out / "metrics.jsonl").read_text() == before  # nothing of the run was touched

    # allowed: the new lr and length take effect (constant schedule: the logged lr is the new one)
    said = []
    resumed = train(
        make_config(
            model, data, out, resume=True, allow_change="lr,max_steps", **{**base, "max_steps": 5}
        ).replace(lr=1e-2),
        say=said.append,
    )
    assert resumed["completed"] and resumed["steps"] == 5
    assert [r["lr"] for r in rows(out)] == [5e-3, 5e-3, 1e-2, 1e-2, 1e-2]
    assert any("changed settings: lr: 0.005 -> 0.01; max_steps: 4 -> 5" in s for s in said)
    record = json.loads((out / "cura_run.json").read_text())
    assert record["changes"] == [{"step": 2, "changed": {"lr": [5e-3, 1e-2], "max_steps": [4, 5]}}]
    assert record["settings"]["lr"] == 1e-2  # the next resume compares with the new values


# ----------------------------------------------------------------------------- a good checkpoint is good


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tiny_source, tiny_data, tmp_path):
    reference = tmp_path / "reference"
    train(make_config(tiny_source, tiny_data, reference, max_steps=4))
    out = tmp_path / "run"
    hooks = TrainHooks(on_step_end=lambda s, _: s == 3 and os.kill(os.getpid(), signal.SIGTERM))
    train(make_config(tiny_source, tiny_data, out, max_steps=4, keep_checkpoints=3), hooks=hooks)
    assert latest_checkpoint(out / "checkpoints").name == "step-000003"
    adapter = out / "checkpoints" / "step-000003" / "adapter_model.safetensors"
    adapter.write_bytes(os.urandom(64))  # random bytes where the weights were
    said = []
    resumed = train(
        make_config(tiny_source, tiny_data, out, max_steps=4, keep_checkpoints=3, resume=True),
        say=said.append,
    )
    assert any("step-000003 is damaged" in s and "falling back" in s for s in said)
    assert any("resuming from" in s and "step-000002" in s for s in said)
    assert resumed["completed"] and losses(out) == losses(reference)  # bitwise: steps 3-4 redone


def test_learning_rate_bounds_are_checked():
    for lr in (float("inf"), float("nan"), 0.0, -1e-4, 1e6, 1.5):
        with pytest.raises(CuraError, match="config key 'lr' must be a learning rate above 0 and at most 1"):
            TrainConfig(lr=lr)
    assert TrainConfig(lr=1.0).lr == 1.0


def test_weight_guard_and_stall_detection():
    from cura.train.guard import HUGE, stalled, weights_problem

    good = [torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.zeros(0))]
    assert weights_problem(good) is None
    assert weights_problem([torch.tensor([1.0, float("nan")])]) == "non-finite (inf or NaN) LoRA weights"
    assert weights_problem([torch.tensor([1.0, -float("inf")])]) == "non-finite (inf or NaN) LoRA weights"
    assert weights_problem([torch.tensor([1.0, -HUGE * 10])]) == "LoRA weights as large as 1e+09"
    assert stalled([2.5] * 5) and not stalled([2.5] * 4)  # too few steps to say
    assert not stalled([2.5, 2.5, 2.5, 2.5, 2.49]) and not stalled([2.5] * 4 + [float("nan")])


def test_a_poisoning_update_is_never_saved_and_the_advice_works(tiny_source, tiny_data, tmp_path):
    """Step 3's update runs with lr = inf (its loss and gradients are finite): the weights become NaN. The
    guard stops the run at once, no checkpoint or adapter holds those weights, and the printed advice
    (resume with --allow-change lr and a smaller lr) finishes the run."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    calls = {"n": 0}

    def poison(optimizer, args, kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            for group in optimizer.param_groups:
                group["lr"] = float("inf")

    out = tmp_path / "run"
    handle = register_optimizer_step_pre_hook(poison)
    try:
        with pytest.raises(
            CuraError, match="step 3: the update left non-finite .* --resume --allow-change lr"
        ):
            train(make_config(tiny_source, tiny_data, out, max_steps=6, save_every=1))
    finally:
        handle.remove()
    assert latest_checkpoint(out / "checkpoints").name == "step-000002"
    assert not (out / "checkpoints" / "step-000003").exists() and not (out / "adapter").exists()
    resumed = train(
        make_config(
            tiny_source, tiny_data, out, max_steps=6, save_every=1, resume=True, allow_change="lr"
        ).replace(lr=5e-4)
    )
    assert resumed["completed"] and all(math.isfinite(loss) for _, loss in losses(out))


# ----------------------------------------------------------------------------------- signals, whole run


def test_signals_in_each_phase(tiny_source, tiny_data, tmp_path):
    """setup: stop at once, nothing written (the CLI exits 130); final evaluation with --save-every 0: the
    evaluation stops, the only checkpoint, the adapter and the summary are written; save: the save goes on."""
    out = tmp_path / "setup"
    hooks = TrainHooks(on_model_ready=lambda m, t: os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(RunInterrupted):
        train(make_config(tiny_source, tiny_data, out), hooks=hooks)
    assert not (out / "checkpoints").exists() and not (out / "adapter").exists()
    assert not (out / LOCK_NAME).exists()

    out = tmp_path / "final-eval"
    state = {"done": False}

    def on_model_ready(model, tokenizer):
        def during_final_eval(module, inputs):
            if not module.training and state["done"] and not state.get("sent"):
                state["sent"] = True
                os.kill(os.getpid(), signal.SIGTERM)

        model.get_decoder().register_forward_pre_hook(during_final_eval)  # what the loss calls

    hooks = TrainHooks(on_model_ready=on_model_ready, on_step_end=lambda s, _: state.update(done=s == 3))
    result = train(make_config(tiny_source, tiny_data, out, max_steps=3, save_every=0), hooks=hooks)
    assert state["sent"] and result["interrupted_by"] == "SIGTERM" and result["steps"] == 3
    assert result["eval_loss_after"] is None
    assert latest_checkpoint(out / "checkpoints").name == "step-000003"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["checkpoint"].endswith("step-000003") and (out / "loss.png").is_file()

    with run_signals() as flag:  # during a save the signal is noted and the save goes on
        assert isinstance(flag, RunSignals)
        flag.phase = "save"
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert flag.requested == "SIGTERM"
        flag.phase = "setup"


def test_cli_sigterm_while_loading_exits_130_with_nothing_written(tiny_source, tiny_data, tmp_path):
    out = tmp_path / "cli"
    args = ["train", "--model", tiny_source, "--data", str(tiny_data / "train.jsonl"), "--output", str(out)]
    proc = _cura(*args, "--max-steps", "50")
    deadline, seen = time.time() + 120, ""
    while time.time() < deadline and "data:" not in seen:  # the rows are read: the model loads next
        line = proc.stderr.readline()
        if not line:
            break
        seen += line
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, seen + err
    assert "Traceback" not in err
    assert not (out / "checkpoints").exists() and not (out / "adapter").exists()


# --------------------------------------------------------------------------------- kill -9 during saves


RESAVER = """
import sys, os
from pathlib import Path
from cura.atomic import atomic_folder
folder = Path(sys.argv[1])
n = 0
while True:
    n += 1
    with atomic_folder(folder) as tmp:
        payload = os.urandom(1 << 20)
        (tmp / "weights.bin").write_bytes(payload)
        (tmp / "done.txt").write_text(str(len(payload)))
    print(n, flush=True)
"""


def test_kill_9_during_re_saves_never_loses_the_folder(tmp_path):
    """A process re-saving one folder over and over (the checkpoint re-save's path) is killed at random
    moments: the folder is always there and whole afterwards (RENAME_EXCHANGE, never delete first)."""
    folder = tmp_path / "step-000006"
    rng = random.Random(0)
    for trial in range(6):
        proc = subprocess.Popen(
            [sys.executable, "-c", RESAVER, str(folder)],
            stdout=subprocess.PIPE,
            text=True,
            env=dict(os.environ, PYTHONPATH=SRC),
        )
        assert proc.stdout.readline()  # at least one complete save
        time.sleep(rng.uniform(0.0, 0.3))
        proc.kill()
        proc.wait(timeout=30)
        assert (folder / "done.txt").is_file(), trial
        assert int((folder / "done.txt").read_text()) == (folder / "weights.bin").stat().st_size == 1 << 20


def test_kill_9_during_training_saves_then_resume_is_exact(tiny_source, tiny_data, tmp_path):
    """kill -9 at random moments of a run that checkpoints every step (so most kills land in or near a save),
    then --resume: every logged loss equals the uninterrupted run's."""
    reference = tmp_path / "reference"
    config = make_config(tiny_source, tiny_data, reference, max_steps=6, save_every=1)
    train(config)
    out = tmp_path / "killed"
    args = [
        "train",
        "--model",
        tiny_source,
        "--data",
        str(tiny_data / "train.jsonl"),
        "--eval-data",
        str(tiny_data / "eval.jsonl"),
        "--output",
        str(out),
        "--set",
        "data.max_length=128",
        "--lora.r",
        "4",
        "--lora.alpha",
        "8",
        "--lora.dropout",
        "0.1",
        "--lr",
        "5e-3",
        "--max-steps",
        "6",
        "--batch-size",
        "2",
        "--save-every",
        "1",
        "--seed",
        "3",
        "--compute-dtype",
        "float32",
        "--progress",
        "false",
    ]
    rng = random.Random(1)
    proc = _cura(*args)  # one kill (each process start costs seconds); the re-save test above kills more
    start = time.time()
    while time.time() - start < 120 and proc.poll() is None:
        if latest_checkpoint(out / "checkpoints") is not None:
            break
        time.sleep(0.01)
    time.sleep(rng.uniform(0.0, 0.2))
    proc.kill()
    proc.communicate(timeout=30)
    assert latest_checkpoint(out / "checkpoints") is not None
    proc = _cura(*args, "--resume")
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    assert losses(out) == losses(reference)
