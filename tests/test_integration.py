"""The product's main job on the bundled real model (SmolLM2-135M-Instruct): the demo and real data sets.

Marked slow (they load the real model); CI runs them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_data_templates import SHARED, first_rows

pytestmark = pytest.mark.slow


def _cura(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="2", TOKENIZERS_PARALLELISM="false")
    return subprocess.run(
        [sys.executable, "-m", "cura", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )


def test_demo_command_trains_and_reports_before_and_after(smollm2_gguf, tmp_path):
    """`cura train` with no data is the demo; a short run shows the table and writes its report."""
    proc = _cura("train", "--max-steps", "4", "--output", "demo", "--progress", "false", cwd=tmp_path)
    assert proc.returncode in (0, 1), proc.stderr[-3000:]  # 1: fine-tuned exact match below the base's
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["completed"] and summary["steps"] == 4
    assert summary["eval_loss_after"] < summary["eval_loss_before"]  # the held-out loss falls within 4 steps
    report = (tmp_path / "demo" / "demo.md").read_text()
    for line in ("held-out loss", "exact match (32 prompts)", "valid JSON", "fine-tuned"):
        assert line in report and line in proc.stdout
    assert (tmp_path / "demo" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("name, options, format", SHARED, ids=[s[0].split("/")[0] for s in SHARED])
def test_real_data_set_fine_tunes_with_one_command(
    smollm2_gguf, shared_data, tmp_path, name, options, format
):
    data = first_rows(shared_data / name, tmp_path / "rows.jsonl", n=40)
    fields = [f"--field={key}={column}" for key, column in options.get("fields", {}).items()]
    flags = "--max-steps 2 --batch-size 2 --seq-len 512 --output run --progress false --eval-batches 2"
    proc = _cura("train", "--data", str(data), *fields, *flags.split(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"({format or 'prompt_completion'})" in proc.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["completed"] and summary["eval_samples"] >= 1  # 5% of 40 rows held out by default
    assert summary["train_loss_first"] > 0 and summary["eval_loss_after"] is not None
