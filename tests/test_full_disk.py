"""A full disk and a read-only one (issue 18): real small file systems (tmpfs mounted in tmp_path, so the
kernel itself says ENOSPC / EROFS), never a mocked write. Each needs root and a kernel that lets it mount;
elsewhere the tests skip and say why. Every mount is unmounted by its fixture, whatever the test did."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

import test_train
from cura.train import train
from cura.train.checkpoint import latest_checkpoint
from test_train import _cura, losses, make_config

tiny_source, tiny_data = test_train.tiny_source, test_train.tiny_data  # the fixtures, shared


@pytest.fixture
def small_disk(tmp_path):
    """`small_disk(kib, read_only=False)`: a tmpfs of `kib` KiB mounted at a new folder under tmp_path."""
    if os.name != "posix" or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs (a real full disk) needs root")
    mounted: list[Path] = []

    def mount(kib: int, read_only: bool = False) -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(where)],
            capture_output=True,
            timeout=30,
        )
        if done.returncode != 0:
            pytest.skip(f"mounting a tmpfs is not permitted here: {done.stderr.decode().strip()}")
        mounted.append(where)
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True, timeout=30)
        return where

    try:
        yield mount
    finally:
        for where in reversed(mounted):
            subprocess.run(["umount", "-l", str(where)], timeout=30)


def kib(folder: Path) -> int:
    """The KiB a folder's files take on a tmpfs (each file rounded up to 4 KiB pages)."""
    return sum(-(-p.stat().st_size // 4096) * 4 for p in folder.rglob("*") if p.is_file())


def one_error(err: str) -> str:
    """The single `error: ...` line of a failed command (and no traceback anywhere)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def cli_args(source: str, data: Path, out: Path) -> list[str]:
    """`cura train` with make_config's settings (so its losses equal an in-process run's), saving every step."""
    return [
        *("train", "--model", source, "--data", str(data / "train.jsonl")),
        *("--eval-data", str(data / "eval.jsonl"), "--output", str(out), "--set", "data.max_length=128"),
        *("--lora.r", "4", "--lora.alpha", "8", "--lora.dropout", "0.1", "--lr", "5e-3", "--max-steps", "6"),
        *("--batch-size", "2", "--save-every", "1", "--seed", "3", "--compute-dtype", "float32"),
        *("--progress", "false"),
    ]


def test_a_full_disk_mid_run_keeps_the_last_checkpoint_and_resume_continues(
    tiny_source, tiny_data, tmp_path, small_disk
):
    """The disk fills while a checkpoint is written: one sentence, exit 2, the earlier checkpoints whole and
    no temporaries; the folder copied to a disk with room resumes and ends where an uninterrupted run does."""
    reference = tmp_path / "reference"
    train(make_config(tiny_source, tiny_data, reference, max_steps=6, save_every=1))
    checkpoint = kib(reference / "checkpoints" / "step-000006")
    # room for the run's small files and two checkpoints (keep_checkpoints=2), not for a third being written
    disk = small_disk(int(2.5 * checkpoint) + 32)
    out = disk / "run"
    proc = _cura(*cli_args(tiny_source, tiny_data, out))
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 2, err
    line = one_error(err)
    assert "no space left on the device" in line and str(out / "checkpoints") in line, line
    assert "/." not in line  # it names the checkpoint, not a temporary that is gone
    saved = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert saved and all(not name.startswith(".") for name in saved), saved  # no temporaries left
    last = latest_checkpoint(out / "checkpoints")
    assert last is not None and last.name == saved[-1] and last.name < "step-000006"
    assert f"nothing is lost: {last} is the last complete checkpoint" in line and "--resume" in line
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    said: list[str] = []
    result = train(
        make_config(tiny_source, tiny_data, moved, max_steps=6, save_every=1, resume=True), say=said.append
    )
    assert any("resuming from" in s and last.name in s for s in said), said
    assert result["completed"] and losses(moved) == losses(reference)


def test_merge_and_gguf_export_to_a_full_disk_leave_nothing(tiny_source, tiny_data, tmp_path, small_disk):
    """`cura merge` and `cura export gguf` onto a disk too small for them: one sentence each, exit 2, and the
    disk is empty afterwards (no half file under the final name, no temporary)."""
    run = tmp_path / "run"
    train(make_config(tiny_source, tiny_data, run, max_steps=1))
    disk = small_disk(128)  # the tiny model's weights alone need more
    merge = [
        "merge",
        "--model",
        tiny_source,
        "--adapter",
        str(run / "adapter"),
        "--output",
        str(disk / "merged"),
    ]
    export = ["export", "gguf", "--model", tiny_source, "--adapter", str(run / "adapter")]
    export += ["--output", str(disk / "tiny.gguf"), "--type", "f32", "--no-verify"]
    for args in (merge, export):
        proc = _cura(*args)
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 2, err
        assert "no space left on the device" in one_error(err)
        assert sorted(os.listdir(disk)) == [], args


def test_a_read_only_output_is_refused_before_anything_loads(tiny_source, tiny_data, small_disk):
    disk = small_disk(64, read_only=True)
    for out in (disk, disk / "run"):
        proc = _cura(
            "train", "--model", tiny_source, "--data", str(tiny_data / "train.jsonl"), "--output", str(out)
        )
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, err
        line = one_error(err)
        assert "is not writable (permissions or a read-only file system); choose another --output" in line
        assert "data:" not in err and "model " not in err  # refused before the data or the model were read
