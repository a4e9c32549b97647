"""CPU DPO step time and peak memory: cura vs TRL's DPOTrainer with peft + bitsandbytes (4-bit base).

Both sides train SmolLM2-135M-Instruct (the bundled model, as a transformers folder) with DPO (beta 0.1) on
the same pairs (cura's DPO demo pairs, `src/cura/demo/style_pairs_train.jsonl`, chat template applied by
each library), batch 4 pairs, max_length 128, LoRA r=16 alpha 32 (no dropout) on every linear layer but
lm_head, constant lr 5e-4, gradient checkpointing on, 2 threads, each mode in its own process (so its peak
RSS is its own):

    trl[_precomputed]       transformers + bitsandbytes NF4 (double quant) + peft + trl.DPOTrainer; the
                            reference is the base with the adapter off (TRL's peft path); `_precomputed`:
                            precompute_ref_log_probs=True (one pass over the data before training)
    cura[_precomputed]      `cura.train.train` with objective dpo on the NF4 + double-quantization base;
                            `_precomputed`: preference.precompute_reference true

Each mode runs in bfloat16 (cura's `auto` on a CPU with AVX512-BF16/AMX; TRL with bf16=True and the
model and bnb compute in bfloat16) and, with --fp32, also in float32 (`*_fp32`). Step times are the median
of the steps after the warm-up ones (the precomputation is outside the steps on both sides, and inside
the peak RSS). The data order differs between the libraries (each shuffles its own way), so a step's
padded length differs a little; the medians over the same pairs compare like with like.

Usage: python bench/preference.py [--steps 6] [--warmup 2] [--fp32]   -> bench/results/preference.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cura.atomic import write_json
from cura.hardware import describe_machine

PAIRS = Path(__file__).resolve().parents[1] / "src" / "cura" / "demo" / "style_pairs_train.jsonl"
BATCH, MAX_LENGTH, RANK, ALPHA, BETA, LR = 4, 128, 16, 32, 0.1, 5e-4
RESULTS = Path(__file__).parent / "results" / "preference.json"
MODES = ("trl", "trl_precomputed", "cura", "cura_precomputed")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_trl(folder: str, dtype: str, precompute: bool, steps: int, workdir: str) -> list[float]:
    """Seconds of each optimizer step of a TRL DPOTrainer run (peft + bnb 4-bit)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch_dtype = getattr(torch, dtype)
    rows = [json.loads(line) for line in PAIRS.read_text(encoding="utf-8").splitlines()]
    data = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "chosen": [{"role": "assistant", "content": r["chosen"]}],
                "rejected": [{"role": "assistant", "content": r["rejected"]}],
            }
            for r in rows
        ]
    )
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch_dtype,
    )
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch_dtype, quantization_config=quant, device_map="cpu"
    )
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    peft_config = LoraConfig(
        r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM"
    )
    args = DPOConfig(
        output_dir=workdir,
        per_device_train_batch_size=BATCH,
        max_steps=steps,
        learning_rate=LR,
        lr_scheduler_type="constant",
        beta=BETA,
        max_length=MAX_LENGTH,
        precompute_ref_log_probs=precompute,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        bf16=dtype == "bfloat16",
        use_cpu=True,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        dataloader_num_workers=0,
        seed=0,
    )
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.t0)

    tokenizer = AutoTokenizer.from_pretrained(folder)
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[Timer()],
    )
    trainer.train()
    return times


def run_cura(folder: str, dtype: str, precompute: bool, steps: int, workdir: str) -> list[float]:
    """Seconds of each optimizer step of `cura.train.train` (objective dpo), read off metrics.jsonl."""
    from cura.adapters import LoraConfig
    from cura.data import DataConfig
    from cura.train import TrainConfig, train
    from cura.train.preference_config import PreferenceConfig

    config = TrainConfig(
        model=folder,
        objective="dpo",
        output_dir=workdir,
        data=DataConfig(path=str(PAIRS), max_length=MAX_LENGTH, eval_split=0),
        preference=PreferenceConfig(beta=BETA, precompute_reference=precompute),
        compute_dtype="auto" if dtype == "bfloat16" else dtype,
        lora=LoraConfig(r=RANK, alpha=ALPHA, dropout=0.0),
        lr=LR,
        schedule="constant",
        warmup_steps=0,
        batch_size=BATCH,
        gradient_checkpointing=True,
        max_steps=steps,
        save_every=0,
        progress=False,
        seed=0,
    )
    train(config)
    rows = [json.loads(x) for x in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return [r["seconds"] for r in rows]


def child(mode: str, folder: str, steps: int, warmup: int) -> dict:
    import torch

    torch.set_num_threads(2)
    torch.manual_seed(0)
    dtype = "float32" if mode.endswith("_fp32") else "bfloat16"
    precompute = "_precomputed" in mode
    build = run_trl if mode.startswith("trl") else run_cura
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"bench-pref-{mode}-") as workdir:
        times = build(folder, dtype, precompute, warmup + steps, workdir)
    measured = times[warmup:]
    return {
        "mode": mode,
        "dtype": dtype,
        "precomputed_reference": precompute,
        "median_step_seconds": statistics.median(measured),
        "step_seconds": times,
        "peak_rss_bytes": peak_rss(),
        "wall_seconds": time.perf_counter() - t0,
    }


def run_modes(args) -> dict:
    """Each mode in its own process on the bundled model; mode -> its result (or its error)."""
    from cura.models import resolve_source
    from cura.models.loading import hf_folder

    folder = hf_folder(*resolve_source("smollm2-135m"))  # the cached transformers folder of the bundled model
    modes = list(MODES) + ([f"{m}_fp32" for m in MODES if "precomputed" not in m] if args.fp32 else [])
    if args.modes:
        modes = args.modes.split(",")
    results = {}
    for mode in modes:
        env = dict(os.environ, OMP_NUM_THREADS="2", MKL_NUM_THREADS="2", TOKENIZERS_PARALLELISM="false")
        cmd = [sys.executable, __file__, "--child", mode, "--folder", str(folder)]
        cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        except subprocess.TimeoutExpired:
            results[mode] = {"mode": mode, "error": "over 900 s"}
            print(f"{mode}: over 900 s", file=sys.stderr)
            continue
        if proc.returncode != 0:
            results[mode] = {"mode": mode, "error": proc.stderr.strip().splitlines()[-1:]}
            print(f"{mode}: failed: {proc.stderr[-2000:]}", file=sys.stderr)
            continue
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = results[mode]
        print(
            f"{mode:22} {r['median_step_seconds']:.3f} s/step  peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB",
            file=sys.stderr,
        )
    return results


def write_report(results: dict, load_before: float) -> None:
    """bench/results/preference.json: the modes' results and cura / TRL ratios from the same run."""
    from cura.hardware import resolve_compute_dtype

    def ratio(a, b, key):
        if key in results.get(a, {}) and key in results.get(b, {}):
            return results[a][key] / results[b][key]
        return None

    pairs = [("cura", "trl"), ("cura_precomputed", "trl_precomputed"), ("cura_fp32", "trl_fp32")]
    ratios = {}
    for a, b in pairs:
        ratios[f"{a}_vs_{b}_step_time"] = ratio(a, b, "median_step_seconds")
        ratios[f"{a}_vs_{b}_peak_rss"] = ratio(a, b, "peak_rss_bytes")
    ratios["cura_precomputed_vs_cura_step_time"] = ratio("cura_precomputed", "cura", "median_step_seconds")
    ratios["trl_precomputed_vs_trl_step_time"] = ratio("trl_precomputed", "trl", "median_step_seconds")
    out = {
        "benchmark": "preference",
        "model": "SmolLM2-135M-Instruct (bundled)",
        "objective": "dpo",
        "batch_pairs": BATCH,
        "max_length": MAX_LENGTH,
        "lora_r": RANK,
        "threads": 2,
        "gradient_checkpointing": True,
        "machine": {
            **describe_machine(),
            "cura_auto_dtype": str(resolve_compute_dtype("auto", "cpu")).removeprefix("torch."),
            "load_average_1min_before": load_before,
            "load_average_1min_after": os.getloadavg()[0],
            "caveat": "2 cores shared with other work: absolute times are noisy; compare ratios of one run",
        },
        "modes": results,
        "ratios": {k: v for k, v in ratios.items() if v is not None},
    }
    write_json(RESULTS, out)
    print(json.dumps(out["ratios"], indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--fp32", action="store_true", help="also the float32 modes")
    parser.add_argument(
        "--modes",
        default="",
        help="only these modes (comma-separated); the file keeps the other modes' results",
    )
    parser.add_argument("--child", default=None)
    parser.add_argument("--folder", default=None)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.folder, args.steps, args.warmup)))
        return
    load_before = os.getloadavg()[0]
    results = run_modes(args)
    if args.modes and RESULTS.is_file():  # a partial run: keep the other modes of the file
        results = {**json.loads(RESULTS.read_text())["modes"], **results}
    write_report(results, load_before)


if __name__ == "__main__":
    main()
