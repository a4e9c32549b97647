"""Several processes, one run: data-parallel training under `torchrun` (or `cura train --nproc N`).

    torchrun --nproc-per-node 2 -m cura train run.yaml          one machine, two processes
    cura train run.yaml --nproc 2                               the same, torchrun started for you

Every rank loads the whole 4-bit base and the same LoRA initialisation (seeded, then broadcast from rank 0),
and reads its own rows of every global micro-batch:

    global micro-batch = the batch one process with batch_size * world_size would read (same order, same
    grouping); rank r takes rows [r * batch_size, (r + 1) * batch_size) of it (a rank whose share of an
    epoch's short last batch is empty runs one row with every label ignored, so it adds nothing)
    global batch per optimizer step = batch_size * world_size * grad_accum sequences

The loss is normalised by the answer tokens of the whole global batch (their count is all-reduced before
the forward), each rank back-propagates its own summed loss / that count, and the gradients are summed
across ranks once per optimizer step, before clipping: so the gradient, the clipped norm, the update and
the schedule are those of one process reading the global batch (to float rounding). Why our own bucketed
all-reduce and not `DistributedDataParallel`: the loss (`cura.train.steps.loss_sum`) calls the decoder and
the output layer separately, never `model(...)`, which DDP needs to see to prepare its reducer; gradient
accumulation would need `no_sync` on all but the last micro-batch; and DDP broadcasts every buffer from
rank 0 on each forward by default (`broadcast_buffers=True`), which for `Linear4bit` means the whole packed
4-bit base (its codes and constants are buffers, not parameters: they have no gradient and DDP never
reduces them). The LoRA gradients are small, so one all-reduce per bucket after backward costs little.

Rank 0 alone prints, writes metrics.jsonl / summary.json / plots and checkpoints; every rank's RNG state is
gathered into the checkpoint (`rng.safetensors`: rank 0's under its usual keys, rank r's as `rank{r}.*`).
A stop signal on any rank stops every rank after the same step (the flag is all-reduced each step). A rank
that loses its peers (one was killed) ends with one sentence instead of a traceback; torchrun then stops
the others. A checkpoint written by another number of processes is refused on resume (`check_world_size`).

Sharding the base as well (`--fsdp`, FSDP2): `cura.train.fsdp`. There `World.fsdp` is set and the
gradients are reduce-scattered by FSDP2 in backward instead of `all_reduce_grads`.
"""

from __future__ import annotations

import datetime
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from cura.constants import IGNORE_INDEX
from cura.errors import CuraError
from cura.memory.activations import ALL_REDUCE_BUCKET_BYTES

BUCKET_BYTES = ALL_REDUCE_BUCKET_BYTES  # gradients are all-reduced in flat buffers of at most this size
TIMEOUT_SECONDS = int(os.environ.get("CURA_DIST_TIMEOUT", "600"))  # a collective that waits longer fails


def lost_contact(rank: int, size: int, what: str, exc: BaseException) -> CuraError:
    """The one sentence for a collective whose peer died or timed out (`what`: what this rank was doing):
    the job stops, the last complete checkpoint is kept. Shared by data parallel, --fsdp and the guard."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return CuraError(
        f"rank {rank} of {size} lost contact with the other processes while {what} ({first[:200]}): one of "
        "them stopped or was killed, so the whole job stops; the last complete checkpoint is kept, resume "
        "with --resume when every process can run"
    )


# torchrun's flags that `cura train --nproc` passes through (config key-free: they are not run settings)
LAUNCH_FLAGS = ("nproc", "nnodes", "node_rank", "rdzv_endpoint")


@dataclass
class World:
    """This process's place in the job; with `size == 1` every method is a no-op (one process, no group)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device | None = None  # the rank's device when distributed (cuda:LOCAL_RANK or cpu)
    comm_seconds: float = 0.0  # wall time in the training steps' collectives (waiting for slower ranks too)
    fsdp: bool = False  # the model is sharded (`cura.train.fsdp`): FSDP2 reduce-scatters the gradients itself

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that prints, writes the run's files and saves checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def say(self, say: Callable[[str], None]) -> Callable[[str], None]:
        """`say` on rank 0, silence on the others (every rank would print the same lines)."""
        return say if self.is_main else (lambda message: None)

    # -------------------------------------------------------------------------------- collectives

    def barrier(self) -> None:
        if self.distributed:
            with self._collective("a barrier", timed=False):
                dist.barrier()

    def sum(self, values: Sequence[float]) -> list[float]:
        """The element-wise sum of `values` over every rank (float64: token counts stay exact)."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.float64, device=self._comm_device)
        with self._collective("summing the step's token counts and losses"):
            dist.all_reduce(t)
        return t.tolist()

    def all_reduce_grads(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Sum every parameter's gradient over the ranks, in flat buckets (a missing gradient counts as 0);
        the planner counts the largest bucket (`cura.memory.activations.all_reduce_buffers`)."""
        if not self.distributed or self.fsdp:
            return
        grads = []
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        for bucket in _buckets(grads, BUCKET_BYTES):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            with self._collective("all-reducing the LoRA gradients"):
                dist.all_reduce(flat)
            offset = 0
            for g in bucket:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()

    def broadcast_params(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Rank 0's values of `params` on every rank (the seeded init already agrees; this makes it certain)."""
        if not self.distributed:
            return
        with self._collective("broadcasting the initial LoRA weights", timed=False), torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=0)

    def agree_stop(self, requested: str | None) -> str | None:
        """The stop request of any rank, seen by all (so every rank stops after the same step)."""
        if not self.distributed:
            return requested
        (n,) = self.sum([1.0 if requested else 0.0])
        if requested or not n:
            return requested
        return "a signal to another rank"

    def broadcast_object(self, value):
        """Rank 0's `value` on every rank."""
        if not self.distributed:
            return value
        box = [value]
        with self._collective("sharing rank 0's view of the run", timed=False):
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_rng(self) -> dict[str, torch.Tensor]:
        """Every other rank's RNG state as `rank{r}.<key>` tensors for rank 0's checkpoint ({} for one process)."""
        if not self.distributed:
            return {}
        from cura.train.checkpoint import rng_state

        everyone: list = [None] * self.size
        with self._collective("gathering the ranks' RNG states", timed=False):
            dist.all_gather_object(everyone, rng_state())
        return {
            f"rank{r}.{key}": value.cpu().contiguous()
            for r, states in enumerate(everyone)
            if r > 0
            for key, value in states.items()
        }

    def restore_rng(self, checkpoint: Path) -> None:
        """On rank r > 0, this rank's own RNG state from `checkpoint` (rank 0's is restored by load_checkpoint)."""
        if not self.distributed or self.is_main:
            return
        from safetensors.torch import load_file

        from cura.train.checkpoint import set_rng_state

        prefix = f"rank{self.rank}."
        mine = {
            k[len(prefix) :]: v
            for k, v in load_file(str(checkpoint / "rng.safetensors")).items()
            if k.startswith(prefix)
        }
        if "torch" not in mine:
            raise CuraError(
                f"checkpoint {checkpoint} holds no RNG state for rank {self.rank}; resume it with the number "
                "of processes that wrote it"
            )
        set_rng_state(mine)

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()

    # ------------------------------------------------------------------------------------ helpers

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.device is not None and self.device.type == "cuda" else torch.device("cpu")

    @contextmanager
    def _collective(self, what: str, timed: bool = True) -> Iterator[None]:
        """A collective whose peer died (or timed out) ends this rank with one sentence, not a traceback;
        `timed`: a collective of the training step, counted in `comm_seconds` (setup and saving are not)."""
        t0 = time.perf_counter()
        try:
            yield
            if timed:
                self.comm_seconds += time.perf_counter() - t0
        except (RuntimeError, dist.DistError) as exc:
            raise lost_contact(self.rank, self.size, what, exc) from None


def _buckets(tensors: list[torch.Tensor], limit: int) -> Iterator[list[torch.Tensor]]:
    """Consecutive runs of same-dtype tensors holding at most `limit` bytes each (one tensor may exceed it)."""
    bucket: list[torch.Tensor] = []
    size = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if bucket and (size + nbytes > limit or t.dtype != bucket[0].dtype):
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += nbytes
    if bucket:
        yield bucket


# ---------------------------------------------------------------------------------- process setup


def init_world() -> World:
    """Join the job torchrun started (its RANK / WORLD_SIZE / LOCAL_RANK / MASTER_* variables), or a
    one-process World when there is none. gloo on CPU, nccl where this rank has a GPU."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    # `cura train --nproc` starts torchrun with SIGINT/SIGTERM ignored (so the launcher alone decides who
    # gets them); a rank takes back the defaults until the loop installs its graceful handler.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    kwargs = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(
        backend, rank=rank, world_size=size, timeout=datetime.timedelta(seconds=TIMEOUT_SECONDS), **kwargs
    )
    return World(rank=rank, size=size, local_rank=local_rank, device=device)


def reseed_per_rank(world: World, seed: int) -> None:
    """Distinct dropout streams per rank (after the LoRA init, which every rank draws from `seed`)."""
    if world.distributed:
        torch.manual_seed(seed * 1_000_003 + world.rank + 1)


# ------------------------------------------------------------------------------------------- data


class ShardedBatches(Sequence):
    """Rank r's rows of every global micro-batch of one epoch (`cura.data.packing.Batches` of the global
    batch size); built lazily, one batch at a time, as `Batches` is."""

    def __init__(self, global_batches, rank: int, per_rank: int) -> None:
        self.batches, self.rank, self.per_rank = global_batches, rank, per_rank

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        b = self.batches
        group = b.groups[index]
        rows = group[self.rank * self.per_rank : (self.rank + 1) * self.per_rank]
        if rows:
            return b.build(b.dataset, rows, b.max_length, b.pad)
        batch = b.build(b.dataset, group[:1], b.max_length, b.pad)  # nothing left for this rank
        batch["labels"].fill_(IGNORE_INDEX)
        return batch


def shard_batches(world: World, global_batches, per_rank: int):
    """This rank's share of an epoch's global micro-batches (the batches themselves for one process)."""
    if not world.distributed:
        return global_batches
    return ShardedBatches(global_batches, world.rank, per_rank)


def evaluate_loss_over_ranks(
    world: World, model, eval_batches, device: torch.device, chunk: int
) -> float | None:
    """`cura.train.steps.evaluate_loss` over the ranks: rank r scores batches r, r + size, ...; the summed
    losses and token counts are all-reduced, so every rank gets the held-out loss of all the batches."""
    from cura.train import steps

    if not world.distributed:
        return steps.evaluate_loss(model, eval_batches, device, chunk)
    if not eval_batches:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        # under --fsdp every forward is collective: each rank runs as many (a spare rank repeats the last
        # batch and adds nothing)
        end = -(-len(eval_batches) // world.size) * world.size if world.fsdp else len(eval_batches)
        for i in range(world.rank, end, world.size):
            s, n = steps.loss_sum(
                model, steps.to_device(eval_batches[min(i, len(eval_batches) - 1)], device), chunk
            )
            if i < len(eval_batches):
                total, count = total + float(s), count + n
    model.train(was_training)
    total, count = world.sum([total, count])
    return total / max(count, 1)


# ----------------------------------------------------------------------------------------- resume


def check_world_size(checkpoint: Path, saved: int, world: World) -> None:
    """Refuse a checkpoint of another process count: its global batch and data order differ, so continuing
    it would not be the run it started (the contract of --resume is an exact continuation)."""
    if saved == world.size:
        return
    raise CuraError(
        f"checkpoint {checkpoint} was trained by {saved} process{'es' if saved != 1 else ''} and this run has "
        f"{world.size}: resume it with {saved} (cura train --nproc {saved}, or torchrun giving {saved} ranks), "
        "since another count changes the global batch and the data order; or train into a new output folder"
    )


def check_same_checkpoint(world: World, latest: Path | None) -> Path | None:
    """Rank 0's latest checkpoint on every rank; a rank that cannot read it (another machine without the
    shared folder) stops with one sentence."""
    path = world.broadcast_object(None if latest is None else str(latest))
    if path is not None and not (Path(path) / "trainer_state.json").is_file():
        raise CuraError(
            f"rank {world.rank} cannot read checkpoint {path}, which rank 0 resumes from: on several machines "
            "output_dir must be a folder every machine sees (a shared filesystem) or a copy of it on each"
        )
    return None if path is None else Path(path)


# ------------------------------------------------------------------------------------- the launcher


def launch_command(
    config_file: Path, *, nproc: int, nnodes: int = 1, node_rank: int = 0, rdzv_endpoint: str | None = None
) -> list[str]:
    """The torchrun command line that runs `cura train config_file` on `nproc` processes of this machine."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    cmd.append("--signals-to-handle=SIGHUP,SIGQUIT")  # SIGINT/SIGTERM go to the ranks, see `launch`
    if nnodes > 1:
        if not rdzv_endpoint:
            raise CuraError(
                "--nnodes above 1 needs --rdzv-endpoint HOST:PORT (the machine of --node-rank 0, a free port)"
            )
        cmd += [f"--nnodes={nnodes}", f"--node-rank={node_rank}", f"--rdzv-endpoint={rdzv_endpoint}"]
    elif rdzv_endpoint:
        cmd += ["--nnodes=1", f"--rdzv-endpoint={rdzv_endpoint}"]
    else:
        cmd.append("--standalone")
    return [*cmd, "-m", "cura", "train", str(config_file)]


def launch(
    config, *, nproc: int, nnodes: int = 1, node_rank: int = 0, rdzv_endpoint: str | None = None
) -> int:
    """`cura train --nproc N`: run `config` under torchrun and return its exit status.

    The validated config goes to the ranks as a YAML file, so they train exactly what this process checked.
    torchrun's agent is started in its own session with SIGINT and SIGTERM ignored: a Ctrl-C or SIGTERM
    here is forwarded once to each worker, every rank finishes its step, rank 0 saves one checkpoint, all
    exit 0, and so does torchrun (its own handler would re-send the signal, a second signal aborts a
    rank without saving, and it exits 1 after a signal even when every rank saved).
    """
    import yaml

    from cura.config import to_dict

    if "LOCAL_RANK" in os.environ:
        raise CuraError(
            "--nproc starts torchrun itself: leave it out when the command already runs under torchrun"
        )
    if nproc < 1 or nnodes < 1 or not 0 <= node_rank < nnodes:
        raise CuraError(
            f"--nproc {nproc} / --nnodes {nnodes} / --node-rank {node_rank}: need 0 <= rank < nnodes"
        )
    folder = Path(tempfile.mkdtemp(prefix="cura-launch-"))
    try:
        config_file = folder / "config.yaml"
        config_file.write_text(yaml.safe_dump(to_dict(config), sort_keys=False), encoding="utf-8")
        cmd = launch_command(
            config_file, nproc=nproc, nnodes=nnodes, node_rank=node_rank, rdzv_endpoint=rdzv_endpoint
        )
        return _run_forwarding_signals(cmd)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _run_forwarding_signals(cmd: list[str]) -> int:
    """Run torchrun (`cmd`) in a new session with SIGINT/SIGTERM ignored there, and pass each such signal we
    get to its workers (torchrun starts each worker in a session of its own, so they are its children, not
    its process group). A signal that comes before the workers exist is delivered when they appear."""
    stops = (signal.SIGINT, signal.SIGTERM)
    before = {s: signal.signal(s, signal.SIG_IGN) for s in stops}  # inherited by torchrun at fork
    try:
        proc = subprocess.Popen(cmd, start_new_session=True)
    except BaseException:
        for s, h in before.items():
            signal.signal(s, h)
        raise
    pending: list[int] = []  # signals received and not yet delivered to every worker
    told: set[tuple[int, int]] = set()  # (worker pid, signal) already sent

    def deliver() -> None:
        for signum in pending:
            for pid in _children(proc.pid):
                if (pid, signum) not in told:
                    told.add((pid, signum))
                    try:
                        os.kill(pid, signum)
                    except ProcessLookupError:
                        pass

    def on_signal(signum, frame) -> None:
        pending.append(signum)
        deliver()

    try:
        for s in stops:
            signal.signal(s, on_signal)
        while True:
            try:
                return proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                deliver()  # workers that started after the signal
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def _children(pid: int) -> list[int]:
    """The child processes of `pid` (Linux /proc; elsewhere `pgrep -P`)."""
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        pass
    try:
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [int(x) for x in out.split()]
