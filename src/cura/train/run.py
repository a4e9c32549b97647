"""One run's setup, written once: `build_run(config, device) -> Run`.

    prepare_process(config)     torch threads, the CPU allocator (cura's pool or glibc's; before the run allocates)
    build_run(config, device)
        tokenizer -> data (a bad row stops the run before a model is loaded)        [with_data=True]
        model: 4-bit base (method=qlora) or full precision, LoRA on the targets, checkpointing
        optimizer (paged AdamW, 8-bit state, or torch AdamW) and the learning-rate schedule
        data streams: the training micro-batches in a per-epoch order, the held-out batches

`cura train` (`cura.train.loop`), the memory measurements (`cura.train.measure`), bench/train_cpu.py and the
tests all build their model this way, so what they measure is what a run trains. With `with_data=False` no
tokenizer or data file is read (a model folder without a tokenizer is fine): the caller feeds its own batches.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from cura.adapters import attach_lora
from cura.data import batches, build_datasets, effective_chat_template
from cura.errors import CuraError
from cura.hardware import default_device, default_threads, resolve_compute_dtype
from cura.models import load_tokenizer, resolve_source
from cura.models.loading import QuantSpec, hf_folder, load_checkpoint
from cura.nn import Linear4bit
from cura.nn.linear4bit import mark_residual_outputs
from cura.optim import PagedAdamW
from cura.train.autofit import apply_cpu_malloc
from cura.train.config import TrainConfig
from cura.train.distributed import World, evaluate_loss_over_ranks, reseed_per_rank, shard_batches
from cura.train.fsdp import LayerSharder, check_fsdp
from cura.train.preference_config import WITH_REFERENCE
from cura.train.preflight import settle_for_device
from cura.train.steps import enable_activation_checkpointing, lr_lambda, optimizer_step

Say = Callable[[str], None]
Batch = dict[str, torch.Tensor]


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class BatchStream:
    """Micro-batches across epochs from a deterministic per-epoch order; its position is checkpointed."""

    def __init__(self, make_epoch: Callable[[int], list[Batch]], epoch: int = 0, index: int = 0):
        self.make_epoch = make_epoch
        self.epoch, self.index = epoch, index
        self._cache: tuple[int, list] | None = None

    def _batches(self) -> list[Batch]:
        if self._cache is None or self._cache[0] != self.epoch:
            self._cache = (self.epoch, self.make_epoch(self.epoch))
            if not self._cache[1]:
                raise CuraError("the training split produced no batches; add rows to the data file")
        return self._cache[1]

    def take(self, n: int) -> list[Batch]:
        out = []
        while len(out) < n:
            epoch_batches = self._batches()
            if self.index >= len(epoch_batches):
                self.epoch, self.index = self.epoch + 1, 0
                continue
            out.append(epoch_batches[self.index])
            self.index += 1
        return out


@dataclass
class RunData:
    """The tokenized data of a run and the chat template its rows were rendered with."""

    train_set: Any
    eval_set: Any
    report: Any
    chat_template: str
    template_is_fallback: bool


@dataclass
class Run:
    """Everything the loop needs, built once by `build_run`."""

    config: TrainConfig
    device: torch.device
    compute_dtype: torch.dtype
    model: torch.nn.Module
    kind: str  # where the base came from: "hf", "gguf", "bnb" or "bundled" (`cura.models.resolve_source`)
    targets: list[str]  # module paths with a LoRA adapter
    params: list[torch.nn.Parameter]  # the trainable ones (the adapters)
    optimizer: torch.optim.Optimizer
    scheduler: LambdaLR
    total_steps: int
    tokenizer: Any = None  # None when built with_data=False
    data: RunData | None = None
    stream: BatchStream | None = None  # training micro-batches (None without data)
    eval_batches: Sequence[Batch] = ()  # the held-out batches (a lazy sequence)
    world: World = field(
        default_factory=World
    )  # this process's rank among torchrun's (one process: rank 0 of 1)

    def step(self, micro_batches: list[Batch]) -> dict[str, Any]:
        """One optimizer step over `micro_batches` (`cura.train.steps.optimizer_step`, or for a preference
        objective `cura.train.preference.preference_step`)."""
        if self.config.objective != "sft":
            from cura.train.preference import preference_step

            return preference_step(
                self.model,
                micro_batches,
                self.optimizer,
                self.scheduler,
                self.params,
                objective=self.config.objective,
                cfg=self.config.preference,
                chunk_tokens=self.config.loss_chunk_tokens,
                max_grad_norm=self.config.max_grad_norm,
                device=self.device,
                world=self.world if self.world.distributed else None,
            )
        return optimizer_step(
            self.model,
            micro_batches,
            self.optimizer,
            self.scheduler,
            self.params,
            chunk_tokens=self.config.loss_chunk_tokens,
            max_grad_norm=self.config.max_grad_norm,
            device=self.device,
            world=self.world if self.world.distributed else None,
        )

    def evaluate(self) -> tuple[float | None, dict[str, float]]:
        """(held-out loss, preference metrics: empty for SFT) on the run's eval batches. Under torchrun each
        rank scores every world.size-th batch and the sums are all-reduced
        (`cura.train.distributed.evaluate_loss_over_ranks`); for a preference objective every rank scores every
        held-out pair (the same numbers on each rank)."""
        if self.config.objective == "sft":
            loss = evaluate_loss_over_ranks(
                self.world, self.model, self.eval_batches, self.device, self.config.loss_chunk_tokens
            )
            return loss, {}
        from cura.train.preference import evaluate_preference

        result = evaluate_preference(
            self.model,
            self.eval_batches,
            self.device,
            self.config.loss_chunk_tokens,
            objective=self.config.objective,
            cfg=self.config.preference,
        )
        return (None, {}) if result is None else (result.pop("loss"), result)

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, total) parameters; the frozen 4-bit weights are buffers and counted by their shape."""
        trainable = sum(p.numel() for p in self.params)
        quant = set()  # under --fsdp a Linear4bit's codes and scales are frozen parameters: counted by shape
        for module in self.model.modules():
            if isinstance(module, Linear4bit):
                quant.update(id(t) for t in module.parameters(recurse=False) if t is not module.bias)
        total = sum(p.numel() for p in self.model.parameters() if id(p) not in quant)
        for module in self.model.modules():
            if isinstance(module, Linear4bit):
                total += module.in_features * module.out_features
        return trainable, total


def prepare_process(
    config: TrainConfig, device: torch.device | None = None, say: Say = _say
) -> tuple[torch.device, str | None]:
    """Torch's thread count and, on a CPU, the allocator of this process (both before the run allocates);
    returns (the device: `device`, else the first GPU or the CPU; the CPU allocator in use: "pool", "tight"
    or "fast", `cura.train.autofit.apply_cpu_malloc`, None off a CPU)."""
    threads = config.threads or default_threads()  # default: physical cores (cura.hardware)
    if threads:
        torch.set_num_threads(threads)
    device = device or default_device()
    allocator = apply_cpu_malloc(config, say) if device.type == "cpu" else None
    return device, allocator


def make_optimizer(config: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    betas = (config.adam_beta1, config.adam_beta2)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(
            params, lr=config.lr, betas=betas, weight_decay=config.weight_decay, foreach=False
        )
    bits = 8 if config.optimizer == "paged_adamw_8bit" else 32
    return PagedAdamW(
        params, lr=config.lr, betas=betas, weight_decay=config.weight_decay, optim_bits=bits,
        paging=config.optim_paging,
    )  # fmt: skip


def build_model(config: TrainConfig, device: torch.device, compute_dtype: torch.dtype, sharder=None):
    """(model, source kind, LoRA target paths): the frozen base (4-bit for qlora) with LoRA attached, on
    `device`, in training mode, with activation checkpointing as configured. With `sharder` (--fsdp:
    `cura.train.fsdp.LayerSharder`) each decoder layer is adapted and sharded as soon as it is loaded."""
    kind, path = resolve_source(config.model)
    quant = QuantSpec(config.quant_type, config.blocksize, config.double_quant)
    model = load_checkpoint(
        hf_folder(kind, path),
        quant if config.method == "qlora" else None,
        compute_dtype=compute_dtype,
        device=str(device),
        on_layer=sharder,
    )
    if sharder is not None:
        targets = sharder.finish(model)  # everything is on `device` already
    else:
        torch.manual_seed(config.seed)  # the adapters' initial weights
        targets = attach_lora(model, config.lora)
        model.to(device)
    if config.gradient_checkpointing:
        enable_activation_checkpointing(model)
        mark_residual_outputs(model)  # a CPU recompute skips the MLP output projection's 4-bit matmul
    model.config.use_cache = False
    model.train()
    return model, kind, targets


def load_data(config: TrainConfig, say: Say = _say) -> tuple[Any, RunData]:
    """(tokenizer, RunData): the rows read, validated and tokenized with the model's chat template."""
    tokenizer = load_tokenizer(config.model)
    if config.objective != "sft":
        from cura.data.preference import build_preference_datasets

        train_set, eval_set, report = build_preference_datasets(
            config.data, tokenizer, paired=config.objective != "kto", batch_size=config.batch_size
        )
    else:
        train_set, eval_set, report = build_datasets(config.data, tokenizer)
    say(str(report))
    template, is_fallback = effective_chat_template(tokenizer)
    return tokenizer, RunData(train_set, eval_set, report, template, is_fallback)


def epoch_batches(config: TrainConfig, dataset, tokenizer, epoch: int) -> Sequence[Batch]:
    """All micro-batches of one epoch of `dataset`, in the order fixed by (seed, epoch)."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if config.objective != "sft":  # pairs or KTO rows: padded, never packed
        from cura.data.preference import preference_batches

        return preference_batches(
            dataset,
            batch_size=config.batch_size,
            max_length=config.data.max_length,
            seed=config.seed,
            epoch=epoch,
            pad_token_id=pad_id,
        )
    return batches(
        dataset,
        batch_size=config.batch_size,
        max_length=config.data.max_length,
        packing=config.data.packing,
        seed=config.seed,
        epoch=epoch,
        pad_token_id=pad_id,
    )


def total_steps(config: TrainConfig, batches_per_epoch: int | None) -> int:
    """config.max_steps, or the optimizer steps of `config.epochs` epochs (1 when there is no data)."""
    if config.max_steps:
        return config.max_steps
    if batches_per_epoch is None:
        return 1
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / config.grad_accum))
    return max(1, math.ceil(config.epochs * steps_per_epoch))


def precompute_run_reference(config: TrainConfig, model, tokenizer, data: RunData, device, say: Say) -> None:
    """The reference log-probabilities of every train and eval example, once, before the first step."""
    from cura.train.preference import precompute_reference

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for dataset in (data.train_set, data.eval_set):
        if dataset is not None and len(dataset):
            precompute_reference(
                model,
                dataset,
                batch_size=config.batch_size,
                max_length=config.data.max_length,
                pad_token_id=pad_id,
                device=device,
                chunk_tokens=config.loss_chunk_tokens,
            )
    say("reference log-probabilities precomputed (the base with the adapter off)")


def build_run(
    config: TrainConfig,
    device: torch.device,
    *,
    with_data: bool = True,
    say: Say = _say,
    world: World | None = None,
) -> Run:
    """The run's model, optimizer, schedule and data streams (see the module docstring). Under torchrun
    (`world`) every rank starts from rank 0's adapters and reads its rows of each global micro-batch of
    batch_size * world.size sequences (`cura.train.distributed`)."""
    world = world or World()
    if world.distributed and config.objective == "kto":
        raise CuraError(
            "objective 'kto' runs on one process for now (its KL reference point is a mean over the batch, "
            "which is not yet summed across ranks): train it without --nproc / torchrun, or use dpo / orpo"
        )
    check_fsdp(config, world)  # --fsdp needs several processes (cura.train.fsdp)
    config = settle_for_device(config, device, world.size)  # `cura train` has settled it already
    compute_dtype = resolve_compute_dtype(config.compute_dtype, device)
    tokenizer, data = load_data(config, say) if with_data else (None, None)
    # --fsdp: each layer sharded as it loads, so a rank never holds the whole base (cura.train.fsdp)
    sharder = LayerSharder(config, world, device) if config.fsdp else None
    model, kind, targets = build_model(config, device, compute_dtype, sharder)
    world.fsdp = sharder is not None
    if sharder is None:
        world.broadcast_params([p for p in model.parameters() if p.requires_grad])
    params = [p for p in model.parameters() if p.requires_grad]
    reseed_per_rank(world, config.seed)
    optimizer = make_optimizer(config, params)
    stream, eval_batches, per_epoch = None, [], None
    if data is not None and config.objective in WITH_REFERENCE and config.preference.precompute_reference:
        precompute_run_reference(config, model, tokenizer, data, device, say)
    if data is not None:
        global_config = config.replace(batch_size=config.batch_size * world.size)
        stream = BatchStream(
            lambda epoch: shard_batches(
                world, epoch_batches(global_config, data.train_set, tokenizer, epoch), config.batch_size
            )
        )
        per_epoch = len(epoch_batches(global_config, data.train_set, tokenizer, 0))
        if data.eval_set is not None and len(data.eval_set):
            eval_batches = epoch_batches(config, data.eval_set, tokenizer, 0)
        if config.eval_batches:
            eval_batches = eval_batches[: config.eval_batches]
    steps = total_steps(config, per_epoch)
    scheduler = LambdaLR(optimizer, lr_lambda(config.schedule, config.warmup_steps, steps))
    return Run(
        config=config,
        device=device,
        compute_dtype=compute_dtype,
        model=model,
        kind=kind,
        targets=targets,
        params=params,
        optimizer=optimizer,
        scheduler=scheduler,
        total_steps=steps,
        tokenizer=tokenizer,
        data=data,
        stream=stream,
        eval_batches=eval_batches,
        world=world,
    )
