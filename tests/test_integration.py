"""The product's main job on the bundled real model (SmolLM2-135M-Instruct): the demo and real data sets.

Marked slow (they load the real model); CI runs them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from test_data_templates import SHARED, first_rows

pytestmark = pytest.mark.slow


# Only a guard against a hang, never a speed check: each run is bounded by its work (steps, prompts), and
# this is 10x the slowest normal run on a loaded 2-core machine (speed lives in bench/).
HANG_GUARD_SECONDS = 3600


def _cura(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="2", TOKENIZERS_PARALLELISM="false")
    return subprocess.run(
        [sys.executable, "-m", "cura", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_SECONDS,
    )


def _percentages(report: str, label: str) -> tuple[int, int]:
    """(base, fine-tuned) percentages of a row of the demo's table, e.g. 'exact match (32 prompts)  0%  88%'."""
    line = next(line for line in report.splitlines() if line.startswith(label))
    base, tuned = re.findall(r"(\d+)%", line)
    return int(base), int(tuned)


def test_demo_command_trains_and_the_fine_tuned_model_is_better(smollm2_gguf, tmp_path):
    """`cura train` with no data is the demo: its default 30 steps (README: about 3.5 minutes on 2 cores)
    must make the model better on the held-out orders, and the command says so with exit code 0 (1 would
    mean the fine-tuned exact match fell below the base's)."""
    proc = _cura("train", "--output", "demo", "--progress", "false", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["completed"] and summary["steps"] == 30
    assert summary["eval_loss_after"] < 0.5 * summary["eval_loss_before"]
    report = (tmp_path / "demo" / "demo.md").read_text()
    for line in ("held-out loss", "exact match (32 prompts)", "valid JSON", "fine-tuned"):
        assert line in report and line in proc.stdout
    em_base, em_tuned = _percentages(report, "exact match (32 prompts)")
    json_base, json_tuned = _percentages(report, "valid JSON")
    assert em_tuned > em_base and em_tuned >= 50  # README: 0% -> 88%
    assert json_tuned >= json_base and json_tuned >= 90  # README: 0% -> 100%
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
