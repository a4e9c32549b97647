"""`--fsdp`: the 4-bit base, the LoRA weights and the optimizer state sharded across the ranks (FSDP2).

    torchrun --nproc-per-node 2 -m cura train run.yaml --fsdp       or   cura train run.yaml --nproc 2 --fsdp

Each rank keeps about 1/N of every decoder layer: the packed NF4 codes, their block scales (absmax, uint8
with double quantization) and nested scales, the LoRA A/B weights, their gradients and the AdamW moments.
`torch.distributed.fsdp.fully_shard` is applied to each decoder layer and then to the decoder (the root);
before a layer runs its shards are all-gathered into the whole layer, which is freed again after its forward,
all-gathered again in backward for the checkpointed recompute and its gradient, and freed; the LoRA gradients
are reduce-scattered so each rank holds the summed gradient of its own shard.

How the 4-bit weight becomes shardable. `fully_shard` shards parameters only (buffers stay whole on every
rank), and `Linear4bit` keeps its 4-bit tensors as buffers. Here they become frozen parameters
(`nn.Parameter(requires_grad=False)`): the packed codes (uint8 [n/2, 1]), the absmax (uint8 or float32
[blocks]), the nested absmax (float32 [blocks/256]) and the two code books (16 and 256 floats). FSDP2 shards each on dim 0 (padding the last rank's piece) and all-gathers a
layer's mixed dtypes in one collective through a uint8 view (`_fsdp_collectives.foreach_all_gather`), so
the whole `QuantizedTensor` exists, bit for bit, before a matmul reads it. That is why shard boundaries need
not fall on quantization blocks: nothing computes on a shard. The alternative, a `torch.Tensor` subclass
with `fsdp_pre_all_gather` / `fsdp_post_all_gather` (torchao's `NF4Tensor`), lets the weight look like one
bf16 tensor to the model and to FSDP's mixed precision, but it must implement every op FSDP2 and DTensor
apply to a parameter (chunk/split on dim 0 at block-aligned offsets, view, copy_, new_zeros, as_strided,
detach, ... through `__torch_dispatch__`), and it would duplicate `QuantizedTensor`'s layout in a second
class. Plain frozen parameters need nothing from FSDP but what it already does for uint8 and float32
tensors, keep `Linear4bit`'s code path (its `weight` / `absmax` attributes are simply the all-gathered
tensors while the layer runs), and keep the saved files unchanged. So: frozen parameters.

The embeddings and the output layer are not sharded (`ignored_params`): the loss calls the decoder and the
output layer separately (`cura.train.steps.loss_sum`), so a tied output layer outside the decoder's FSDP
unit would read a freed weight. They are full precision and frozen, and every rank holds them whole (the
planner counts them so: `cura.memory.planner`).

Gradient semantics are those of one process: the loss of every rank is divided by the trained tokens of
the whole global batch (all-reduced before the forward, as in data parallel); the reduce-scatter *sums*
(`set_gradient_divide_factor(1.0)`: FSDP's default would divide by the world size; with
`set_force_sum_reduction_for_comms(True)` the collective is a plain SUM, since gloo has no PREMUL_SUM, the op
FSDP2 otherwise uses for a custom factor); every micro-batch's
backward reduce-scatters into the sharded gradient, which accumulates across micro-batches; the clipping
norm is that of the whole gradient (`clip_grad_norm_` on DTensors all-reduces the shards' squared norms).
`PagedAdamW` updates each rank's local shard (`cura.optim.paged_adamw`: DTensors are stepped through their
local tensors), so its moments are 1/N of the model's. With `paged_adamw_8bit` the 8-bit state's blocks of
256 values are taken over each rank's shard rather than the whole tensor, so its quantization (and the
trajectory, by ~1e-5 relative over a few steps on the tiny test model) differs slightly from one process;
32-bit states match to float rounding.

The weight check after each update (`cura.train.guard.weights_problem`) all-reduces the shards' maxima, so
every rank stops on a non-finite or huge weight that only one of them holds.

Checkpoints. The adapter is saved whole by rank 0 (each LoRA weight all-gathered on every rank, then written
in the PEFT layout like any run's: merge and export need nothing special). Optimizer state is per rank:
rank 0's in `optimizer.safetensors` as always, rank r's in `optimizer.rank{r}.safetensors` (gathered to rank 0,
which writes the checkpoint folder atomically). A resume with the same number of processes is exact; another
count is refused as for data parallel (`cura.train.distributed.check_world_size`).

Loading: every rank builds the 4-bit model as one process does (layer by layer: one float layer at a time,
then its 4-bit form, `cura.models.loading`), so at the peak of loading each rank holds the whole 4-bit base
once; `fully_shard` then keeps 1/N of it and frees the rest before training. Streaming only this rank's
shard from the checkpoint file is not done.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import nn

from cura.errors import CuraError
from cura.nn import Linear4bit

# every tensor of a Linear4bit's 4-bit weight becomes a frozen parameter (the code books too: they are 1 KiB
# of a layer's storage, which in a small model is not negligible)
SHARDED_QUANT = ("weight", "absmax", "code", "nested_absmax", "nested_code")


def check_fsdp(config, world) -> None:
    """--fsdp needs several processes and the supervised objective; one sentence otherwise."""
    if not getattr(config, "fsdp", False):
        return
    if not world.distributed:
        raise CuraError(
            "config key 'fsdp' shards the model across processes, and this run has one: start it with "
            "--nproc N (N >= 2) or under torchrun, or leave --fsdp out"
        )
    if config.objective != "sft":
        raise CuraError(
            f"config key 'fsdp' works with objective 'sft' only (objective '{config.objective}' is not wired "
            "to sharded layers): train it without --fsdp"
        )


# ------------------------------------------------------------------------------------------ sharding


def make_shardable(model: nn.Module) -> int:
    """Turn every `Linear4bit`'s codes, absmax and nested absmax from buffers into frozen parameters (so
    `fully_shard` shards them); returns the number of layers changed."""
    n = 0
    for module in model.modules():
        if not isinstance(module, Linear4bit):
            continue
        for name in SHARDED_QUANT:
            tensor = module._buffers.pop(name, None)
            if tensor is not None:
                module.register_parameter(name, nn.Parameter(tensor, requires_grad=False))
        n += 1
    return n


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of the decoder (`model.model.layers` in every transformers decoder we load)."""
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None or not len(layers):
        raise CuraError(
            f"--fsdp found no decoder layers in {type(model).__name__} (no `.layers` on its decoder); train "
            "it without --fsdp"
        )
    return list(layers)


def unsharded_params(model: nn.Module) -> set[nn.Parameter]:
    """Parameters kept whole on every rank: the embeddings and the output layer (see the module docstring)."""
    keep = set()
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is not None:
            keep.update(module.parameters())
    return keep


def shard_model(model: nn.Module, world) -> list[nn.Module]:
    """Shard `model` in place across `world`'s ranks (FSDP2, one unit per decoder layer, the decoder as the
    root); returns the FSDP units. Call after every rank holds the same LoRA initialisation."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    whole = resident_4bit_bytes(model)
    make_shardable(model)
    device = world.device or torch.device("cpu")
    mesh = init_device_mesh(device.type, (world.size,))
    units = []
    for layer in decoder_layers(model):
        units.append(fully_shard(layer, mesh=mesh))
    decoder = model.get_decoder()
    units.append(fully_shard(decoder, mesh=mesh, ignored_params=unsharded_params(model)))
    for unit in units:
        unit.set_gradient_divide_factor(1.0)  # sum, as one process reading the global batch would
        unit.set_force_sum_reduction_for_comms(
            True
        )  # ReduceOp.SUM: gloo has no PREMUL_SUM (factor 1 is a no-op)
        if device.type == "cpu":
            timed = TimedCollectives(world)
            unit.set_custom_all_gather(timed.all_gather)
            unit.set_custom_reduce_scatter(timed.reduce_scatter)
    per_rank: list = [None] * world.size
    dist.all_gather_object(per_rank, resident_4bit_bytes(model))
    decoder.cura_shard_report = {"model_4bit_bytes": whole, "resident_4bit_bytes_per_rank": per_rank}
    return units


def summary_fields(model: nn.Module) -> dict:
    """For summary.json of an --fsdp run: the 4-bit bytes of the whole base and those each rank holds
    (measured on the ranks' own tensors when the model was sharded); {} otherwise."""
    report = getattr(model.get_decoder(), "cura_shard_report", None)
    return {"fsdp": True, **report} if report else {}


class TimedCollectives:
    """FSDP2's all-gather and reduce-scatter run to completion and timed into `world.comm_seconds` (on a CPU
    FSDP has no side streams to overlap them with, so waiting here costs nothing). Not installed on a GPU,
    where they overlap compute on FSDP's own streams: there `communication_seconds_per_step` counts only the
    token-count / loss all-reduces (and nothing here was run on a GPU)."""

    def __init__(self, world) -> None:
        from torch.distributed.fsdp._fully_shard._fsdp_collectives import (
            DefaultAllGather,
            DefaultReduceScatter,
        )

        outer = self

        class AllGather(DefaultAllGather):
            def __call__(self, output_tensor, input_tensor, group, async_op=False):
                return outer.timed(super().__call__, output_tensor, input_tensor, group, async_op=True)

        class ReduceScatter(DefaultReduceScatter):
            def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
                return outer.timed(super().__call__, output_tensor, input_tensor, group, op, async_op=True)

        self.world = world
        self.all_gather, self.reduce_scatter = AllGather(), ReduceScatter()

    def timed(self, call, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            work = call(*args, **kwargs)
            if work is not None:
                work.wait()
        except (RuntimeError, dist.DistError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CuraError(
                f"rank {self.world.rank} of {self.world.size} lost contact with the other processes while "
                f"gathering a sharded layer ({first[:200]}): one of them stopped or was killed, so the whole job "
                "stops; the last complete checkpoint is kept, resume with --resume when every process can run"
            ) from None
        self.world.comm_seconds += time.perf_counter() - t0
        return work


# --------------------------------------------------------------------------------------- measurements


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's piece of `t` (a DTensor's local shard), or `t` itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def resident_4bit_bytes(model: nn.Module) -> int:
    """Bytes of 4-bit storage this rank holds now: every `Linear4bit`'s codes, scales and code books
    (for a sharded layer, its local shards)."""
    total = 0
    for module in model.modules():
        if isinstance(module, Linear4bit):
            for name in ("weight", "absmax", "code", "nested_absmax", "nested_code"):
                t = getattr(module, name, None)
                if t is not None:  # its storage: a shard's padding included
                    total += local_tensor(t).untyped_storage().nbytes()
    return total


# -------------------------------------------------------------------------------------------- saving


def full_adapter(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """Every LoRA weight whole, on the CPU, under PEFT's keys (a collective: every rank calls it); None
    when the model is not sharded."""
    from cura.adapters.io import adapter_state_dict

    weights = adapter_state_dict(model)
    if not any(hasattr(v, "full_tensor") for v in weights.values()):
        return None
    return {k: _full(v).to("cpu", copy=True).contiguous() for k, v in weights.items()}


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def gather_for_save(run) -> tuple[dict[str, torch.Tensor] | None, dict[int, dict[str, torch.Tensor]]]:
    """(the whole adapter, the other ranks' optimizer tensors) on rank 0 of an --fsdp run, for its
    checkpoint; (None, {}) without --fsdp. Every rank calls it (collectives)."""
    if not run.world.fsdp:
        return None, {}
    return full_adapter(run.model), gather_optimizer_shards(run.optimizer, run.world)


def gather_optimizer_shards(optimizer, world) -> dict[int, dict[str, torch.Tensor]]:
    """On rank 0, every other rank's optimizer tensors (flat `idx.name` keys); {} elsewhere (a collective)."""
    from cura.train.checkpoint import _optimizer_to_flat

    tensors, _ = _optimizer_to_flat(optimizer.state_dict())
    everyone: list = [None] * world.size
    dist.all_gather_object(everyone, tensors)
    return {r: t for r, t in enumerate(everyone) if r > 0} if world.is_main else {}


def shard_file(rank: int) -> str:
    return f"optimizer.rank{rank}.safetensors"


def optimizer_file(world, checkpoint) -> str:
    """The optimizer file this rank resumes from: its own shard under --fsdp (rank r > 0), else the usual."""
    from pathlib import Path

    if not world.fsdp or world.is_main:
        return "optimizer.safetensors"
    name = shard_file(world.rank)
    if not (Path(checkpoint) / name).is_file():
        raise CuraError(
            f"checkpoint {checkpoint} holds no optimizer shard for rank {world.rank} ({name}): it was not written "
            "by an --fsdp run of this many processes; resume it the way it was trained (with or without --fsdp)"
        )
    return name


def write_optimizer_shards(folder, shards: dict[int, dict[str, torch.Tensor]]) -> None:
    """Rank r's optimizer tensors into `folder/optimizer.rank{r}.safetensors` (rank 0 writes them all)."""
    from safetensors.torch import save_file

    for rank, tensors in shards.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / shard_file(rank)))
