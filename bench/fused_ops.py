"""Do fused or compiled RMSNorm / RoPE / SwiGLU make a CPU training step faster? (issue 15; measured: no).

Interleaved A/B of real `Run.step`s (the bundled SmolLM2-135M, 4 x 256 tokens, checkpointing) in ONE process
and ONE model, each round running one step per variant in turn (the transformers Llama functions swapped in
and out), so a drifting machine load hits every variant alike; the paired per-round ratio to `eager` is the
number to read. The first step of each variant is reported apart (torch.compile's compile time).

    PYTHONPATH=src OMP_NUM_THREADS=2 python bench/fused_ops.py bfloat16 2 3 eager,rmsFn,ropeFn,swFn,rmsC,ropeC,swC
    (AVX2-only kind: ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 ... float32)

Variants: rmsF (torch.nn.functional.rms_norm), rmsFn / ropeFn / swFn (hand-written autograd Functions below,
analytic backward, checked by `torch.autograd.gradcheck` in float64 before anything is timed), rmsC / ropeC /
swC (torch.compile, inductor CPU, of transformers' eager bodies); join with "+" to combine.

Measured 2026-12-02 (2 threads on a 2-core AVX512-BF16 VM shared with other jobs; paired median ratio to
eager, > 1 is slower; first step incl. compile): native bf16, 3 rounds: rmsFn 0.98, ropeFn 1.05, swFn 1.09,
rmsC 1.03 (12 s), ropeC 1.08 (11 s), swC 1.04 (5 s), eager 4.78 s/step; AVX2 float32, 2 rounds: rmsFn 1.03,
ropeFn 1.09, rmsC 1.03 (27 s), ropeC 1.10 (18 s), swC 1.13 (16 s), eager 13.1 s/step. No variant wins by a
clear margin (> 3%), so none is in src/cura: these ops are a small part of a step dominated by matmuls.
"""

import json
import sys
import time

import torch
import torch.nn.functional as F
import transformers.models.llama.modeling_llama as ml

from cura.config import from_dict
from cura.train.config import TrainConfig
from cura.train.measure import synthetic_batch
from cura.train.run import build_run, prepare_process


class _RMSNorm(torch.autograd.Function):
    """transformers' LlamaRMSNorm (float32 statistics, cast, times the weight) with an analytic backward
    for a frozen weight: saves the input and the per-row 1/rms only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, rstd, weight)
        return weight * (xf * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, rstd, weight = ctx.saved_tensors
        g = (dy * weight).to(rstd.dtype)
        xhat = x.to(rstd.dtype) * rstd
        dot = (g * xhat).mean(-1, keepdim=True)
        dx = (g - xhat * dot) * rstd
        return dx.to(x.dtype), None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if weight.requires_grad:
        dt = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return weight * h.to(dt)
    return _RMSNorm.apply(x, weight, eps)


class _RoPE(torch.autograd.Function):
    """q*cos + rotate_half(q)*sin for q and k; backward analytic: saves only cos and sin."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rope(q, cos, sin), _rope(k, cos, sin)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        return _rope_t(dq, cos, sin), _rope_t(dk, cos, sin), None, None


def _rope(x, cos, sin):
    """x*cos + R(x)*sin with R(x) = cat(-x2, x1), without the cat: two in-place addcmuls on halves."""
    h = x.shape[-1] // 2
    out = x * cos
    out[..., :h].addcmul_(x[..., h:], sin[..., :h], value=-1)
    out[..., h:].addcmul_(x[..., :h], sin[..., h:])
    return out


def _rope_t(g, cos, sin):
    """The transpose of `_rope` (its backward): g*cos + R^T(g*sin), R^T(v) = cat(v2, -v1)."""
    h = g.shape[-1] // 2
    out = g * cos
    out[..., :h].addcmul_(g[..., h:], sin[..., h:])
    out[..., h:].addcmul_(g[..., :h], sin[..., :h], value=-1)
    return out


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim: int = 1):
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    return _RoPE.apply(q, k, cos, sin)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, u):
        ctx.save_for_backward(g, u)
        return F.silu(g) * u

    @staticmethod
    def backward(ctx, dy):
        g, u = ctx.saved_tensors
        s = torch.sigmoid(g)
        du = dy * g * s
        dg = torch.ops.aten.silu_backward(dy * u, g)
        return dg, du


def swiglu(g, u):
    return _SwiGLU.apply(g, u)


ORIG = {"rms": ml.LlamaRMSNorm.forward, "rope": ml.apply_rotary_pos_emb, "mlp": ml.LlamaMLP.forward}


def rms_body(x, w, eps: float):
    dt = x.dtype
    h = x.to(torch.float32)
    v = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(v + eps)
    return w * h.to(dt)


def rope_body(q, k, cos, sin):
    return ORIG["rope"](q, k, cos, sin)


def sw_body(g, u):
    return F.silu(g) * u


_c = {}


def compiled(name, fn):
    if name not in _c:
        _c[name] = torch.compile(fn)
    return _c[name]


def set_rms(fn):
    ml.LlamaRMSNorm.forward = (
        (lambda self, x: fn(x, self.weight, self.variance_epsilon)) if fn else ORIG["rms"]
    )


def set_rope(fn):
    ml.apply_rotary_pos_emb = fn or ORIG["rope"]


def set_sw(fn):
    if fn is None:
        ml.LlamaMLP.forward = ORIG["mlp"]
    else:
        ml.LlamaMLP.forward = lambda self, x: self.down_proj(fn(self.gate_proj(x), self.up_proj(x)))


def variant(name):
    set_rms(None)
    set_rope(None)
    set_sw(None)
    for part in name.split("+"):
        if part == "eager":
            pass
        elif part == "rmsF":
            set_rms(lambda x, w, eps: F.rms_norm(x, (x.shape[-1],), w, eps))
        elif part == "rmsFn":
            set_rms(rms_norm)
        elif part == "rmsC":
            set_rms(compiled("rms", rms_body))
        elif part == "ropeFn":
            set_rope(apply_rotary_pos_emb)
        elif part == "ropeC":
            set_rope(compiled("rope", rope_body))
        elif part == "swFn":
            set_sw(swiglu)
        elif part == "swC":
            set_sw(compiled("sw", sw_body))
        else:
            raise SystemExit(f"unknown {part}")


def gradcheck_candidates() -> None:
    """The hand-written Functions against autograd's own gradients (float64), before anything is timed."""
    g = torch.Generator().manual_seed(0)

    def r(*shape, grad=True):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(grad)

    cos, sin = r(2, 8, 16, grad=False), r(2, 8, 16, grad=False)
    w = r(16, grad=False)
    assert torch.autograd.gradcheck(
        lambda q, k: apply_rotary_pos_emb(q, k, cos, sin), (r(2, 4, 8, 16), r(2, 2, 8, 16))
    )
    assert torch.autograd.gradcheck(lambda x: rms_norm(x, w, 1e-5), (r(3, 5, 16),))
    assert torch.autograd.gradcheck(swiglu, (r(3, 7), r(3, 7)))


dtype, threads, rounds, variants = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4].split(",")
gradcheck_candidates()
config = from_dict(
    TrainConfig,
    {
        "model": "smollm2-135m",
        "batch_size": 4,
        "threads": threads,
        "compute_dtype": dtype,
        "data": {"max_length": 256},
        "gradient_checkpointing": True,
    },
)
prepare_process(config, torch.device("cpu"), say=lambda m: None)
run = build_run(config, torch.device("cpu"), with_data=False)
vocab = run.model.config.vocab_size
batches = [synthetic_batch(vocab, 4, 256, config.data.packing, s) for s in range(2)]
times = {v: [] for v in variants}
first = {}
# warm-up: each variant once (compile time = its first step minus eager's steady time)
for v in variants:
    variant(v)
    t = time.perf_counter()
    run.step([batches[0]])
    first[v] = time.perf_counter() - t
    print(f"first {v}: {first[v]:.2f} s", flush=True)
for r in range(rounds):
    for v in variants if r % 2 == 0 else variants[::-1]:
        variant(v)
        t = time.perf_counter()
        out = run.step([batches[r % 2]])
        times[v].append(time.perf_counter() - t)
    print(f"round {r}: " + "  ".join(f"{v} {times[v][-1]:.2f}" for v in variants), flush=True)
base = sorted(times[variants[0]])[len(times[variants[0]]) // 2]
res = {}
for v in variants:
    ts = sorted(times[v])
    med = ts[len(ts) // 2]
    # per-round ratio against the first variant (paired, the load drifts between rounds)
    ratios = sorted(a / b for a, b in zip(times[v], times[variants[0]]))
    res[v] = dict(median_s=med, min_s=ts[0], ratio_median=ratios[len(ratios) // 2], first_step_s=first[v])
    print(
        f"{v:28s} median {med:.3f} s  min {ts[0]:.3f}  paired ratio {ratios[len(ratios) // 2]:.3f}  first {first[v]:.1f} s"
    )
print(json.dumps(res))
