"""GPU benchmark, one command: kernels, parity tests, and QLoRA training speed / memory against peft + bitsandbytes.

Run as ``bash bench/gpu.sh`` on an H100/H200 (at most 8 minutes, nothing installed from the network:
bitsandbytes travels as a wheel in ``.whl/``), or ``bash bench/gpu.sh --dry-run`` on any CPU machine (the
Triton interpreter, tiny shapes: every code path that can run without CUDA, timings meaningless).

    1. device       name, memory, versions; the CUDA context measured (mem_get_info around init)
    2. kernels      Triton dequantization (NF4 + double quantization -> bf16) GB/s against the measured
                    device-to-device copy bandwidth, bit-exact against the CPU reference; the fused GEMV
                    (one token) against dequantize + matmul; the bf16 matmul peak for MFU
    3. parity       ``pytest -m gpu`` (CUDA) or the interpreter tests (dry run)
    4. training     random-init Llama-3.2-1B and Llama-3-8B shapes (no weights needed), sequence 2048,
                    batch 1 and 4, LoRA r=16 on every linear but lm_head, gradient checkpointing, bf16:
                    cura_qlora, cura_lora (bf16 base), peft_bnb_qlora (transformers + bitsandbytes NF4 +
                    DQ + peft, `prepare_model_for_kbit_training`), each in its own process: tokens/s,
                    peak `torch.cuda.max_memory_allocated`, MFU
    5. planner      cura's prediction (`cura.memory.plan`, the state resident as paging="auto" keeps it
                    on a roomy card, minus what max_memory_allocated does not count) against each peak

MFU counts model FLOPs per trained token for LoRA on a frozen base (no weight gradients of the base):
``4 * N_linear + 6 * L * T * d_model`` (forward 2N, backward to the input 2N; causal attention's QK^T and
AV 2LTd forward, twice that backward), against the measured bf16 matmul peak (and the spec sheet's where
the device is known). Recomputation under checkpointing is not counted (PaLM's convention).

Writes bench/results/train_gpu.json with the device named (a dry run writes $TMPDIR/cura_train_gpu_dry_run.json:
its numbers are the interpreter's and mean nothing).
"""

from __future__ import annotations

import os
import sys

if "--dry-run" in sys.argv:  # before torch/triton are imported: the kernels then run in the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
RANK, ALPHA, DROPOUT = 16, 32, 0.05
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ARMS = ("cura_qlora", "cura_lora", "peft_bnb_qlora")
MODELS = {  # name -> transformers LlamaConfig fields (from each model's public config.json)
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                         rope_theta=500000.0, max_position_embeddings=131072),
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False,
                       rope_theta=500000.0, max_position_embeddings=8192),
    "tiny": dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                 max_position_embeddings=256),
}  # fmt: skip
SPEC_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16, NVIDIA's spec sheets
AIMS = dict(qlora_vs_peft_speed=1.5, qlora_vs_peft_memory=0.7, qlora_vs_lora_speed=0.9, dequant_vs_copy=0.8,
            planner_error=0.10)  # fmt: skip


# ------------------------------------------------------------------------------------------------ device
def device_info(dry: bool) -> dict:
    """The device named, its memory, versions, and the CUDA context measured from free memory."""
    import torch

    info = {"torch": torch.__version__, "dry_run": dry}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if dry or not torch.cuda.is_available():
        from cura.hardware import describe_machine

        info.update(device="cpu (dry run: Triton interpreter, tiny shapes)", machine=describe_machine())
        return info
    torch.cuda.init()
    free, total = torch.cuda.mem_get_info()
    props = torch.cuda.get_device_properties(0)
    info.update(
        device=torch.cuda.get_device_name(0),
        capability=".".join(map(str, torch.cuda.get_device_capability(0))),
        multiprocessors=props.multi_processor_count,
        memory_bytes=total,
        cuda_context_bytes=total - free - torch.cuda.memory_reserved(),
        cuda=torch.version.cuda,
    )
    return info


# ----------------------------------------------------------------------------------------------- kernels
def _time(fn, device, repeats: int) -> float:
    """Median seconds of `fn()` (CUDA events on a GPU, perf_counter elsewhere), after one warm-up call."""
    import torch

    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def _copy_gbps(device, n: int, repeats: int) -> float:
    """Device-to-device copy bandwidth of n bf16 values, counting bytes read and written."""
    import torch

    src = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    return 2 * src.nbytes / _time(lambda: dst.copy_(src), device, repeats) / 1e9


def _dequant_shape(shape: tuple[int, int], device, repeats: int, copy_gbps: float) -> dict:
    """One weight: NF4 + DQ -> bf16 through Triton (bit-exact against the CPU reference, GB/s over the
    bytes read and written), and the fused one-token GEMV against dequantize + matmul."""
    import torch

    from cura.quant import quantize, triton_kernels
    from cura.quant.tensor import dequantize_on_device, dequantize_with

    q = quantize(torch.randn(shape, device=device, dtype=torch.bfloat16), "nf4", 64, True)
    got = dequantize_on_device("triton", q, torch.bfloat16)
    exact = bool(torch.equal(got.cpu(), dequantize_with(None, q.to("cpu"), torch.bfloat16)))
    buffer = torch.empty(q.numel, dtype=torch.bfloat16, device=device)
    seconds = _time(lambda: triton_kernels.dequantize_4bit(q, torch.bfloat16, buffer), device, repeats)
    gbps = (q.nbytes + buffer.nbytes) / seconds / 1e9
    x = torch.randn(1, shape[1], device=device, dtype=torch.bfloat16)
    fused_s = _time(lambda: triton_kernels.matmul_4bit(x, q, torch.bfloat16), device, repeats)
    plain_s = _time(lambda: x @ dequantize_on_device("triton", q, torch.bfloat16).t(), device, repeats)
    ref = x.double() @ got.double().t()
    err = float((triton_kernels.matmul_4bit(x, q, torch.bfloat16).double() - ref).abs().max())
    return dict(bit_exact=exact, dequant_seconds=seconds, dequant_gbps=gbps, dequant_vs_copy=gbps / copy_gbps,
                gemv_fused_seconds=fused_s, gemv_dequant_matmul_seconds=plain_s, gemv_speedup=plain_s / fused_s,
                gemv_fused_max_abs_err=err)  # fmt: skip


def _matmul_flops(device, n: int, repeats: int) -> float:
    import torch

    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    return 2 * n**3 / _time(lambda: a @ b, device, repeats)


def kernel_bench(dry: bool) -> dict:
    """Dequantization GB/s vs copy GB/s, bit-exactness, the fused GEMV, and the bf16 matmul peak."""
    import torch

    from cura.quant import triton_kernels

    device = torch.device("cpu" if dry else "cuda")
    repeats = 2 if dry else 20
    shapes = [(64, 128)] if dry else [(4096, 4096), (14336, 4096)]
    copy = _copy_gbps(device, 1 << 12 if dry else 1 << 29, repeats)  # 1 GiB of bf16 on a GPU
    return dict(
        copy_gbps=copy,
        shapes={"x".join(map(str, s)): _dequant_shape(s, device, repeats, copy) for s in shapes},
        matmul_bf16_flops=_matmul_flops(device, 256 if dry else 8192, 3 if dry else 10),
        interpreter=triton_kernels.interpreting(),
    )


# ------------------------------------------------------------------------------------------------ parity
def parity_tests(dry: bool, timeout: float) -> dict:
    """`pytest -m gpu` on the GPU; the interpreter's kernel tests in a dry run."""
    args = (
        ["tests/test_triton_kernels.py"]
        if dry
        else ["-m", "gpu", "tests/test_gpu_kernels.py", "tests/test_optim.py"]
    )
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    t = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"passed": False, "summary": f"timed out after {timeout:.0f} s"}
    lines = [line for line in done.stdout.strip().splitlines() if line.strip()]
    return {"passed": done.returncode == 0, "summary": lines[-1] if lines else done.stderr[-500:],
            "seconds": time.perf_counter() - t, "command": " ".join(["pytest", *args])}  # fmt: skip


# ---------------------------------------------------------------------------------------------- training
def write_model(name: str, folder: Path, dry: bool) -> None:
    """A random-init Llama of `name`'s shape saved in bf16 (built on the GPU, where there is one)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**MODELS[name], torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2)
    device = "cpu" if dry else "cuda"
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly: 16 GB for the 8B shape, not 32
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(folder, safe_serialization=True)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()


def linear_params(name: str) -> tuple[int, int, int]:
    """(parameters in linears incl. lm_head, layers, hidden size) of a model shape."""
    m = MODELS[name]
    d, i, layers = m["hidden_size"], m["intermediate_size"], m["num_hidden_layers"]
    head_dim = m.get("head_dim", d // m["num_attention_heads"])
    q = m["num_attention_heads"] * head_dim
    kv = m["num_key_value_heads"] * head_dim
    per_layer = d * q + 2 * d * kv + q * d + 3 * d * i
    return layers * per_layer + d * m["vocab_size"], layers, d


def _cura_step(arm: str, folder: Path, device):
    from cura.adapters import LoraConfig
    from cura.train import TrainConfig, build_run

    config = TrainConfig(model=str(folder), method="qlora" if arm == "cura_qlora" else "lora",
                         compute_dtype="bfloat16", lora=LoraConfig(r=RANK, alpha=ALPHA, dropout=DROPOUT),
                         schedule="constant", gradient_checkpointing=True)  # fmt: skip
    run = build_run(config, device, with_data=False)  # the setup of `cura train` itself
    return (lambda batch: run.step([batch])["loss"]), run.model.config.vocab_size


def _peft_step(folder: Path, device):
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.bfloat16, quantization_config=quant, device_map={"": str(device)}
    )
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    lora = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=TARGETS,
                      task_type="CAUSAL_LM")  # fmt: skip
    model = get_peft_model(model, lora)
    model.config.use_cache = False
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)

    def step(batch):
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return step, model.config.vocab_size


def child(arm: str, folder: Path, batches: list[int], seq: int, steps: int, warmup: int, dry: bool) -> dict:
    """One arm in this process: per batch size, seconds per step, tokens/s and the peak allocated bytes."""
    import torch

    from cura.train.measure import synthetic_batch

    device = torch.device("cpu" if dry else "cuda")
    torch.manual_seed(0)
    t = time.perf_counter()
    step, vocab = _peft_step(folder, device) if arm == "peft_bnb_qlora" else _cura_step(arm, folder, device)
    out = {"arm": arm, "load_seconds": time.perf_counter() - t, "batches": {}}
    for b in batches:
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times, losses = [], []
        for i in range(warmup + steps):
            batch = {k: v.to(device) for k, v in synthetic_batch(vocab, b, seq, False, i).items()}
            start = time.perf_counter()
            losses.append(step(batch))
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
        reserved = torch.cuda.max_memory_reserved() if device.type == "cuda" else None
        out["batches"][str(b)] = dict(step_seconds=seconds, tokens_per_second=b * seq / seconds,
                                      peak_allocated_bytes=peak, peak_reserved_bytes=reserved,
                                      losses=losses)  # fmt: skip
    return out


def run_arm(arm: str, folder: Path, args, timeout: float) -> dict:
    """`child` in a fresh process (its peak is its own)."""
    cmd = [sys.executable, __file__, "--child", arm, "--folder", str(folder), "--batches", args.batches,
           "--seq", str(args.seq), "--steps", str(args.steps), "--warmup", str(args.warmup)]  # fmt: skip
    if args.dry_run:
        cmd.append("--dry-run")
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"arm": arm, "error": f"timed out after {timeout:.0f} s"}
    if done.returncode != 0:
        return {"arm": arm, "error": done.stderr[-3000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def predicted_allocated(name: str, arm: str, batch: int, seq: int, dry: bool) -> int | None:
    """The planner's peak for a cura arm, as max_memory_allocated counts it (no context, no slack), with the
    optimizer state resident (paging="auto" on a roomy card)."""
    if not arm.startswith("cura") or name not in ("llama-3.2-1b", "llama-3-8b"):
        return None
    from cura.adapters import LoraConfig
    from cura.memory import KNOWN_SHAPES, plan
    from cura.memory.activations import CUDA_WORKSPACE_BYTES
    from cura.train import TrainConfig
    from cura.train.plan import plan_spec

    config = TrainConfig(model=name, method="qlora" if arm == "cura_qlora" else "lora", compute_dtype="bfloat16",
                         lora=LoraConfig(r=RANK, alpha=ALPHA, dropout=DROPOUT), batch_size=batch,
                         gradient_checkpointing=True)  # fmt: skip
    config = config.replace(data=dataclasses.replace(config.data, max_length=seq))
    p = plan(KNOWN_SHAPES[name], plan_spec(config, "cuda", native_bf16=True))
    state = p.term("optimizer state")  # paged: the pages in flight; host_bytes: the whole state
    resident = p.host_bytes or state
    return p.peak_bytes - p.term("framework overhead") + CUDA_WORKSPACE_BYTES - state + resident


def mfu(name: str, tokens_per_second: float, seq: int, peak_flops: float) -> float:
    n, layers, d = linear_params(name)
    return tokens_per_second * (4 * n + 6 * layers * seq * d) / peak_flops


def training(args, deadline: float, kernels: dict, device: dict, save) -> dict:
    """Every (model, arm) in its own process, within the time left; the planner next to each peak.
    `save(results)` is called after each arm, so a run cut short still leaves what it measured."""
    names = ["tiny"] if args.dry_run else args.models.split(",")
    spec = next((v for k, v in SPEC_BF16_FLOPS.items() if k in str(device.get("device", ""))), None)
    results: dict = {}
    for name in names:
        with tempfile.TemporaryDirectory(dir=args.scratch) as tmp:
            folder = Path(tmp) / name
            write_model(name, folder, args.dry_run)
            for arm in ARMS:
                left = deadline - time.time()
                if left < 30:
                    results.setdefault(name, {})[arm] = {"arm": arm, "error": "skipped: time budget spent"}
                    continue
                r = run_arm(arm, folder, args, timeout=left - 10)
                for b, m in r.get("batches", {}).items():
                    m["mfu_measured_peak"] = mfu(
                        name, m["tokens_per_second"], args.seq, kernels["matmul_bf16_flops"]
                    )
                    m["mfu_spec_peak"] = mfu(name, m["tokens_per_second"], args.seq, spec) if spec else None
                    pred = predicted_allocated(name, arm, int(b), args.seq, args.dry_run)
                    m["planner_predicted_bytes"] = pred
                    if pred and m["peak_allocated_bytes"]:
                        m["planner_error"] = pred / m["peak_allocated_bytes"] - 1
                results.setdefault(name, {})[arm] = r
                save(results)
    return results


def verdicts(train: dict, kernels: dict) -> dict:
    """Each aim of the issue against what was measured (None where an arm did not run)."""
    out: dict = {"dequant_vs_copy": {k: v["dequant_vs_copy"] >= AIMS["dequant_vs_copy"]
                                     for k, v in kernels["shapes"].items()}}  # fmt: skip
    for name, arms in train.items():
        for b in arms.get("cura_qlora", {}).get("batches", {}):
            q = arms["cura_qlora"]["batches"][b]
            peft = arms.get("peft_bnb_qlora", {}).get("batches", {}).get(b)
            lora = arms.get("cura_lora", {}).get("batches", {}).get(b)
            key = f"{name}/batch{b}"
            if peft:
                out[f"{key}/speed_vs_peft"] = q["tokens_per_second"] / peft["tokens_per_second"]
                if q["peak_allocated_bytes"] and peft["peak_allocated_bytes"]:
                    out[f"{key}/memory_vs_peft"] = q["peak_allocated_bytes"] / peft["peak_allocated_bytes"]
            if lora:
                out[f"{key}/speed_vs_lora"] = q["tokens_per_second"] / lora["tokens_per_second"]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny shapes")
    parser.add_argument("--models", default="llama-3.2-1b,llama-3-8b")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--budget-seconds", type=float, default=450, help="stop starting arms after this")
    parser.add_argument("--scratch", default=None, help="where the random model folders go (default: tmp)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.dry_run:
        args.seq, args.batches, args.steps, args.warmup = min(args.seq, 64), "1,2", 1, 1
    batches = [int(b) for b in args.batches.split(",")]
    if args.child:
        result = child(
            args.child, Path(args.folder), batches, args.seq, args.steps, args.warmup, args.dry_run
        )
        print(json.dumps(result))
        return 0
    from cura.atomic import write_json

    start = time.time()
    deadline = start + args.budget_seconds
    report: dict = {"device": device_info(args.dry_run)}
    report["settings"] = dict(seq=args.seq, batches=batches, steps=args.steps, warmup=args.warmup, rank=RANK,
                              alpha=ALPHA, dropout=DROPOUT, targets=TARGETS, dtype="bfloat16")  # fmt: skip
    dry_out = Path(tempfile.gettempdir()) / "cura_train_gpu_dry_run.json"
    out = Path(args.out) if args.out else dry_out if args.dry_run else RESULTS / "train_gpu.json"

    def save(train: dict) -> None:
        report["training"] = train
        report["aims"], report["verdicts"] = AIMS, verdicts(train, report["kernels"])
        report["seconds"] = time.time() - start
        write_json(out, report)  # atomic: a reader never sees half a report

    report["kernels"] = kernel_bench(args.dry_run)
    report["parity"] = parity_tests(args.dry_run, timeout=120)
    save({})
    save(training(args, deadline, report["kernels"], report["device"], save))
    errors = [f"{m}/{a}: {r['error'][-300:]}" for m, arms in report["training"].items()
              for a, r in arms.items() if "error" in r]  # fmt: skip
    print(json.dumps({"out": str(out), "parity": report["parity"], "verdicts": report["verdicts"],
                      "errors": errors, "seconds": report["seconds"]}, indent=1))  # fmt: skip
    return 0 if report["parity"]["passed"] and not errors else 1


if __name__ == "__main__":
    sys.exit(main())
