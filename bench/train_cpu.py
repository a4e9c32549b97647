"""CPU training step time and peak memory: cura QLoRA vs cura LoRA vs peft (+ bitsandbytes).

On SmolLM2-135M-Instruct (the bundled model), batch 4 x 256 tokens, 2 threads, gradient checkpointing on,
LoRA r=16 (dropout 0.05) on every linear layer but lm_head, each mode in its own process (so peak RSS is its
own). Each library runs in float32 (transformers' default on CPU) and in bfloat16 (compute dtype and model
dtype; peft keeps its LoRA weights float32 as prepare_model_for_kbit_training does):

    peft_bnb_qlora[_bf16]   transformers + bitsandbytes NF4 (double quant) + peft, torch AdamW   (the anchor)
    peft_lora[_bf16]        transformers full-precision base + peft, torch AdamW
    cura_lora[_fp32]        cura on the full-precision base, PagedAdamW
    cura_qlora[_fp32]       cura on the NF4 + double-quantization base, PagedAdamW

cura's unsuffixed modes use its default `compute_dtype: auto` (bfloat16 where the CPU has AVX512-BF16/AMX,
else float32): `machine.cura_auto_dtype` says which.

Reported: median seconds per optimizer step (after warm-up steps), peak RSS, and ratios from the same run.
Usage: python bench/train_cpu.py [--steps 6] [--warmup 2]   -> bench/results/train_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from cura.atomic import write_json
from cura.hardware import describe_machine

BATCH, SEQ, RANK, ALPHA = 4, 256, 16, 32
MODES = (
    "peft_bnb_qlora",
    "peft_bnb_qlora_bf16",
    "peft_lora",
    "peft_lora_bf16",
    "cura_lora_fp32",
    "cura_qlora_fp32",
    "cura_lora",
    "cura_qlora",
)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def batch(vocab: int, step: int):
    import torch

    g = torch.Generator().manual_seed(step)
    ids = torch.randint(3, vocab, (BATCH, SEQ), generator=g)
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def run_peft(quantized: bool, folder: str, dtype: str):
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    torch_dtype = getattr(torch, dtype)
    kwargs = {"dtype": torch_dtype}
    if quantized:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch_dtype,
        )
    model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu" if quantized else None, **kwargs)
    if quantized:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(
        model,
        LoraConfig(
            r=RANK, lora_alpha=ALPHA, lora_dropout=0.05, target_modules=TARGETS, task_type="CAUSAL_LM"
        ),
    )
    model.config.use_cache = False
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
    vocab = model.config.vocab_size

    def step(i):
        loss = model(**batch(vocab, i)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return step


def run_cura(quantized: bool, folder: str, dtype: str):
    import torch

    from cura.adapters import LoraConfig
    from cura.train import TrainConfig, build_run

    config = TrainConfig(
        model=folder,
        method="qlora" if quantized else "lora",
        compute_dtype=dtype,
        lora=LoraConfig(r=RANK, alpha=ALPHA, dropout=0.05),
        schedule="constant",
        batch_size=BATCH,
    )
    run = build_run(config, torch.device("cpu"), with_data=False)  # the setup of `cura train` itself
    vocab = run.model.config.vocab_size

    def step(i):
        return run.step([batch(vocab, i)])["loss"]

    return step


def child(mode: str, folder: str, steps: int, warmup: int) -> dict:
    import torch

    torch.set_num_threads(2)
    torch.manual_seed(0)
    rss_start = peak_rss()
    build = run_peft if mode.startswith("peft") else run_cura
    if mode.endswith("_bf16"):
        dtype = "bfloat16"
    elif mode.endswith("_fp32") or mode.startswith("peft"):
        dtype = "float32"
    else:
        dtype = "auto"  # cura's default
    t0 = time.perf_counter()
    step = build("qlora" in mode, folder, dtype)
    load_seconds = time.perf_counter() - t0
    times, losses = [], []
    for i in range(warmup + steps):
        t = time.perf_counter()
        losses.append(step(i))
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return {
        "mode": mode,
        "dtype": dtype,
        "median_step_seconds": statistics.median(times),
        "step_seconds": times,
        "peak_rss_bytes": peak_rss(),
        "peak_rss_over_start_bytes": peak_rss() - rss_start,
        "load_seconds": load_seconds,
        "losses": losses,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--child", default=None)
    parser.add_argument("--folder", default=None)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.folder, args.steps, args.warmup)))
        return
    write_report(run_modes(args))


def run_modes(args) -> dict:
    """Each mode in its own process on the bundled model; mode -> its result (or its error)."""
    from cura.models import resolve_source
    from cura.models.loading import hf_folder

    folder = hf_folder(*resolve_source("smollm2-135m"))  # the cached transformers folder of the bundled model
    results = {}
    for mode in args.modes.split(","):
        env = dict(os.environ, OMP_NUM_THREADS="2", MKL_NUM_THREADS="2", TOKENIZERS_PARALLELISM="false")
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                mode,
                "--folder",
                str(folder),
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
            ],
            capture_output=True,
            text=True,
            env=env,
        )
        if proc.returncode != 0:
            results[mode] = {"mode": mode, "error": proc.stderr.strip().splitlines()[-1:]}
            print(f"{mode}: failed: {proc.stderr[-2000:]}", file=sys.stderr)
            continue
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = results[mode]
        print(
            f"{mode:16} {r['median_step_seconds']:.3f} s/step  peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB",
            file=sys.stderr,
        )
    return results


def write_report(results: dict) -> None:
    """bench/results/train_cpu.json: the modes' results and the ratios the issue aims at."""
    from cura.hardware import resolve_compute_dtype

    STEP, RSS = "median_step_seconds", "peak_rss_bytes"

    def ratio(a, b, key):
        if key in results.get(a, {}) and key in results.get(b, {}):
            return results[a][key] / results[b][key]
        return None

    out = {
        "benchmark": "train_cpu",
        "model": "SmolLM2-135M-Instruct (bundled)",
        "batch": BATCH,
        "seq_len": SEQ,
        "lora_r": RANK,
        "threads": 2,
        "gradient_checkpointing": True,
        "machine": {
            **describe_machine(),
            "cura_auto_dtype": str(resolve_compute_dtype("auto", "cpu")).removeprefix("torch."),
            "load_average_1min": os.getloadavg()[0],
        },
        "modes": results,
        "ratios": {
            # the aims, with cura at its default (auto dtype) against the float32 anchors
            "cura_qlora_vs_cura_lora_step_time": ratio("cura_qlora", "cura_lora", STEP),
            "cura_qlora_vs_peft_bnb_qlora_step_time": ratio("cura_qlora", "peft_bnb_qlora", STEP),
            "cura_qlora_vs_peft_bnb_qlora_peak_rss": ratio("cura_qlora", "peft_bnb_qlora", RSS),
            # like for like: the same dtype on both sides
            "cura_qlora_fp32_vs_cura_lora_fp32_step_time": ratio("cura_qlora_fp32", "cura_lora_fp32", STEP),
            "cura_qlora_fp32_vs_peft_bnb_qlora_step_time": ratio("cura_qlora_fp32", "peft_bnb_qlora", STEP),
            "cura_qlora_fp32_vs_peft_bnb_qlora_peak_rss": ratio("cura_qlora_fp32", "peft_bnb_qlora", RSS),
            "cura_qlora_vs_peft_bnb_qlora_bf16_step_time": ratio("cura_qlora", "peft_bnb_qlora_bf16", STEP),
            "cura_qlora_vs_peft_bnb_qlora_bf16_peak_rss": ratio("cura_qlora", "peft_bnb_qlora_bf16", RSS),
            "cura_lora_fp32_vs_peft_lora_step_time": ratio("cura_lora_fp32", "peft_lora", STEP),
            "cura_lora_fp32_vs_peft_lora_peak_rss": ratio("cura_lora_fp32", "peft_lora", RSS),
        },
        "aims": {
            "cura_qlora_vs_cura_lora_step_time": "<= 1.10",
            "cura_qlora_vs_peft_bnb_qlora_step_time": "<= 0.5",
            "cura_qlora_vs_peft_bnb_qlora_peak_rss": "<= 0.7",
        },
    }
    path = Path(__file__).parent / "results" / "train_cpu.json"
    write_json(path, out)
    print(json.dumps(out["ratios"], indent=2))


if __name__ == "__main__":
    main()
