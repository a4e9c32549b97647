"""Accuracy of the memory planner: predicted peak vs the measured peak of real training steps.

    flock /tmp/cura-bench.lock python bench/memory.py [--only NAME,...] [--device cpu|cuda]

(`--only` re-measures those configurations and keeps the other rows of the results file.)

For each configuration (tiny random models of different shapes written as safetensors folders, and the
bundled SmolLM2-135M; checkpointing on and off; several batch and sequence sizes; float32 and bfloat16
compute; LoRA and QLoRA; 32-bit and 8-bit optimizer state), a fresh process builds the model as `cura train`
does and runs three optimizer steps (`cura.train.measure`):

    CPU   measured = peak RSS during the steps (VmHWM, reset after setup) - RSS after imports
          predicted = plan(...).peak_bytes, framework overhead included
    CUDA  measured = torch.cuda.max_memory_allocated()
          predicted = plan(...).peak_bytes - its framework overhead term (the context is not allocated)

The CPU runs use cura's pool, as `cura train` does by default (cpu_malloc=pool: `cura.train.cpu_pool`, holding
at most the plan's tensors + 5%), and write bench/results/memory.json; `--malloc tight` fixes glibc's mmap
threshold instead (cpu_malloc=tight, what the plan's peak promised before the pool) and writes
bench/results/memory-tight.json; `--malloc fast` keeps glibc's default (cpu_malloc=fast) and writes
bench/results/memory-fast.json, the measurements behind FAST_RETENTION. Each row records its step time too,
so the files also compare the allocators' speed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from cura.atomic import write_json
from cura.config import from_dict
from cura.hardware import describe_machine
from cura.memory import plan, shape_from_source
from cura.train.config import TrainConfig
from cura.train.measure import measure_in_subprocess
from cura.train.plan import plan_spec

RESULTS = Path(__file__).parent / "results" / "memory.json"
MiB = 2**20

# name -> (transformers config class, its arguments): tiny random models of different shapes
MODELS = {
    "tiny-llama": ("LlamaConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=320)),
    "deep-llama": ("LlamaConfig", dict(hidden_size=256, intermediate_size=688, num_hidden_layers=12,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=8000)),
    "small-mistral": ("MistralConfig", dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                                            num_attention_heads=8, num_key_value_heads=2, vocab_size=16000,
                                            sliding_window=None)),
    "wide-qwen2": ("Qwen2Config", dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                                       num_attention_heads=16, num_key_value_heads=4, vocab_size=32000,
                                       tie_word_embeddings=True)),
}  # fmt: skip
BUNDLED = "smollm2-135m"


def run(name: str, model: str, batch: int, seq: int, **settings) -> dict:
    """One configuration: TrainConfig settings (nested plain data) on a model."""
    data = {"batch_size": batch, "threads": 2, "gradient_checkpointing": True, **settings}
    data["data"] = {"max_length": seq, **settings.get("data", {})}
    return {"name": name, "model": model, "settings": data}


CONFIGS = [
    run("tiny f32", "tiny-llama", 2, 64, compute_dtype="float32"),
    run("tiny bf16", "tiny-llama", 2, 64),
    run("deep bf16 ckpt", "deep-llama", 4, 512),
    run("deep bf16 no-ckpt", "deep-llama", 4, 512, gradient_checkpointing=False),
    run("small f32 ckpt", "small-mistral", 4, 256, compute_dtype="float32"),
    run("small bf16 no-ckpt", "small-mistral", 4, 256, gradient_checkpointing=False),
    run("small bf16 8-bit, no dropout", "small-mistral", 8, 256, optimizer="paged_adamw_8bit", lora={"dropout": 0.0}),
    run("wide bf16 ckpt", "wide-qwen2", 2, 512),
    run("wide f32 unpacked chunk256", "wide-qwen2", 2, 512, compute_dtype="float32", loss_chunk_tokens=256, data={"packing": False}),
    run("wide bf16 lora (16-bit base)", "wide-qwen2", 2, 256, method="lora"),
    run("smollm2 bf16 ckpt", BUNDLED, 4, 256),
    run("smollm2 bf16 no-ckpt", BUNDLED, 4, 256, gradient_checkpointing=False),
    run("smollm2 bf16 ckpt 2x1024", BUNDLED, 2, 1024),
    run("smollm2 f32 ckpt", BUNDLED, 4, 256, compute_dtype="float32"),
    run("smollm2 bf16 dpo", BUNDLED, 4, 256, objective="dpo"),
    run("smollm2 bf16 dpo precomputed", BUNDLED, 4, 256, objective="dpo", preference={"precompute_reference": True}),
    run("smollm2 bf16 orpo", BUNDLED, 4, 256, objective="orpo"),
    run("smollm2 bf16 kto", BUNDLED, 4, 256, objective="kto"),
]  # fmt: skip


def write_models(folder: Path) -> dict[str, str]:
    """Save each tiny model (random weights, safetensors) once; returns name -> folder."""
    import torch
    import transformers

    paths = {}
    for name, (cls, kwargs) in MODELS.items():
        path = folder / name
        if not (path / "config.json").is_file():
            config = getattr(transformers, cls)(max_position_embeddings=4096, **kwargs)
            torch.manual_seed(0)
            transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
        paths[name] = str(path)
    paths[BUNDLED] = BUNDLED
    return paths


def compare(entry: dict, source: str, device: str, malloc: str) -> dict:
    settings = {**entry["settings"], "cpu_malloc": malloc}
    config = from_dict(TrainConfig, settings)  # the allocator's plan (the pool's has its headroom term)
    the_plan = plan(shape_from_source(source), plan_spec(config, device))
    measured = measure_in_subprocess(source, settings, device=device)
    predicted = the_plan.peak_bytes
    if device == "cuda":
        predicted -= the_plan.term("framework overhead")
    persistent = sum(the_plan.term(t) for t in ("quantized base weights", "quantization constants",
                                                 "full-precision base weights", "embeddings, lm_head, norms",
                                                 "LoRA adapters"))  # fmt: skip
    return {
        **entry,
        "device": device,
        "compute_dtype": the_plan.spec.compute_dtype,
        "allocator": measured.allocator,
        "predicted_peak_bytes": predicted,
        "measured_peak_bytes": measured.peak_increase,
        "error": (predicted - measured.peak_increase) / measured.peak_increase,
        "peak_phase": the_plan.peak_phase,
        "terms": {t.name: t.bytes for t in the_plan.terms},
        "predicted_weights_bytes": persistent,
        "measured_setup_bytes": measured.setup - measured.baseline,
        "seconds_per_step": measured.seconds_per_step,
        "hwm_reset": measured.hwm_reset,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", default="", help="comma-separated configuration names")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--malloc", choices=("pool", "tight", "fast"), default="pool")
    parser.add_argument("--models", default=os.path.join(tempfile.gettempdir(), "cura-bench-memory-models"))
    args = parser.parse_args()
    only = {n.strip() for n in args.only.split(",") if n.strip()}
    paths = write_models(Path(args.models))
    rows = []
    for entry in CONFIGS:
        if only and entry["name"] not in only:
            continue
        row = compare(entry, paths[entry["model"]], args.device, malloc=args.malloc)
        rows.append(row)
        print(
            f"{row['name']:32s} predicted {row['predicted_peak_bytes'] / MiB:8.1f} MiB  measured "
            f"{row['measured_peak_bytes'] / MiB:8.1f} MiB  error {row['error']:+6.1%}  ({row['peak_phase']})",
            flush=True,
        )
    out = RESULTS if args.malloc == "pool" else RESULTS.with_name(f"memory-{args.malloc}.json")
    if only and out.is_file():  # --only: replace those rows of the last full run, keep the others
        fresh = {r["name"] for r in rows}
        kept = [r for r in json.loads(out.read_text())["results"] if r["name"] not in fresh]
        rows = kept + rows
    worst = max(rows, key=lambda r: abs(r["error"]))
    ratios = [r["measured_peak_bytes"] / r["predicted_peak_bytes"] for r in rows]
    result = {
        "description": "planner peak vs measured peak of 3 training steps per configuration (see bench/memory.py)",
        "device": args.device,
        "results": rows,
        "worst_case": {"name": worst["name"], "error": worst["error"]},
        "within_10_percent": all(abs(r["error"]) <= 0.10 for r in rows),
        "malloc": args.malloc,
        "measured_over_predicted": {"min": min(ratios), "max": max(ratios)},
        "machine": {
            **describe_machine(),
            "python": sys.version.split()[0],
            "date": time.strftime("%Y-%m-%d"),
        },
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    print(f"worst case: {worst['name']} {worst['error']:+.1%}; wrote {out}")


if __name__ == "__main__":
    main()
