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
    from transformers import AutoModelForCausalLM

    from tiny import tiny_config

    folder = tmp_path_factory.mktemp("tiny-llama")
    config = tiny_config("llama")
    config.update(
        dict(
            vocab_size=len(chat_tokenizer),
            bos_token_id=chat_tokenizer.bos_token_id,
            eos_token_id=chat_tokenizer.eos_token_id,
            pad_token_id=chat_tokenizer.pad_token_id,
            tie_word_embeddings=True,
        )
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    chat_tokenizer.save_pretrained(folder)
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


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if predicate():
            return
        time.sleep(0.05)
    if proc.poll() is not None:
        pytest.fail(f"the run ended early: {proc.communicate()[1][-3000:]}")
    proc.kill()
    pytest.fail(f"nothing happened within {timeout} s")


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


def test_two_processes_equal_one_with_the_global_batch_and_resume_and_two_nodes_agree(
    tiny_source, train_file, tmp_path
):
    """SIGTERM to `cura train --nproc 2` then --resume == two launchers (--nnodes 2, localhost rendezvous)
    run without a stop, exactly; both == one process with twice the per-rank batch (float32 rounding)."""
    # (1) one launcher, 2 processes, SIGTERM mid-run, then --resume to the end
    interrupted = tmp_path / "interrupted"
    proc = cura(*flags(settings(tiny_source, train_file, output=interrupted)), "--nproc", "2")
    metrics = interrupted / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    err = finish(proc)
    assert "--resume" in err and "SIGTERM" in err
    ckpt = latest_checkpoint(interrupted / "checkpoints")
    stopped_at = int(ckpt.name.split("-")[1])
    assert 2 <= stopped_at < STEPS, f"stopped at {stopped_at}: the signal came too late to test a resume"
    rng = load_file(str(ckpt / "rng.safetensors"))
    assert set(rng) == {"torch", "rank1.torch"}  # every rank's RNG state
    assert not torch.equal(rng["torch"], rng["rank1.torch"])  # each rank has its own dropout stream
    copy = tmp_path / "copy"
    shutil.copytree(interrupted, copy)
    with pytest.raises(CuraError, match="was trained by 2 processes and this run has 1"):
        train(one_process_config(tiny_source, train_file, copy).replace(resume=True))
    finish(cura(*flags(settings(tiny_source, train_file, output=interrupted)), "--nproc", "2", "--resume"))
    resumed = losses(interrupted)
    assert [s for s, _ in resumed] == list(range(1, STEPS + 1))

    # (2) two "machines": two torchrun launchers of one process each, meeting at a localhost rendezvous
    two_nodes = tmp_path / "two-nodes"
    port = free_port()
    nodes = [
        torchrun(
            "--nnodes=2",
            f"--node-rank={rank}",
            f"--rdzv-endpoint=localhost:{port}",
            "--nproc-per-node=1",
            "-m",
            "cura",
            "train",
            *flags(settings(tiny_source, train_file, output=two_nodes)),
        )
        for rank in (0, 1)
    ]
    for node in nodes:
        finish(node)
    assert losses(two_nodes) == resumed  # the same ranks computing the same sums: equal, not just close
    summary = json.loads((two_nodes / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["completed"]
    for key, value in adapter(two_nodes).items():
        torch.testing.assert_close(adapter(interrupted)[key], value, rtol=0, atol=0)

    # (3) one process reading the whole global batch
    one = train(one_process_config(tiny_source, train_file, tmp_path / "one"))
    assert one["completed"]
    want = losses(tmp_path / "one")
    assert [s for s, _ in resumed] == [s for s, _ in want]
    for (step, a), (_, b) in zip(resumed, want, strict=True):
        assert a == pytest.approx(b, rel=LOSS_RTOL), f"step {step}: 2 processes {a}, 1 process {b}"
    one_adapter = adapter(tmp_path / "one")
    for key, value in adapter(two_nodes).items():
        torch.testing.assert_close(value, one_adapter[key], rtol=0, atol=ADAPTER_ATOL)


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


def _rank_of(pid: int) -> int | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in environ:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


def test_a_killed_rank_stops_the_job_and_keeps_the_last_checkpoint(tiny_source, train_file, tmp_path):
    out = tmp_path / "killed"
    proc = cura(
        *flags(settings(tiny_source, train_file, output=out, max_steps=400, save_every=2, lora__dropout=0.1)),
        "--nproc",
        "2",
    )
    wait_for(lambda: latest_checkpoint(out / "checkpoints") is not None, proc)
    workers = [p for agent in _children(proc.pid) for p in _children(agent)]
    rank1 = [p for p in workers if _rank_of(p) == 1]
    assert rank1, f"no rank-1 worker among {workers}"
    os.kill(rank1[0], signal.SIGKILL)
    started = time.time()
    try:
        _, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the job hung after a rank was killed")
    assert time.time() - started < 90
    assert proc.returncode != 0
    assert "lost contact with the other processes" in err, err[-3000:]
    assert "Traceback" not in err.split("lost contact")[0][-2000:]  # rank 0 ends with one sentence
    ckpt = latest_checkpoint(out / "checkpoints")
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == int(ckpt.name.split("-")[1])
    load_file(str(ckpt / "adapter_model.safetensors"))
    load_file(str(ckpt / "optimizer.safetensors"))
    assert set(load_file(str(ckpt / "rng.safetensors"))) == {"torch", "rank1.torch"}
