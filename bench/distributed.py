"""Several processes on this machine: one process at batch 2b vs `cura train --nproc 2` at batch b per
process, data parallel (DDP-equivalent) and sharded (`--fsdp`, FSDP2).

A random Llama (hidden 256, 4 layers, vocabulary of the tiny ChatML tokenizer) saved to a temporary folder,
the demo's order data, float32, LoRA r=8, gradient checkpointing, the same global batch and steps on every
side. Reported from each run's summary.json: rank 0's peak resident memory (the process's peak RSS: at this
model size it is mostly the Python/torch runtime, so sharding a 1 MiB base barely moves it), median seconds
per step, and for 2 processes the seconds per step spent in collectives (data parallel: token counts, loss,
the bucketed LoRA-gradient all-reduce, the stop flag; FSDP: those plus every layer's all-gather in forward
and in the checkpointed backward and its gradients' reduce-scatter; both include waiting for the slower
rank). For FSDP also the 4-bit bytes of the whole base and those each rank holds (measured on its local
shard tensors), which is where sharding shows at any model size. Losses are compared step by step with the
one process (they should agree to float32 rounding).

On a GPU machine the same script runs the processes on GPUs when CUDA is present (nccl); this was not run
here. Usage: python bench/distributed.py [--steps 20]   -> bench/results/distributed.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from cura.atomic import write_json
from cura.hardware import describe_machine

REPO = Path(__file__).resolve().parents[1]
PER_RANK_BATCH, SEQ = 2, 128


def make_model(folder: Path) -> None:
    """A random Llama with the tiny tokenizer of the tests (no download)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    sys.path.insert(0, str(REPO / "tests"))
    from tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)


def run(model: Path, out: Path, steps: int, nproc: int, fsdp: bool = False) -> dict:
    args = [
        sys.executable,
        "-m",
        "cura",
        "train",
        "--model",
        str(model),
        "--data",
        str(REPO / "src" / "cura" / "demo" / "orders_train.jsonl"),
        "--output",
        str(out),
        "--seq-len",
        str(SEQ),
        "--batch-size",
        str(PER_RANK_BATCH * (2 if nproc == 1 else 1)),
        "--max-steps",
        str(steps),
        "--lora.r",
        "8",
        "--lora.dropout",
        "0",
        "--compute-dtype",
        "float32",
        "--save-every",
        "0",
        "--gradient-checkpointing",
        "true",  # the same recipe at 1 process as at N (auto keeps it on only under torchrun)
        "--progress",
        "false",
    ]
    if nproc > 1:
        args += ["--nproc", str(nproc)]
    if fsdp:
        args.append("--fsdp")
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    subprocess.run(args, check=True, env=env, capture_output=True, text=True, timeout=1800)
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        "processes": nproc,
        "batch_per_process": PER_RANK_BATCH * (2 if nproc == 1 else 1),
        "global_batch": PER_RANK_BATCH * 2,
        "peak_memory_bytes_rank0": summary["peak_memory_bytes"],
        "median_seconds_per_step": statistics.median(r["seconds"] for r in rows[1:]),
        "communication_seconds_per_step": summary.get("communication_seconds_per_step"),
        "losses": [r["loss"] for r in rows],
        **{k: summary[k] for k in FSDP_FIELDS if k in summary},
    }


# what an --fsdp run's summary.json says each rank held (after sharding, and at the peak of loading)
FSDP_FIELDS = ("model_4bit_bytes", "resident_4bit_bytes_per_rank", "load_peak_4bit_bytes_per_rank")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_model(tmp / "model")
        one = run(tmp / "model", tmp / "one", args.steps, 1)
        two = run(tmp / "model", tmp / "two", args.steps, 2)
        sharded = run(tmp / "model", tmp / "fsdp", args.steps, 2, fsdp=True)

    def worst(side: dict) -> float:
        return max(abs(a - b) / abs(b) for a, b in zip(side["losses"], one["losses"], strict=True))

    result = {
        "machine": describe_machine(),
        "note": "CPU, gloo, OMP_NUM_THREADS=1 per process, taken on a shared machine under load: compare "
        "ratios from this run, not absolute times; GPUs not run (no GPU on this machine)",
        "settings": {"seq_len": SEQ, "steps": args.steps, "model": "random Llama, hidden 256, 4 layers"},
        "one_process": one,
        "two_processes": two,
        "two_processes_fsdp": sharded,
        "peak_memory_ratio_two_over_one": two["peak_memory_bytes_rank0"] / one["peak_memory_bytes_rank0"],
        "peak_memory_ratio_fsdp_over_one": sharded["peak_memory_bytes_rank0"]
        / one["peak_memory_bytes_rank0"],
        "resident_4bit_ratio_fsdp_rank_over_whole": max(sharded["resident_4bit_bytes_per_rank"])
        / sharded["model_4bit_bytes"],
        # each layer is sharded as it loads: its shards of the layers before + one whole layer (+ its shard)
        "load_peak_4bit_ratio_fsdp_rank_over_whole": max(sharded["load_peak_4bit_bytes_per_rank"])
        / sharded["model_4bit_bytes"],
        "step_time_ratio_two_over_one": two["median_seconds_per_step"] / one["median_seconds_per_step"],
        "step_time_ratio_fsdp_over_one": sharded["median_seconds_per_step"] / one["median_seconds_per_step"],
        "communication_ratio_fsdp_over_ddp": sharded["communication_seconds_per_step"]
        / two["communication_seconds_per_step"],
        "max_relative_loss_difference": worst(two),
        "max_relative_loss_difference_fsdp": worst(sharded),
    }
    write_json(REPO / "bench" / "results" / "distributed.json", result)
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))


if __name__ == "__main__":
    main()
