"""The named steps of one optimizer step: loss, forward/backward/update, held-out loss, schedule, stop
signals, memory readings.

The loss is computed only where it is needed: hidden states at the trained positions (labels != -100) go
through the output layer a chunk at a time, so the full (batch, seq, vocab) logits tensor never exists. For a
49k-token vocabulary at 4 x 256 tokens that is 200 MB of float32 logits (and as much again for their
gradient) that a plain `model(..., labels=...)` would hold.

With a frozen output layer (every LoRA / QLoRA run) each chunk's forward also computes the gradient it will
pass to its hidden states (`_HeadLoss`) and keeps only that, (chunk, hidden) in the compute dtype: the
logits are made once per step instead of twice (checkpointing would run the output layer's matmul and the
log-softmax again in backward). The logits' gradient (softmax minus one-hot, times the step's own loss
scale `grad_scale`) is written in place into the logits' own float32 buffer instead of autograd's three fresh
(chunk, vocab) tensors (`_fused_chunk_loss`): the loss is bit-identical to the checkpointed path, the
gradient equal to float32 round-off. A trained output layer (its weight needs a gradient) keeps the
checkpointed path.
"""

from __future__ import annotations

import math
import resource
import sys

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from cura.constants import IGNORE_INDEX


def _chunk_loss_sum(
    hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module, softcap: float | None
):
    logits = head(hidden).float()  # (N, V)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, reduction="sum")


def autograd_chunk_loss(hidden, targets, head, softcap, scale):
    """The reference of `_fused_chunk_loss`: the same loss and hidden-state gradient by autograd's own
    cross-entropy backward (three fresh (c, V) float32 tensors)."""
    with torch.enable_grad():
        h = hidden.detach().requires_grad_()
        total = _chunk_loss_sum(h, targets, head, softcap)
        (grad,) = torch.autograd.grad(total, h, scale)
    return total.detach(), grad


def _fused_chunk_loss(hidden, targets, head, softcap, scale):
    """One chunk's summed cross-entropy and the gradient `scale` sends back through it to `hidden`, with
    the logits' gradient made in place in their own buffer: softmax * scale, minus scale at each target.

    autograd's cross-entropy holds three (c, V) float32 tensors at its backward (the log-softmax it saves,
    the one-hot gradient arriving at it, the gradient it returns), each allocated afresh and, for a tensor
    this size, page-faulted in again from the OS by every chunk; here one float32 buffer is reused (in a
    16-bit compute dtype also the head's (c, V) output, which takes the gradient cast back). The loss is
    the same ops on the same values (`F.cross_entropy` is `nll_loss(log_softmax)`): bit-identical. The
    gradient differs from autograd's in float32 round-off only: torch's log-softmax backward evaluates
    exp with a faster, less exact polynomial than `Tensor.exp_`. The output layer's own backward stays
    autograd's (so FSDP's hooks gather a sharded weight as they do for any module)."""
    with torch.enable_grad():
        h = hidden.detach().requires_grad_()
        out = head(h)  # (c, V) in the compute dtype
    logits = out.detach().float()  # float32 already: the same storage
    if softcap:  # z = softcap * tanh(x / softcap); dz/dx = 1 - tanh^2
        tanh = logits.div_(softcap).tanh_()
        logits = tanh * softcap
    logp = torch.log_softmax(logits, -1, out=logits)
    total = F.nll_loss(logp, targets, reduction="sum")
    grad = logp.exp_().mul_(scale)
    rows = torch.arange(len(targets), device=grad.device)
    grad[rows, targets] -= scale
    if softcap:
        grad.mul_(tanh.square_().neg_().add_(1.0))
        del tanh
    if grad.dtype != out.dtype:
        grad = out.detach().copy_(grad)  # the head's output is not needed any more: its buffer takes it
    (grad_hidden,) = torch.autograd.grad(out, h, grad)
    return total, grad_hidden


class _HeadLoss(torch.autograd.Function):
    """One chunk's summed cross-entropy through a frozen output layer, its backward done in its forward.

    forward runs `_fused_chunk_loss` with `scale` as the incoming gradient, the one the step's
    ``(sum / trained_tokens).backward()`` will send, and keeps only the gradient of the chunk's hidden
    states. backward hands that gradient on as it is when the incoming gradient is `scale` exactly,
    rescaled otherwise."""

    @staticmethod
    def forward(ctx, hidden, targets, head, softcap, scale):
        total, grad = _fused_chunk_loss(hidden, targets, head, softcap, scale)
        ctx.save_for_backward(grad, scale)
        return total.detach()

    @staticmethod
    def backward(ctx, grad_total):
        grad, scale = ctx.saved_tensors
        if not torch.equal(grad_total, scale):
            grad = grad * (grad_total / scale).to(grad.dtype)
        return grad, None, None, None, None


def _frozen(module: torch.nn.Module) -> bool:
    return not any(p.requires_grad for p in module.parameters())


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer in backward, keeping only its input (non-reentrant checkpointing).

    transformers renamed `gradient_checkpointing_enable` to `activation_checkpointing_enable` during 5.x;
    either is the same mechanism.
    """
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def loss_sum(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    chunk_tokens: int,
    grad_scale: float = 1.0,
) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the trained tokens of `batch`, and their count.

    labels are aligned with input_ids: the prediction at position t is scored against labels[t + 1].
    `grad_scale` is the gradient the caller's backward will send to the sum (``(sum / n).backward()``:
    1 / n); any other gradient is still right, the expected one saves a rescale and keeps the result
    bit-identical to a checkpointed loss.
    """
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    targets = batch["labels"][:, 1:]  # (B, T-1)
    mask = targets != IGNORE_INDEX
    n_tokens = int(mask.sum())
    hidden = model.get_decoder()(**inputs, use_cache=False).last_hidden_state  # (B, T, H)
    if n_tokens == 0:
        return hidden.sum() * 0.0, 0
    hidden = hidden[:, :-1][mask]  # (N, H)
    targets = targets[mask]  # (N,)
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    total = hidden.new_zeros((), dtype=torch.float32)
    trains = torch.is_grad_enabled() and hidden.requires_grad
    fused = trains and _frozen(head)
    # the gradient `(total / n).backward()` sends each chunk, made as autograd makes it: float32 1 / n
    scale = torch.ones((), dtype=torch.float32, device=hidden.device) * grad_scale if fused else None
    for start in range(0, n_tokens, chunk_tokens):
        h, t = hidden[start : start + chunk_tokens], targets[start : start + chunk_tokens]
        if fused:
            total = total + _HeadLoss.apply(h, t, head, softcap, scale)
        elif trains:
            total = total + checkpoint(_chunk_loss_sum, h, t, head, softcap, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(h, t, head, softcap)
    return total, n_tokens


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def clip_and_step(
    optimizer, scheduler, params, max_grad_norm: float, loss: float
) -> tuple[float, bool, float]:
    """Clip the gradients (`max_grad_norm` <= 0: measure only), update where the loss and the norm are
    finite (else skip the update), clear the gradients and step the schedule: (grad norm, finite, lr)."""
    max_norm = max_grad_norm if max_grad_norm > 0 else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    finite = math.isfinite(loss) and math.isfinite(grad_norm)
    lr = optimizer.param_groups[0]["lr"]
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return grad_norm, finite, lr


def optimizer_step(
    model,
    micro_batches,
    optimizer,
    scheduler,
    params,
    *,
    chunk_tokens: int,
    max_grad_norm: float,
    device,
    world=None,
) -> dict:
    """Forward and backward over the micro-batches (loss normalised by the step's trained tokens), clip, and
    step the optimizer unless the loss or gradient norm is not finite; the schedule advances either way.

    Under torchrun (`world`, a `cura.train.distributed.World`) the token counts, the loss and the gradients
    are summed over the ranks, so the step is that of one process reading every rank's micro-batches."""
    n_trained = sum(count_trained_tokens(b) for b in micro_batches)
    n_input = sum(count_input_tokens(b) for b in micro_batches)
    if world is not None:
        n_trained, n_input = (int(x) for x in world.sum([n_trained, n_input]))
    loss_total = 0.0
    for batch in micro_batches:
        s, _ = loss_sum(model, to_device(batch, device), chunk_tokens, 1.0 / max(n_trained, 1))
        (s / max(n_trained, 1)).backward()
        loss_total += float(s.detach())
    if world is not None:
        (loss_total,) = world.sum([loss_total])
        world.all_reduce_grads(params)
    loss = loss_total / max(n_trained, 1)
    grad_norm, finite, lr = clip_and_step(optimizer, scheduler, params, max_grad_norm, loss)
    return {
        "loss": loss if finite else None,
        "raw_loss": loss,
        "grad_norm": grad_norm,
        "lr": lr,
        "finite": finite,
        "trained_tokens": n_trained,
        "input_tokens": n_input,
    }


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, eval_batches, device: torch.device, chunk: int) -> float | None:
    """Token-weighted mean cross-entropy over the trained (answer) tokens of the eval batches."""
    if not eval_batches:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in eval_batches:
        s, n = loss_sum(model, to_device(batch, device), chunk)
        total += float(s)
        count += n
    model.train(was_training)
    return total / max(count, 1)


def count_trained_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def count_input_tokens(batch: dict[str, torch.Tensor]) -> int:
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        return int(mask.sum())
    return int(batch["input_ids"].numel())


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int):
    """Multiplier of the base learning rate at optimizer step `s` (0-based): linear warmup, then the schedule."""

    def factor(s: int) -> float:
        if warmup_steps and s < warmup_steps:
            return (s + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (s - warmup_steps) / span)
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine to zero

    return factor


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of the run so far: CUDA allocations on a GPU, the process's peak RSS on a CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def current_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return peak_memory_bytes(device)
