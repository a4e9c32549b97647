"""What flushing a checkpoint to disk costs: `save_checkpoint` with and without the fsync of its files and
folders (`cura.atomic.fsync_tree` / `fsync_dir`), on a tiny random Llama and on the bundled SmolLM2-135M
with the default LoRA (r=16 on every linear but lm_head), after one real optimizer step (so the optimizer
state exists). Alternating repeats in one process; writes bench/results/checkpoint_fsync.json.

    PYTHONPATH=src python bench/checkpoint_fsync.py [--repeats 5] [--skip-bundled]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import cura.atomic as atomic
from cura.adapters import save_adapter
from cura.hardware import describe_machine
from cura.train import TrainConfig
from cura.train.checkpoint import TrainerState, save_checkpoint
from cura.train.run import build_run

HERE = Path(__file__).resolve().parent


def tiny_model(folder: Path) -> str:
    """A tiny random Llama saved as a transformers folder (tests/tiny.py's shape)."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from transformers import AutoModelForCausalLM

    from tiny import tiny_config

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("llama")).save_pretrained(folder)
    return str(folder)


def measure(model: str, scratch: Path, repeats: int, label: str) -> dict:
    """Seconds per checkpoint save with and without fsync (medians of alternating repeats) and its size."""
    config = TrainConfig(
        model=model,
        output_dir=str(scratch / "run"),
        progress=False,
        compute_dtype="float32",
        gradient_checkpointing=True,
    )
    run = build_run(config, torch.device("cpu"), with_data=False, say=lambda *_: None)
    vocab = run.model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (1, 64))
    run.step([{"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}])
    state = TrainerState(step=1, total_steps=1)

    def save(root: Path) -> float:
        t0 = time.perf_counter()
        save_checkpoint(
            root,
            state,
            save_adapter_to=lambda f: save_adapter(run.model, config.lora, f, base_model_name_or_path=model),
            optimizer=run.optimizer,
            scheduler=run.scheduler,
        )
        return time.perf_counter() - t0

    real = (atomic.fsync_tree, atomic.fsync_dir)
    times: dict[str, list[float]] = {"fsync": [], "no_fsync": []}
    for i in range(repeats):
        for mode in ("fsync", "no_fsync"):
            if mode == "no_fsync":
                atomic.fsync_tree = atomic.fsync_dir = lambda *_: None
            try:
                times[mode].append(save(scratch / f"{mode}-{i}"))
            finally:
                atomic.fsync_tree, atomic.fsync_dir = real
    size = sum(p.stat().st_size for p in (scratch / "fsync-0").rglob("*") if p.is_file())
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "model": label,
        "checkpoint_bytes": size,
        "seconds_fsync": med["fsync"],
        "seconds_no_fsync": med["no_fsync"],
        "extra_seconds": med["fsync"] - med["no_fsync"],
        "ratio": med["fsync"] / med["no_fsync"],
        "repeats": repeats,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-bundled", action="store_true")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(dir=HERE.parent) as tmp:
        scratch = Path(tmp)
        cases = [(tiny_model(scratch / "tiny"), "tiny llama (tests/tiny.py)")]
        cases += [] if args.skip_bundled else [("smollm2-135m", "smollm2-135m")]
        for i, (model, label) in enumerate(cases):
            results.append(measure(model, scratch / f"case-{i}", args.repeats, label))
            print(json.dumps(results[-1]))
    out = HERE / "results" / "checkpoint_fsync.json"
    out.write_text(json.dumps({"machine": describe_machine(), "results": results}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
