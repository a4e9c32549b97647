"""The fine-tuning recipe: setup, loop, teardown.

    config ──> tokenizer ──> data (validated before anything is loaded or written)       `build_run`
           ──> 4-bit base (NF4 + double quantization) ──> LoRA on every linear but lm_head
           ──> loop: forward (checkpointed blocks) -> chunked loss -> backward -> clip -> paged AdamW step
                     -> log -> checkpoint (atomic) -> stop on SIGINT/SIGTERM after the step      `run_loop`
           ──> adapter (PEFT layout) + metrics.jsonl + summary.json + loss.png                  `finish`

A resumed run restores the adapter, optimizer, scheduler, RNG and data position (`TrainerState`) of the
latest complete checkpoint, so its losses are those of a run that was never interrupted.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from cura.adapters import check_same_base, load_adapter, save_adapter
from cura.atomic import atomic_folder, write_json
from cura.config import to_dict
from cura.errors import CuraError
from cura.hardware import default_device
from cura.models import BaseSpec
from cura.train import fsdp, guard, resume_check
from cura.train.checkpoint import (
    TrainerState,
    latest_checkpoint,
    load_checkpoint,
    resumable_checkpoint,
    save_checkpoint,
)
from cura.train.config import TrainConfig
from cura.train.distributed import check_same_checkpoint, check_world_size, init_world
from cura.train.preference_report import preference_summary, preference_text
from cura.train.preflight import preflight, settle_for_device
from cura.train.report import (
    MetricsLog,
    log_row,
    plot_losses,
    postfix,
    progress_bar,
    summary_text,
    write_summary,
)
from cura.train.run import Run, build_run, prepare_process
from cura.train.rundir import claim_run_folder
from cura.train.signals import EvalInterrupted, RunSignals, run_signals
from cura.train.steps import current_memory_bytes, peak_memory_bytes
from cura.train.tracking import Tracking, prepare_tracking

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


@dataclass
class Session:
    """This process's share of the run (not checkpointed: a resumed run reports its own speed)."""

    out: Path
    metrics: MetricsLog
    started: float
    start_step: int = 0
    train_seconds: float = 0.0
    tokens_seen: int = 0
    interrupted: str | None = None  # the signal that stopped the loop
    tracking: Tracking = field(default_factory=Tracking)  # TensorBoard / W&B / MLflow (`report_to`)
    signals: RunSignals | None = None  # SIGINT/SIGTERM for the whole run (`cura.train.signals`)

    @property
    def checkpoints(self) -> Path:
        return self.out / "checkpoints"


# ------------------------------------------------------------------------------------------- the run


def train(config: TrainConfig, *, hooks: TrainHooks | None = None, say: Say = _say) -> TrainResult:
    """Fine-tune `config.model` with LoRA on its (4-bit) frozen base; returns the summary and the model."""
    hooks = hooks or TrainHooks()
    started = time.perf_counter()
    world = init_world()  # under torchrun: this rank's place in the job (cura.train.distributed)
    try:
        say = world.say(say)  # rank 0 alone speaks
        # one owner per folder (rank 0 holds its lock for the run's life); signals from load to the last write
        with run_signals() as signals, claim_run_folder(config, say) as out:
            world.barrier()  # rank 0 has checked the folder before any rank goes on
            # a missing tracker library stops here, before anything loads
            tracking = prepare_tracking(config, say)
            device = world.device or default_device()
            config = settle_for_device(config, device, world.size, say)  # gradient_checkpointing: auto
            preflight(config, device)  # the sequence fits the model's context, the plan fits the memory
            device, _ = prepare_process(config, device, say=say)
            run = build_run(config, device, say=say, world=world)
            say(describe_model(run))
            session = Session(
                out, MetricsLog(out / "metrics.jsonl"), started, tracking=tracking, signals=signals
            )
            state = start_or_resume(run, session, say)
            try:
                if hooks.on_model_ready:
                    hooks.on_model_ready(run.model, run.tokenizer)
                tracking.start(session.start_step, run_base_spec(run).to_dict(), out)
                evaluate_before(run, state, say)
                signals.phase = "train"
                run_loop(run, state, session, hooks, say)
                signals.phase = "save"
                return finish(run, state, session, say)
            except BaseException:
                tracking.close()  # the tracker runs end as failed; a resume reopens them
                raise
    finally:
        world.close()


# ----------------------------------------------------------------------------------------------- setup


def describe_model(run: Run) -> str:
    c = run.config
    n_trainable, n_total = run.parameter_counts()
    return (
        f"model {c.model} ({run.kind}, {c.method}, {n_total / 1e6:.1f}M parameters, "
        f"{str(run.compute_dtype).removeprefix('torch.')} compute on {run.device.type}); LoRA r={c.lora.r} "
        f"on {len(run.targets)} linear layers: {n_trainable:,} trainable parameters "
        f"({100 * n_trainable / max(n_total, 1):.2f}%)"
    )


def start_or_resume(run: Run, session: Session, say: Say) -> TrainerState:
    """A fresh state (and a fresh metrics.jsonl, config.json, run record), or the latest complete checkpoint
    restored after the run record was checked against this config (`cura.train.resume_check`)."""
    world = run.world
    latest = resumable_checkpoint(session.checkpoints, say) if run.config.resume and world.is_main else None
    latest = check_same_checkpoint(world, latest)  # rank 0's choice, readable by every rank
    if latest is None:
        if run.config.resume:
            say(f"no complete checkpoint in {session.checkpoints}: starting a new run")
        if world.is_main:
            if session.metrics.path.exists():
                session.metrics.path.unlink()
            write_json(session.out / "config.json", to_dict(run.config))
            resume_check.write_run_record(session.out, resume_check.run_record(run.config, run.model))
        return TrainerState(total_steps=run.total_steps, world_size=world.size)
    check_same_base(
        latest,
        run_base_spec(run),
        spec_is="this run's config describes",
        advice="resume with the model and quantization settings of the run that wrote it, or train into "
        "a new output folder",
    )
    load_adapter(run.model, latest, trainable=True)
    state = load_checkpoint(
        latest,
        optimizer=run.optimizer,
        scheduler=run.scheduler,
        optimizer_file=fsdp.optimizer_file(world, latest),
    )
    check_world_size(latest, state.world_size, world)  # before the settings: --nproc rescales batch_size
    record, changed = resume_check.check_resume(session.out, run.config, run.model)
    world.restore_rng(latest)  # rank r > 0: its own RNG state (load_checkpoint restored rank 0's)
    state.total_steps = run.total_steps  # the config's, which an allowed change of max_steps may have raised
    resume_check.apply_settings(run, state, changed)
    if world.is_main:
        resume_check.record_changes(session.out, record, changed, state.step, say)
        write_json(session.out / "config.json", to_dict(run.config))
    run.stream.epoch, run.stream.index = state.epoch, state.index
    if world.is_main:
        session.metrics.truncate_after(state.step)
    session.start_step = state.step
    say(f"resuming from {latest} (step {state.step} of {state.total_steps})")
    return state


def evaluate_before(run: Run, state: TrainerState, say: Say) -> None:
    """The base model's held-out loss, once per run (a resumed run keeps the first one)."""
    if state.eval_loss_before is not None:
        return
    state.eval_loss_before, state.eval_metrics_before = run.evaluate()
    if state.eval_loss_before is not None:
        say(f"held-out loss before training: {state.eval_loss_before:.4f}")


# ------------------------------------------------------------------------------------------ the loop


def run_loop(run: Run, state: TrainerState, session: Session, hooks: TrainHooks, say: Say) -> None:
    """Optimizer steps until `total_steps`, or until a stop signal (recorded in `session.interrupted`)."""
    run.model.train()
    progress = progress_bar(run.config.progress and run.world.is_main, state.total_steps, state.step)
    try:
        stop = session.signals
        while state.step < state.total_steps:
            row = train_step(run, state, session, say)
            stop_if_diverged(run, state, session)
            evaluate_during(run, state, row)
            log_step(run, state, session, row, progress, hooks)
            session.interrupted = run.world.agree_stop(
                stop.requested if stop else None
            )  # any rank's stops all
            if session.interrupted:
                return
            if checkpoint_due(run.config, state):
                save_run_checkpoint(run, state, session)
    finally:
        progress.close()


def train_step(run: Run, state: TrainerState, session: Session, say: Say) -> dict[str, Any]:
    """One optimizer step on the next micro-batches, counted in `state` (skipped if not finite); its log row."""
    t0 = time.perf_counter()
    result = run.step(run.stream.take(run.config.grad_accum))
    seconds = time.perf_counter() - t0
    state.step += 1
    state.epoch, state.index = run.stream.epoch, run.stream.index
    session.train_seconds += seconds
    session.tokens_seen += result["input_tokens"]
    if result["finite"]:
        state.bad_streak = 0
    else:
        state.skipped += 1
        state.bad_streak += 1
        say(
            f"step {state.step}: non-finite loss or gradient (loss {result['raw_loss']}, grad norm "
            f"{result['grad_norm']}): step skipped"
        )
    return log_row(state.step, run.stream.epoch, result, seconds, current_memory_bytes(run.device))


def stop_if_diverged(run: Run, state: TrainerState, session: Session) -> None:
    """Stop (CuraError with advice that works as printed) after `max_bad_steps` non-finite steps in a row,
    or at once when an update left the weights non-finite (`guard.weights_problem`): nothing is saved from
    them."""
    problem = guard.weights_problem(run.params)
    if problem is None and state.bad_streak < run.config.max_bad_steps:
        return
    state.bad_streak = max(state.bad_streak, 1)  # `finish` must not save these weights
    last = latest_checkpoint(session.checkpoints)
    what = f"the update left {problem}" if problem else f"{state.bad_streak} non-finite steps in a row"
    raise CuraError(
        f"training stopped at step {state.step}: {what}; {guard.lower_lr_advice(run.config.lr, last)}"
    )


def evaluate_during(run: Run, state: TrainerState, row: dict[str, Any]) -> None:
    every = run.config.eval_every
    if every and state.step % every == 0 and state.step < state.total_steps:
        loss, metrics = run.evaluate()
        row["eval_loss"] = state.last_eval_loss = loss
        row.update({f"eval_{k}": v for k, v in metrics.items()})


def log_step(run: Run, state: TrainerState, session: Session, row: dict, progress, hooks: TrainHooks) -> None:
    logged = state.step % run.config.log_every == 0 or state.step == state.total_steps
    if logged and run.world.is_main:
        session.metrics.append(row)
        session.tracking.log(row)
    progress.update(1)
    progress.set_postfix_str(postfix(row))
    if hooks.on_step_end:
        hooks.on_step_end(state.step, row)


def checkpoint_due(config: TrainConfig, state: TrainerState) -> bool:
    """An interval checkpoint after this step: never from a bad state, and not at the end (`finish` saves)."""
    every = config.save_every
    return (
        bool(every) and state.step % every == 0 and state.step < state.total_steps and state.bad_streak == 0
    )


def save_run_adapter(run: Run, folder: Path, weights=None, optimizer_shards=None) -> None:
    """The adapter files (PEFT layout plus cura's record of the base) of this run into `folder`; under
    --fsdp the gathered `weights` and the other ranks' optimizer shards (`cura.train.fsdp`)."""
    save_adapter(run.model, run.config.lora, folder, base=run_base_spec(run), weights=weights)
    if optimizer_shards:
        fsdp.write_optimizer_shards(folder, optimizer_shards)


def run_base_spec(run: Run) -> BaseSpec:
    """The record of the base this run trains on (written with every adapter, checked on resume)."""
    return BaseSpec.from_config(
        run.config,
        chat_template=run.data.chat_template,
        chat_template_source="fallback" if run.data.template_is_fallback else "tokenizer",
        compute_dtype=run.compute_dtype,
    )


def save_run_checkpoint(run: Run, state: TrainerState, session: Session) -> Path | None:
    """The checkpoint of this step, written by rank 0 with every rank's RNG state (every rank calls this:
    gathering the RNG states is a collective); None on the other ranks."""
    other_ranks_rng = run.world.gather_rng()
    weights, shards = fsdp.gather_for_save(run)  # under --fsdp (a collective); (None, {}) otherwise
    if not run.world.is_main:
        return None
    return save_checkpoint(
        session.checkpoints,
        state,
        save_adapter_to=partial(save_run_adapter, run, weights=weights, optimizer_shards=shards),
        optimizer=run.optimizer,
        scheduler=run.scheduler,
        keep=run.config.keep_checkpoints,
        extra_rng=other_ranks_rng,
    )


# -------------------------------------------------------------------------------------------- teardown


def finish(run: Run, state: TrainerState, session: Session, say: Say) -> TrainResult:
    """The last checkpoint, the adapter, the held-out loss after training, summary.json and the plot."""
    if state.bad_streak == 0:
        last_ckpt = save_run_checkpoint(run, state, session)
    else:
        last_ckpt = latest_checkpoint(session.checkpoints)
    if session.interrupted and run.world.is_main:
        say(
            f"stopped by {session.interrupted} after step {state.step} of {state.total_steps}; checkpoint saved "
            f"in {last_ckpt}. Resume with the same command plus --resume (output folder {session.out})"
        )
    adapter_dir = session.out / "adapter"
    weights = fsdp.full_adapter(run.model) if run.world.fsdp else None  # every rank takes part
    if run.world.is_main:  # the adapter is saved before the last eval, which a signal may cut short
        with atomic_folder(adapter_dir) as tmp:  # a crash leaves the previous adapter, never half of one
            save_run_adapter(run, tmp, weights=weights)
    eval_after, metrics_after = evaluate_after(run, session)  # every rank takes part
    if session.signals is not None:
        session.signals.phase = "save"
    if not run.world.is_main:  # rank 0 writes the adapter and the summary
        return worker_result(run, state, session)
    rows = session.metrics.read()
    summary = run_summary(run, state, session, rows, eval_after)
    summary.update(fsdp.summary_fields(run.model))  # --fsdp: the 4-bit bytes each rank holds
    if run.config.objective != "sft":
        summary.update(preference_summary(run.config, state.eval_metrics_before, metrics_after))
    report_stall(run, rows, summary, say)
    summary["adapter_dir"] = str(adapter_dir)
    summary["checkpoint"] = str(last_ckpt) if last_ckpt else None
    write_summary(session.out / "summary.json", summary)
    if rows:
        held_out = [(0, state.eval_loss_before), (state.step, eval_after)]
        plot_losses(rows, session.out / "loss.png", held_out=[(s, v) for s, v in held_out if v is not None])
    session.tracking.finish(summary, session.out / "loss.png" if rows else None)
    say(summary_text(summary, session.out))
    if run.config.objective != "sft" and preference_text(summary):
        say(preference_text(summary))
    result = TrainResult(summary)
    result.model, result.tokenizer, result.output_dir = run.model, run.tokenizer, session.out
    return result


def evaluate_after(run: Run, session: Session) -> tuple[float | None, dict[str, float]]:
    """(held-out loss, preference metrics) after training, skipped when stopped by a signal (before or
    during it)."""
    if session.signals is not None and session.signals.requested:
        session.interrupted = session.interrupted or session.signals.requested
    if session.interrupted:
        return None, {}
    if session.signals is not None:
        session.signals.phase = "eval"
    try:
        return run.evaluate()  # split over the ranks of a distributed run
    except EvalInterrupted as exc:
        session.interrupted = str(exc)
        return None, {}


def report_stall(run: Run, rows: list[dict], summary: dict[str, Any], say: Say) -> None:
    """Say (and record in the summary) that the training loss never moved: such a run trained nothing."""
    losses = [r["loss"] for r in rows if r.get("loss") is not None]
    if guard.stalled(losses):
        warning = (
            f"the training loss stayed at {losses[0]:.4f} for all {len(losses)} logged steps: the updates do "
            f"not move the model (lr {run.config.lr:g} is likely far too large or too small)"
        )
        summary.setdefault("warnings", []).append(warning)
        say(f"warning: {warning}")


def worker_result(run: Run, state: TrainerState, session: Session) -> TrainResult:
    """What a rank other than 0 returns: how its run ended (rank 0 has the full summary)."""
    result = TrainResult(
        steps=state.step,
        completed=not session.interrupted and state.step >= state.total_steps,
        interrupted_by=session.interrupted,
        rank=run.world.rank,
    )
    result.model, result.tokenizer, result.output_dir = run.model, run.tokenizer, session.out
    return result


def run_summary(
    run: Run, state: TrainerState, session: Session, rows: list[dict], eval_after: float | None
) -> dict[str, Any]:
    """summary.json's content (without the output paths)."""
    c, data = run.config, run.data
    losses = [r["loss"] for r in rows if r.get("loss") is not None]
    n_trainable, n_total = run.parameter_counts()
    return {
        "model": c.model,
        "method": c.method,
        "steps": state.step,
        "total_steps": state.total_steps,
        "completed": not session.interrupted and state.step >= state.total_steps,
        "interrupted_by": session.interrupted,
        "train_loss_first": losses[0] if losses else None,
        "train_loss_last": losses[-1] if losses else None,
        "train_loss_last10_mean": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
        "eval_loss_before": state.eval_loss_before,
        "eval_loss_after": eval_after,
        "skipped_steps": state.skipped,
        "tokens_per_second": session.tokens_seen / session.train_seconds if session.train_seconds else None,
        "seconds_per_step": session.train_seconds / max(1, state.step - session.start_step),
        "peak_memory_bytes": peak_memory_bytes(run.device),
        "wall_seconds": time.perf_counter() - session.started,
        "trainable_parameters": n_trainable,
        "total_parameters": n_total,
        "lora_targets": len(run.targets),
        "train_samples": len(data.train_set),
        "eval_samples": len(data.eval_set) if data.eval_set is not None else 0,
        "device": str(run.device),
        "world_size": run.world.size,
        "communication_seconds_per_step": (
            run.world.comm_seconds / max(1, state.step - session.start_step)
            if run.world.distributed
            else None
        ),
        "compute_dtype": str(run.compute_dtype).removeprefix("torch."),
    }
