"""`cura train` on several processes, started for real through torchrun (gloo on CPU), on a tiny random Llama.

Each scenario launches real processes, so they share runs where they can: the same 2-process data-parallel
run is reached three ways (one launcher interrupted by SIGTERM then resumed, two "machines" meeting at a
localhost rendezvous, and rank-for-rank against one process reading the same global batch).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cura.errors import CuraError
from cura.train import TrainConfig, train
from cura.train.checkpoint import latest_checkpoint

REPO = Path(__file__).resolve().parents[1]
DEMO_TRAIN = REPO / "src" / "cura" / "demo" / "orders_train.jsonl"
STEPS = 12
# float32 on one process vs two: the same sums in another order and other padded lengths (rounding only)
LOSS_RTOL = 1e-5
ADAPTER_ATOL = 1e-5


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory, chat_tokenizer):
    """A tiny Llama saved as a transformers folder with the tiny ChatML tokenizer (as tests/test_train.py)."""
    from tiny import save_tiny_chat_model

    folder = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_chat_model(folder, chat_tokenizer)
    return str(folder)


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> Path:
    """45 rows: with 4 sequences per global micro-batch the epoch ends on a short batch of 1 (rank 1 gets
    nothing there and must add nothing)."""
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    lines = DEMO_TRAIN.read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join(lines[:45]) + "\n", encoding="utf-8")
    return path


def settings(source: str, data: Path, **overrides) -> dict:
    """The run both sides train: `batch_size` is per rank."""
    base = dict(
        model=source,
        data=str(data),
        seq_len=96,
        lora__r=4,
        lora__dropout=0.0,  # 1 process and 2 draw different dropout masks; the RNG is checked apart
        lr=5e-3,
        max_steps=STEPS,
        batch_size=2,
        grad_accum=2,  # 2 micro-batches of 2 x 2 sequences: 11.25 global micro-batches an epoch
        save_every=0,
        schedule="cosine",
        warmup_steps=2,
        compute_dtype="float32",
        progress="false",
        seed=5,
    )
    base.update(overrides)
    return base


def flags(values: dict) -> list[str]:
    out = []
    for key, value in values.items():
        out += ["--" + key.replace("__", ".").replace("_", "-"), str(value)]
    return out


def env() -> dict[str, str]:
    return dict(
        os.environ,
        PYTHONPATH=str(REPO / "src"),
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",
        CURA_DIST_TIMEOUT="60",
    )


def cura(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "cura", "train", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
    )


def torchrun(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
    )


def finish(proc: subprocess.Popen, timeout: float = 150) -> str:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"launcher still running after {timeout} s:\n{err[-3000:]}")
    assert proc.returncode == 0, err[-3000:]
    return err


def losses(out: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows]


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_process_config(source: str, data: Path, out: Path, **overrides) -> TrainConfig:
    """The 2-process run's settings on one process reading the whole global batch (2 x 2 sequences)."""
    from cura.adapters import LoraConfig
    from cura.data import DataConfig

    s = settings(source, data, **overrides)
    return TrainConfig(
        model=source,
        output_dir=str(out),
        data=DataConfig(path=str(data), max_length=s["seq_len"]),
        lora=LoraConfig(r=s["lora__r"], dropout=s["lora__dropout"]),
        lr=s["lr"],
        max_steps=s["max_steps"],
        batch_size=2 * s["batch_size"],
        grad_accum=s["grad_accum"],
        save_every=0,
        schedule=s["schedule"],
        warmup_steps=s["warmup_steps"],
        compute_dtype="float32",
        progress=False,
        seed=s["seed"],
    )


@pytest.fixture(scope="module")
def runs(tiny_source, train_file, tmp_path_factory):
    """Every launch at once (real processes share the 2 cores better than they queue for them):

    interrupted   cura train --nproc 2, SIGTERM after 2 logged steps, then --resume to the end
    two_nodes     two torchrun launchers (--nnodes 2, one process each) at a localhost rendezvous
    killed        cura train --nproc 2 (400 steps), rank 1 killed with SIGKILL after the first checkpoint
    one           one process (in this one) reading the whole global batch of 2 x 2 sequences
    """
    launched: list[subprocess.Popen] = []
    try:
        yield _launch_all(tiny_source, train_file, tmp_path_factory.mktemp("runs"), launched)
    finally:
        for proc in launched:  # a failed check must not leave ranks running
            if proc.poll() is None:
                _kill_tree(proc.pid)
                proc.wait(timeout=30)


def _launch_all(tiny_source, train_file, root: Path, launched: list) -> dict:
    """The body of the `runs` fixture; every process it starts is appended to `launched`."""
    out = {name: root / name for name in ("interrupted", "two_nodes", "killed", "one")}
    port = free_port()
    interrupted = cura(*flags(settings(tiny_source, train_file, output=out["interrupted"])), "--nproc", "2")
    launched.append(interrupted)
    nodes = [
        torchrun(
            "--nnodes=2",
            f"--node-rank={rank}",
            f"--rdzv-endpoint=localhost:{port}",
            "--nproc-per-node=1",
            "-m",
            "cura",
            "train",
            *flags(settings(tiny_source, train_file, output=out["two_nodes"])),
        )
        for rank in (0, 1)
    ]
    launched += nodes
    killed_settings = settings(
        tiny_source, train_file, output=out["killed"], max_steps=400, save_every=2, lora__dropout=0.1
    )
    killed = cura(*flags(killed_settings), "--nproc", "2")
    launched.append(killed)
    metrics = out["interrupted"] / "metrics.jsonl"
    signalled = kill_at = None
    deadline = time.time() + 240
    while (signalled is None or kill_at is None) and time.time() < deadline:
        if signalled is None and metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            interrupted.send_signal(signal.SIGTERM)
            signalled = time.time()
        if kill_at is None and latest_checkpoint(out["killed"] / "checkpoints") is not None:
            kill_rank(killed, 1)
            kill_at = time.time()
        time.sleep(0.05)
    assert signalled and kill_at, "the runs did not start within 240 s"
    one = train(one_process_config(tiny_source, train_file, out["one"]))
    result = {"paths": out, "one": one, "interrupted_err": finish(interrupted)}
    result["two_nodes_err"] = [finish(node) for node in nodes]
    try:
        _, result["killed_err"] = killed.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        killed.kill()
        pytest.fail("the job hung after a rank was killed")
    result["killed_seconds"], result["killed_rc"] = time.time() - kill_at, killed.returncode
    ckpt = latest_checkpoint(out["interrupted"] / "checkpoints")
    result["stopped_at"] = int(ckpt.name.split("-")[1])
    result["stopped_rng"] = load_file(str(ckpt / "rng.safetensors"))
    shutil.copytree(out["interrupted"], root / "interrupted-copy")
    result["interrupted_copy"] = root / "interrupted-copy"
    resume = cura(
        *flags(settings(tiny_source, train_file, output=out["interrupted"])), "--nproc", "2", "--resume"
    )
    launched.append(resume)
    result["resume_err"] = finish(resume)
    return result


def test_two_processes_equal_one_process_with_the_global_batch(runs):
    """Per-rank batch 2 on 2 processes == batch 4 on one: losses within float32 rounding, adapters too."""
    assert runs["one"]["completed"]
    got, want = losses(runs["paths"]["two_nodes"]), losses(runs["paths"]["one"])
    assert [s for s, _ in got] == [s for s, _ in want] == list(range(1, STEPS + 1))
    for (step, a), (_, b) in zip(got, want, strict=True):
        assert a == pytest.approx(b, rel=LOSS_RTOL), f"step {step}: 2 processes {a}, 1 process {b}"
    one_adapter = adapter(runs["paths"]["one"])
    for key, value in adapter(runs["paths"]["two_nodes"]).items():
        torch.testing.assert_close(value, one_adapter[key], rtol=0, atol=ADAPTER_ATOL)


def test_sigterm_then_resume_equals_two_launchers_on_localhost(runs):
    """SIGTERM to the launcher: every rank stops after the same step, one checkpoint (with each rank's RNG),
    exit 0; --resume then gives exactly the losses and adapter of the two-"machine" run that was never
    stopped (same ranks, same sums: equal, not close)."""
    assert "SIGTERM" in runs["interrupted_err"] and "--resume" in runs["interrupted_err"]
    assert 2 <= runs["stopped_at"] < STEPS, f"stopped at {runs['stopped_at']}: the signal came too late"
    rng = runs["stopped_rng"]
    assert set(rng) == {"torch", "rank1.torch"}
    assert not torch.equal(rng["torch"], rng["rank1.torch"])  # each rank has its own dropout stream
    resumed, two_nodes = runs["paths"]["interrupted"], runs["paths"]["two_nodes"]
    assert losses(resumed) == losses(two_nodes)
    assert json.loads((two_nodes / "summary.json").read_text())["world_size"] == 2
    reference = adapter(two_nodes)
    for key, value in adapter(resumed).items():
        torch.testing.assert_close(value, reference[key], rtol=0, atol=0)


def test_resume_with_another_process_count_is_refused(runs, tiny_source, train_file):
    config = one_process_config(tiny_source, train_file, runs["interrupted_copy"]).replace(resume=True)
    with pytest.raises(CuraError, match="was trained by 2 processes and this run has 1"):
        train(config)


def test_a_killed_rank_stops_the_job_and_keeps_the_last_checkpoint(runs):
    err = runs["killed_err"]
    assert runs["killed_rc"] != 0 and runs["killed_seconds"] < 120
    assert "lost contact with the other processes" in err, err[-3000:]
    ckpt = latest_checkpoint(runs["paths"]["killed"] / "checkpoints")
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == int(ckpt.name.split("-")[1])
    load_file(str(ckpt / "adapter_model.safetensors"))
    load_file(str(ckpt / "optimizer.safetensors"))
    assert set(load_file(str(ckpt / "rng.safetensors"))) == {"torch", "rank1.torch"}


def test_each_rank_restores_its_own_rng_state(tmp_path):
    """rank r > 0 takes `rank{r}.*` from rng.safetensors (rank 0's keys are load_checkpoint's)."""
    from safetensors.torch import save_file

    from cura.train.distributed import World

    torch.manual_seed(1)
    mine = torch.get_rng_state()
    torch.manual_seed(2)
    save_file({"torch": torch.get_rng_state(), "rank1.torch": mine}, str(tmp_path / "rng.safetensors"))
    torch.manual_seed(3)
    World(rank=1, size=2).restore_rng(tmp_path)
    assert torch.equal(torch.get_rng_state(), mine)
    with pytest.raises(CuraError, match="no RNG state for rank 2"):
        World(rank=2, size=3).restore_rng(tmp_path)


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def _kill_tree(pid: int) -> None:
    """SIGKILL `pid` and its descendants (torchrun's agent and workers each run in a session of their own)."""
    for child in _children(pid):
        _kill_tree(child)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def kill_rank(launcher: subprocess.Popen, rank: int) -> None:
    """kill -9 the worker of `rank` that the torchrun agent under `launcher` started."""
    workers = [p for agent in _children(launcher.pid) for p in _children(agent)]
    chosen = [p for p in workers if _rank_of(p) == rank]
    assert chosen, f"no rank-{rank} worker among {workers}"
    os.kill(chosen[0], signal.SIGKILL)


def _rank_of(pid: int) -> int | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in environ:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


def test_planner_all_reduce_bucket_is_the_largest_bucket_the_code_reduces(monkeypatch):
    """`cura estimate --nproc N`: one more phase, the flat gradient bucket of `World.all_reduce_grads`; it
    equals the largest bucket `_buckets` makes from a real model's LoRA gradients (at any bucket limit)."""
    from cura.adapters import LoraConfig, attach_lora
    from cura.memory import activations as planned
    from cura.memory import plan, shape_from_config
    from cura.train import distributed
    from tiny import plan_spec, tiny_model

    model = tiny_model("llama")
    attach_lora(model, LoraConfig(r=8))
    grads = [torch.zeros_like(p) for p in model.parameters() if p.requires_grad]
    shape = shape_from_config(model.config.to_dict())
    one, four = plan(shape, plan_spec(method="lora")), plan(shape, plan_spec(method="lora", world_size=4))
    assert "all_reduce" not in one.phases and "all_reduce" in four.phases
    assert {
        k: v for k, v in four.phases.items() if k != "all_reduce"
    } == one.phases  # per rank: the rest as 1
    total = sum(g.nbytes for g in grads)
    largest = max(g.nbytes for g in grads)
    for limit, exact in ((total * 2, True), (total // 3, False), (1, True)):
        monkeypatch.setattr(planned, "ALL_REDUCE_BUCKET_BYTES", limit)
        biggest = max(sum(g.nbytes for g in b) for b in distributed._buckets(grads, limit))
        planned_bytes = planned.all_reduce_buffers(shape, plan_spec(method="lora", world_size=2))
        if exact:  # one bucket of everything, or one tensor per bucket
            assert planned_bytes == biggest
        else:  # buckets end at tensor boundaries: the plan (the limit) is at most one tensor above them
            assert biggest <= planned_bytes < biggest + largest
