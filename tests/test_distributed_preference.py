"""DPO on several processes, started for real through torchrun (gloo on CPU), on a tiny random Llama: two
ranks with batch b train the very run one process trains with batch 2b (the loss is the mean over the pairs
of the global batch, the gradients are summed across ranks before clipping)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cura.errors import CuraError
from test_distributed import ADAPTER_ATOL, LOSS_RTOL, adapter, cura, finish, flags, settings, tiny_source

__all__ = ["tiny_source"]  # the fixture, shared with tests/test_distributed.py

REPO = Path(__file__).resolve().parents[1]
PAIRS = REPO / "src" / "cura" / "demo" / "style_pairs_train.jsonl"
STEPS = 8


@pytest.fixture(scope="module")
def pair_file(tmp_path_factory) -> Path:
    """45 pairs, 4 held out by the default split: 41 left, so with 4 pairs per global micro-batch the epoch
    ends on a batch of 1 pair (rank 1's share is empty there and must add nothing)."""
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    lines = PAIRS.read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join(lines[:45]) + "\n", encoding="utf-8")
    return path


def dpo_settings(source: str, data: Path, out: Path, batch_size: int) -> dict:
    return settings(
        source,
        data,
        output=out,
        objective="dpo",
        preference__beta=0.5,
        batch_size=batch_size,
        max_steps=STEPS,
        seq_len=256,
        data__eval_split=4,
    )


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_dpo_on_two_processes_equals_one_process_with_the_global_batch(tiny_source, pair_file, tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    launched = [
        cura(*flags(dpo_settings(tiny_source, pair_file, two, batch_size=2)), "--nproc", "2"),
        cura(*flags(dpo_settings(tiny_source, pair_file, one, batch_size=4))),
    ]
    try:
        for proc in launched:
            finish(proc, timeout=240)
    finally:
        for proc in launched:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    got, want = rows(two), rows(one)
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, STEPS + 1))
    assert got[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # log 2: the policy starts as the reference
    for a, b in zip(got, want, strict=True):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
            assert a[key] == pytest.approx(b[key], rel=LOSS_RTOL, abs=1e-6), f"step {a['step']} {key}"
        assert a["trained_tokens"] == b["trained_tokens"]
    assert got[-1]["loss"] < got[0]["loss"]  # it trained (the comparison is not of two idle runs)
    one_adapter = adapter(one)
    for key, value in adapter(two).items():
        torch.testing.assert_close(value, one_adapter[key], rtol=0, atol=ADAPTER_ATOL)
    summary = json.loads((two / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["eval_preference_accuracy_after"] == pytest.approx(
        json.loads((one / "summary.json").read_text())["eval_preference_accuracy_after"]
    )


def test_kto_under_torchrun_is_refused_in_one_sentence(tmp_path):
    from cura.train import TrainConfig
    from cura.train.distributed import World
    from cura.train.run import build_run

    config = TrainConfig(objective="kto", output_dir=str(tmp_path))
    with pytest.raises(CuraError, match="kto.*one process"):
        build_run(config, torch.device("cpu"), world=World(rank=0, size=2))
