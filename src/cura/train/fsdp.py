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

Loading streams each rank's shard (`LayerSharder`, the `on_layer` hook of `cura.models.loading`): the decoder
layers are read one after another, one float weight at a time quantized into the layer's 4-bit form; as soon
as a layer is whole its LoRA adapters are attached (drawn from the RNG stream `attach_lora` would use on the
whole model, so the values are the same), rank 0's values broadcast, its 4-bit tensors made frozen
parameters and the layer `fully_shard`-ed, which frees its whole 4-bit tensors before the next layer is read.
At the peak a rank holds its shards of the layers before, one whole 4-bit layer (plus one float weight while
it is quantized) and, while `fully_shard` copies it out, that layer's shard: about 1/N of the base plus one
layer (`LayerSharder.meter` measures it on the storages; summary.json reports it as
`load_peak_4bit_bytes_per_rank`). Measured on an 8-layer tiny model on 2 ranks: 0.63 of the base, against
1.5 when the whole model was loaded and then sharded (the whole base, then its shards beside it). The sharded
state is bitwise that of sharding the whole loaded model (`shard_model`, kept as the reference the test
compares with). Every rank still reads every tensor of the checkpoint file (each reads the whole layer and
keeps its shard): reading only this rank's byte ranges is not done, and the embeddings and output layer are
loaded whole (they stay whole, see above).
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import nn

from cura.errors import CuraError
from cura.nn import Linear4bit
from cura.train.distributed import lost_contact

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
    """Shard a loaded `model` in place across `world`'s ranks (FSDP2, one unit per decoder layer, the decoder
    as the root); returns the FSDP units. Call after every rank holds the same LoRA initialisation. (What
    `--fsdp` did before `LayerSharder` sharded each layer while loading; kept as the reference the streamed
    load is tested against: the same shards, bit for bit.)"""
    whole = resident_4bit_bytes(model)
    make_shardable(model)
    mesh = _mesh(world)
    units = [fully_shard_unit(layer, mesh) for layer in decoder_layers(model)]
    units.append(_shard_root(model, mesh))
    _configure(units, world)
    _report(model, world, whole, peak=None)
    return units


def _mesh(world):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(_device(world).type, (world.size,))


def _device(world) -> torch.device:
    return world.device or torch.device("cpu")


def fully_shard_unit(module: nn.Module, mesh, **kwargs) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    return fully_shard(module, mesh=mesh, **kwargs)


def _shard_root(model: nn.Module, mesh) -> nn.Module:
    """The decoder as the root unit (its final norm); the embeddings and output layer stay whole."""
    return fully_shard_unit(model.get_decoder(), mesh, ignored_params=unsharded_params(model))


def _configure(units: list[nn.Module], world) -> None:
    """Summed reduce-scatters (the gradient of one process reading the global batch), timed on a CPU."""
    for unit in units:
        unit.set_gradient_divide_factor(1.0)  # sum, as one process reading the global batch would
        unit.set_force_sum_reduction_for_comms(
            True
        )  # ReduceOp.SUM: gloo has no PREMUL_SUM (factor 1 is a no-op)
        if _device(world).type == "cpu":
            timed = TimedCollectives(world)
            unit.set_custom_all_gather(timed.all_gather)
            unit.set_custom_reduce_scatter(timed.reduce_scatter)


def _report(model: nn.Module, world, whole: int, peak: int | None) -> None:
    """What each rank holds (and, for a streamed load, held at its peak), for summary.json (a collective)."""
    per_rank: list = [None] * world.size
    dist.all_gather_object(per_rank, (resident_4bit_bytes(model), peak))
    report = {"model_4bit_bytes": whole, "resident_4bit_bytes_per_rank": [r for r, _ in per_rank]}
    if peak is not None:
        report["load_peak_4bit_bytes_per_rank"] = [p for _, p in per_rank]
    model.get_decoder().cura_shard_report = report


class LayerSharder:
    """`--fsdp` loading (`cura.models.loading.load_checkpoint(on_layer=...)`): each decoder layer, as soon as
    it is loaded, gets its LoRA adapters, rank 0's LoRA values, frozen-parameter 4-bit tensors and its
    `fully_shard`, so its whole 4-bit tensors are freed before the next layer is read. At the peak a rank
    holds its shards of the layers before, one whole layer and (while `fully_shard` copies it) that layer's
    shard: `self.meter` measures it on the storages themselves.

    The adapters draw their initial values from a private RNG stream seeded as `attach_lora` after a whole
    load is (`torch.manual_seed(seed)`), layer after layer in module order, so they are exactly those of
    `attach_lora` on the whole model, whatever loading draws in between."""

    def __init__(self, config, world, device: torch.device) -> None:
        self.lora, self.world, self.device = config.lora, world, device
        self.mesh = _mesh(world)
        self.units: list[nn.Module] = []
        self.targets: list[str] | None = None
        self.done: list[str] = []
        self.whole = 0
        self.meter = LiveBytes()
        saved = self._rng_state()
        torch.manual_seed(config.seed)
        self.stream = self._rng_state()
        self._set_rng_state(saved)

    def __call__(self, model: nn.Module, path: str, layer: nn.Module) -> None:
        from cura.adapters.attach import select_targets, set_trainable

        if self.targets is None:  # every linear is still unwrapped: the selection of attach_lora
            self.targets = select_targets(model, self.lora)
        self._wrap(model, [t for t in self.targets if t == path or t.startswith(path + ".")])
        set_trainable(layer, True)
        self.world.broadcast_params([p for p in layer.parameters() if p.requires_grad])
        self.whole += resident_4bit_bytes(layer)
        self.meter.track(layer)
        whole_layer = quant_tensors(layer)  # alive until fully_shard has copied this rank's shard out
        make_shardable(layer)
        self.units.append(fully_shard_unit(layer, self.mesh))
        self.meter.track(layer)  # its shards, beside the whole layer: the peak of this step
        del whole_layer
        self.meter.track(layer)
        self.done.append(path)

    def finish(self, model: nn.Module) -> list[str]:
        """After the whole load: adapters outside the decoder layers, the root unit, the shard report;
        the global RNG left as `attach_lora` leaves it. Returns the adapted module paths."""
        from cura.adapters.attach import set_trainable
        from cura.models.loading import in_scope

        rest = [t for t in self.targets or () if in_scope(t, exclude=self.done)]
        self._wrap(model, rest)
        set_trainable(model, True)
        self.world.broadcast_params(
            [p for t in rest for p in model.get_submodule(t).parameters() if p.requires_grad]
        )
        self._set_rng_state(self.stream)
        self.units.append(_shard_root(model, self.mesh))
        _configure(self.units, self.world)
        _report(model, self.world, self.whole, peak=self.meter.peak)
        return list(self.targets or ())

    def _wrap(self, model: nn.Module, paths: list[str]) -> None:
        from cura.adapters.attach import wrap_paths

        saved = self._rng_state()
        self._set_rng_state(self.stream)
        try:
            wrap_paths(model, paths, self.lora)
        finally:
            self.stream = self._rng_state()
            self._set_rng_state(saved)

    def _rng_state(self) -> tuple:
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return torch.get_rng_state(), cuda

    def _set_rng_state(self, state: tuple) -> None:
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], self.device)


def quant_tensors(module: nn.Module) -> list[torch.Tensor]:
    """Every `Linear4bit` 4-bit tensor under `module` (this rank's local shard where it is sharded)."""
    out = []
    for m in module.modules():
        if isinstance(m, Linear4bit):
            out += [local_tensor(t) for name in SHARDED_QUANT if (t := getattr(m, name, None)) is not None]
    return out


class LiveBytes:
    """Bytes of 4-bit storage alive now, measured on the storages: each one seen under a tracked module is
    held by a weak reference, and counted until it is freed (whoever still refers to it), so a whole layer
    that something kept alive after sharding would show."""

    def __init__(self) -> None:
        self.refs: dict[int, tuple] = {}
        self.peak = 0

    def track(self, module: nn.Module) -> int:
        """Add the 4-bit storages under `module`; returns (and keeps the peak of) the live bytes."""
        from torch.multiprocessing.reductions import StorageWeakRef

        self.refs = {k: v for k, v in self.refs.items() if not v[0].expired()}
        for t in quant_tensors(module):
            storage = t.untyped_storage()
            self.refs.setdefault(storage.data_ptr(), (StorageWeakRef(storage), storage.nbytes()))
        live = sum(n for _, n in self.refs.values())
        self.peak = max(self.peak, live)
        return live


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
            raise lost_contact(self.world.rank, self.world.size, "gathering a sharded layer", exc) from None
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
