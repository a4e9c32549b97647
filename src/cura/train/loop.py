"""The fine-tuning recipe: setup, loop, teardown.

    config ──> tokenizer ──> data (validated before anything is loaded or written)
           ──> 4-bit base (NF4 + double quantization) ──> LoRA on every linear but lm_head
           ──> loop: forward (checkpointed blocks) -> chunked loss -> backward -> clip -> paged AdamW step
                     -> log -> checkpoint (atomic) -> stop on SIGINT/SIGTERM after the step
           ──> adapter (PEFT layout) + metrics.jsonl + summary.json + loss.png

A resumed run restores the adapter, optimizer, scheduler, RNG and data position of the latest complete
checkpoint, so its losses are those of a run that was never interrupted.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from cura.adapters import attach_lora, load_adapter, save_adapter
from cura.config import to_dict
from cura.data import batches, build_datasets, effective_chat_template
from cura.errors import CuraError
from cura.hardware import default_device, resolve_compute_dtype
from cura.models import BaseSpec, load_model, load_tokenizer
from cura.nn import Linear4bit
from cura.optim import PagedAdamW
from cura.train.autofit import apply_cpu_malloc
from cura.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, write_json_atomic
from cura.train.config import TrainConfig
from cura.train.report import MetricsLog, human_bytes, plot_losses, write_summary
from cura.train.steps import (
    count_input_tokens,
    count_trained_tokens,
    current_memory_bytes,
    enable_activation_checkpointing,
    graceful_stop,
    loss_sum,
    lr_lambda,
    peak_memory_bytes,
)

Say = Callable[[str], None]


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class TrainHooks:
    """Points where a caller (the demo, a test, a notebook) can look at the run without changing it."""

    on_model_ready: Callable[[torch.nn.Module, Any], None] | None = None  # (model, tokenizer), before step 1
    on_step_end: Callable[[int, dict[str, Any]], None] | None = None  # (step, logged row)


class TrainResult(dict):
    """The run's summary (a dict, as written to summary.json) with the trained model attached."""

    model: torch.nn.Module
    tokenizer: Any
    output_dir: Path


# ----------------------------------------------------------------------------------------------- setup


def _prepare_output(out: Path, config: TrainConfig) -> None:
    if config.resume or not out.exists() or not any(out.iterdir()):
        return
    if not config.overwrite:
        raise CuraError(
            f"output folder {out} already holds a run; pass --resume to continue it, --overwrite to train "
            "over it, or choose another --output"
        )


def make_optimizer(config: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    betas = (config.adam_beta1, config.adam_beta2)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(
            params, lr=config.lr, betas=betas, weight_decay=config.weight_decay, foreach=False
        )
    bits = 8 if config.optimizer == "paged_adamw_8bit" else 32
    return PagedAdamW(params, lr=config.lr, betas=betas, weight_decay=config.weight_decay, optim_bits=bits)


def _count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    for module in model.modules():  # frozen 4-bit weights are buffers, not parameters
        if isinstance(module, Linear4bit):
            total += module.in_features * module.out_features
    return trainable, total


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class BatchStream:
    """Micro-batches across epochs from a deterministic per-epoch order; its position is checkpointed."""

    def __init__(
        self, make_epoch: Callable[[int], list[dict[str, torch.Tensor]]], epoch: int = 0, index: int = 0
    ):
        self.make_epoch = make_epoch
        self.epoch, self.index = epoch, index
        self._cache: tuple[int, list] | None = None

    def _batches(self) -> list[dict[str, torch.Tensor]]:
        if self._cache is None or self._cache[0] != self.epoch:
            self._cache = (self.epoch, self.make_epoch(self.epoch))
            if not self._cache[1]:
                raise CuraError("the training split produced no batches; add rows to the data file")
        return self._cache[1]

    def take(self, n: int) -> list[dict[str, torch.Tensor]]:
        out = []
        while len(out) < n:
            epoch_batches = self._batches()
            if self.index >= len(epoch_batches):
                self.epoch, self.index = self.epoch + 1, 0
                continue
            out.append(epoch_batches[self.index])
            self.index += 1
        return out


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module, eval_batches: list, device: torch.device, chunk: int
) -> float | None:
    """Token-weighted mean cross-entropy over the trained (answer) tokens of the eval batches."""
    if not eval_batches:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in eval_batches:
        s, n = loss_sum(model, _to_device(batch, device), chunk)
        total += float(s)
        count += n
    model.train(was_training)
    return total / max(count, 1)


# ------------------------------------------------------------------------------------------ one step


def optimizer_step(model, micro_batches, optimizer, scheduler, params, config: TrainConfig, device) -> dict:
    """Forward and backward over the micro-batches (loss normalised by the step's trained tokens), clip, step."""
    n_trained = sum(count_trained_tokens(b) for b in micro_batches)
    loss_total = 0.0
    for batch in micro_batches:
        s, _ = loss_sum(model, _to_device(batch, device), config.loss_chunk_tokens)
        (s / max(n_trained, 1)).backward()
        loss_total += float(s.detach())
    loss = loss_total / max(n_trained, 1)
    max_norm = config.max_grad_norm if config.max_grad_norm > 0 else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    finite = math.isfinite(loss) and math.isfinite(grad_norm)
    lr = optimizer.param_groups[0]["lr"]
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return {
        "loss": loss if finite else None,
        "raw_loss": loss,
        "grad_norm": grad_norm,
        "lr": lr,
        "finite": finite,
        "trained_tokens": n_trained,
        "input_tokens": sum(count_input_tokens(b) for b in micro_batches),
    }


# ------------------------------------------------------------------------------------------- the run


def train(config: TrainConfig, *, hooks: TrainHooks | None = None, say: Say = _say) -> TrainResult:
    """Fine-tune `config.model` with LoRA on its (4-bit) frozen base; returns the summary and the model."""
    hooks = hooks or TrainHooks()
    started = time.perf_counter()
    out = Path(config.output_dir)
    _prepare_output(out, config)
    if config.threads:
        torch.set_num_threads(config.threads)
    device = default_device()
    compute_dtype = resolve_compute_dtype(config.compute_dtype, device)
    if device.type == "cpu":
        apply_cpu_malloc(config, say)

    # 1. data first: a bad row stops the run before a model is loaded or a file is written
    tokenizer = load_tokenizer(config.model)
    train_set, eval_set, data_report = build_datasets(config.data, tokenizer)
    say(str(data_report))
    template, is_fallback = effective_chat_template(tokenizer)

    # 2. the model: 4-bit base (or full precision for method=lora), LoRA on the targets
    loaded = load_model(
        config.model,
        quantize=config.method == "qlora",
        quant_type=config.quant_type,
        blocksize=config.blocksize,
        double_quant=config.double_quant,
        compute_dtype=compute_dtype,
        device=str(device),
    )
    model, tokenizer = loaded.model, loaded.tokenizer
    torch.manual_seed(config.seed)
    targets = attach_lora(model, config.lora)
    model.to(device)
    if config.gradient_checkpointing:
        enable_activation_checkpointing(model)
    model.config.use_cache = False
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable, n_total = _count_parameters(model)
    say(
        f"model {config.model} ({loaded.kind}, {config.method}, {n_total / 1e6:.1f}M parameters, "
        f"{str(compute_dtype).removeprefix('torch.')} compute on {device.type}); LoRA r={config.lora.r} "
        f"on {len(targets)} linear layers: {n_trainable:,} trainable parameters "
        f"({100 * n_trainable / max(n_total, 1):.2f}%)"
    )

    # 3. optimizer, schedule, data order
    optimizer = make_optimizer(config, params)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def epoch_batches(epoch: int, dataset=train_set):
        return batches(
            dataset,
            batch_size=config.batch_size,
            max_length=config.data.max_length,
            packing=config.data.packing,
            seed=config.seed,
            epoch=epoch,
            pad_token_id=pad_id,
        )

    steps_per_epoch = max(1, math.ceil(len(epoch_batches(0)) / config.grad_accum))
    total_steps = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
    scheduler = LambdaLR(optimizer, lr_lambda(config.schedule, config.warmup_steps, total_steps))
    eval_batches = epoch_batches(0, eval_set) if eval_set is not None and len(eval_set) else []
    if config.eval_batches:
        eval_batches = eval_batches[: config.eval_batches]

    # 4. fresh run or resume
    out.mkdir(parents=True, exist_ok=True)
    metrics = MetricsLog(out / "metrics.jsonl")
    ckpt_root = out / "checkpoints"
    state: dict[str, Any] = {"epoch": 0, "index": 0, "eval_loss_before": None, "bad_streak": 0, "skipped": 0}
    step = 0
    latest = latest_checkpoint(ckpt_root) if config.resume else None
    if latest is not None:
        load_adapter(model, latest, trainable=True)
        state.update(load_checkpoint(latest, optimizer=optimizer, scheduler=scheduler))
        step = state.pop("step")
        metrics.truncate_after(step)
        say(f"resuming from {latest} (step {step} of {total_steps})")
    else:
        if config.resume:
            say(f"no complete checkpoint in {ckpt_root}: starting a new run")
        if metrics.path.exists():
            metrics.path.unlink()
        write_json_atomic(out / "config.json", to_dict(config))
    stream = BatchStream(epoch_batches, state["epoch"], state["index"])

    def save_adapter_to(folder: Path) -> None:
        save_adapter(
            model,
            config.lora,
            folder,
            base=BaseSpec.from_config(
                config,
                chat_template=template,
                chat_template_source="fallback" if is_fallback else "tokenizer",
                compute_dtype=compute_dtype,
            ),
        )

    def checkpoint_now() -> Path:
        trainer_state = dict(state, epoch=stream.epoch, index=stream.index, total_steps=total_steps)
        return save_checkpoint(
            ckpt_root,
            step,
            save_adapter_to=save_adapter_to,
            optimizer=optimizer,
            scheduler=scheduler,
            trainer_state=trainer_state,
            keep=config.keep_checkpoints,
        )

    if hooks.on_model_ready:
        hooks.on_model_ready(model, tokenizer)
    if state["eval_loss_before"] is None:
        state["eval_loss_before"] = evaluate_loss(model, eval_batches, device, config.loss_chunk_tokens)
        if state["eval_loss_before"] is not None:
            say(f"held-out loss before training: {state['eval_loss_before']:.4f}")

    # 5. the loop
    start_step = step
    model.train()
    interrupted = None
    train_seconds, tokens_seen = 0.0, 0
    progress = _progress_bar(config, total_steps, step)
    with graceful_stop() as stop:
        while step < total_steps:
            t0 = time.perf_counter()
            result = optimizer_step(
                model, stream.take(config.grad_accum), optimizer, scheduler, params, config, device
            )
            step += 1
            dt = time.perf_counter() - t0
            train_seconds += dt
            tokens_seen += result["input_tokens"]
            row = _log_row(step, stream.epoch, result, dt, device)
            if not result["finite"]:
                state["skipped"] += 1
                state["bad_streak"] += 1
                say(
                    f"step {step}: non-finite loss or gradient (loss {result['raw_loss']}, grad norm "
                    f"{result['grad_norm']}): step skipped"
                )
                if state["bad_streak"] >= config.max_bad_steps:
                    last = latest_checkpoint(ckpt_root)
                    progress.close()
                    raise CuraError(
                        f"training stopped at step {step}: {state['bad_streak']} non-finite steps in a row; "
                        f"the last good checkpoint is {last or 'none (no checkpoint was written yet)'}; lower the "
                        "learning rate ('lr') or check the data, then resume with --resume"
                    )
            else:
                state["bad_streak"] = 0
            if config.eval_every and step % config.eval_every == 0 and step < total_steps:
                row["eval_loss"] = evaluate_loss(model, eval_batches, device, config.loss_chunk_tokens)
            if step % config.log_every == 0 or step == total_steps:
                metrics.append(row)
            progress.update(1)
            progress.set_postfix_str(_postfix(row))
            if hooks.on_step_end:
                hooks.on_step_end(step, row)
            if stop:
                interrupted = stop.requested
                break
            if (
                config.save_every
                and step % config.save_every == 0
                and step < total_steps
                and state["bad_streak"] == 0
            ):
                checkpoint_now()
    progress.close()

    # 6. teardown: checkpoint, adapter, eval, summary, plot
    if state["bad_streak"] == 0:
        last_ckpt = checkpoint_now()
    else:
        last_ckpt = latest_checkpoint(ckpt_root)
    if interrupted:
        say(
            f"stopped by {interrupted} after step {step} of {total_steps}; checkpoint saved in {last_ckpt}. "
            f"Resume with the same command plus --resume (output folder {out})"
        )
    adapter_dir = out / "adapter"
    _save_adapter_atomic(save_adapter_to, adapter_dir)
    eval_after = None
    if not interrupted:
        eval_after = evaluate_loss(model, eval_batches, device, config.loss_chunk_tokens)
    rows = metrics.read()
    losses = [r["loss"] for r in rows if r.get("loss") is not None]
    summary = {
        "model": config.model,
        "method": config.method,
        "steps": step,
        "total_steps": total_steps,
        "completed": not interrupted and step >= total_steps,
        "interrupted_by": interrupted,
        "train_loss_first": losses[0] if losses else None,
        "train_loss_last": losses[-1] if losses else None,
        "train_loss_last10_mean": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
        "eval_loss_before": state["eval_loss_before"],
        "eval_loss_after": eval_after,
        "skipped_steps": state["skipped"],
        "tokens_per_second": tokens_seen / train_seconds if train_seconds else None,
        "seconds_per_step": train_seconds / max(1, step - start_step),
        "peak_memory_bytes": peak_memory_bytes(device),
        "wall_seconds": time.perf_counter() - started,
        "trainable_parameters": n_trainable,
        "total_parameters": n_total,
        "lora_targets": len(targets),
        "train_samples": len(train_set),
        "eval_samples": len(eval_set) if eval_set is not None else 0,
        "device": str(device),
        "compute_dtype": str(compute_dtype).removeprefix("torch."),
        "adapter_dir": str(adapter_dir),
        "checkpoint": str(last_ckpt) if last_ckpt else None,
    }
    write_summary(out / "summary.json", summary)
    if rows:
        plot_losses(rows, out / "loss.png")
    say(_summary_text(summary, out))
    result = TrainResult(summary)
    result.model, result.tokenizer, result.output_dir = model, tokenizer, out
    return result


def _save_adapter_atomic(save_to: Callable[[Path], None], folder: Path) -> None:
    import shutil

    tmp = folder.with_name(f".{folder.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_to(tmp)
    old = folder.with_name(f".{folder.name}.old")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    if old.exists():
        shutil.rmtree(old)


def _log_row(step: int, epoch: int, result: dict, seconds: float, device: torch.device) -> dict[str, Any]:
    row = {
        "step": step,
        "epoch": epoch,
        "loss": result["loss"],
        "lr": result["lr"],
        "grad_norm": result["grad_norm"] if math.isfinite(result["grad_norm"]) else None,
        "trained_tokens": result["trained_tokens"],
        "tokens_per_second": result["input_tokens"] / seconds if seconds else None,
        "seconds": seconds,
        "memory_bytes": current_memory_bytes(device),
    }
    if not result["finite"]:
        row["skipped"] = True
    return row


def _postfix(row: dict[str, Any]) -> str:
    loss = "skipped" if row["loss"] is None else f"{row['loss']:.4f}"
    text = f"loss {loss} lr {row['lr']:.2e} {row['tokens_per_second'] or 0:.0f} tok/s mem {human_bytes(row['memory_bytes'])}"
    if row.get("eval_loss") is not None:
        text += f" eval {row['eval_loss']:.4f}"
    return text


def _progress_bar(config: TrainConfig, total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc="training",
        unit="step",
        disable=not config.progress,
        dynamic_ncols=True,
    )


def _summary_text(s: dict[str, Any], out: Path) -> str:
    def fmt(x):
        return "n/a" if x is None else f"{x:.4f}"

    lines = [
        f"steps {s['steps']}/{s['total_steps']}; train loss {fmt(s['train_loss_first'])} -> {fmt(s['train_loss_last'])}; "
        f"held-out loss {fmt(s['eval_loss_before'])} -> {fmt(s['eval_loss_after'])}",
        f"{s['tokens_per_second'] or 0:.0f} tokens/s; peak memory {human_bytes(s['peak_memory_bytes'])}; "
        f"{s['wall_seconds']:.0f} s in all",
        f"adapter: {s['adapter_dir']}  metrics: {out / 'metrics.jsonl'}  plot: {out / 'loss.png'}",
    ]
    return "\n".join(lines)
