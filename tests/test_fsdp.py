"""`cura train --nproc 2 --fsdp` (FSDP2 sharding the 4-bit base), started for real through torchrun (gloo on
CPU) on the tiny random Llama of tests/test_distributed.py.

One sharded run is compared with one process reading the whole global batch (losses, gradient norms and the
saved adapter), its summary reports what each rank held, and its checkpoint is resumed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from cura.errors import CuraError
from cura.train import train
from cura.train.checkpoint import checkpoint_dir
from test_distributed import (  # noqa: F401  (fixtures)
    _kill_tree,
    adapter,
    cura,
    finish,
    flags,
    kill_rank,
    losses,
    one_process_config,
    settings,
    tiny_source,
    train_file,
)

STEPS = 6
SAVE_EVERY = 3
# float32: one process and two sharded ones sum the same gradients in another order (reduce-scatter), and
# pad to other lengths: rounding only (measured: equal to ~1e-7 relative)
LOSS_RTOL = 1e-5
ADAPTER_ATOL = 1e-5


@pytest.fixture(scope="module")
def runs(tiny_source, train_file, tmp_path_factory):  # noqa: F811
    """sharded: --nproc 2 --fsdp, checkpoints at steps 3 and 6; resumed: a copy of it without the step-6
    checkpoint, resumed with --resume; one: one process (in this one) reading the global batch."""
    root = tmp_path_factory.mktemp("fsdp")
    out = {name: root / name for name in ("sharded", "resumed", "one")}
    common = dict(max_steps=STEPS, save_every=SAVE_EVERY)
    launched = []
    try:
        sharded = cura(
            *flags(settings(tiny_source, train_file, output=out["sharded"], **common)),
            "--nproc",
            "2",
            "--fsdp",
        )
        launched.append(sharded)
        one = train(one_process_config(tiny_source, train_file, out["one"], max_steps=STEPS))
        result = {"paths": out, "one": one, "sharded_err": finish(sharded)}
        shutil.copytree(out["sharded"], out["resumed"])
        shutil.rmtree(checkpoint_dir(out["resumed"] / "checkpoints", STEPS))
        resumed = cura(
            *flags(settings(tiny_source, train_file, output=out["resumed"], **common)),
            "--nproc",
            "2",
            "--fsdp",
            "--resume",
        )
        launched.append(resumed)
        result["resumed_err"] = finish(resumed)
        yield result
    finally:
        for proc in launched:  # a failed check must not leave ranks running
            if proc.poll() is None:
                _kill_tree(proc.pid)
                proc.wait(timeout=30)


@pytest.fixture(scope="module")
def stopped(tiny_source, train_file, tmp_path_factory):  # noqa: F811
    """Two --fsdp jobs started at once (as tests/test_distributed.py does for data parallel):

    interrupted   the `runs` sharded run's settings, SIGTERM to the launcher after 1 logged step, then --resume
    killed        400 steps, a checkpoint every 2; rank 1 killed with SIGKILL after the first checkpoint
    """
    import signal
    import time

    from cura.train.checkpoint import latest_checkpoint

    root = tmp_path_factory.mktemp("fsdp-stopped")
    out = {name: root / name for name in ("interrupted", "killed")}
    interrupted_flags = [
        *flags(
            settings(
                tiny_source, train_file, output=out["interrupted"], max_steps=STEPS, save_every=SAVE_EVERY
            )
        ),
        "--nproc",
        "2",
        "--fsdp",
    ]
    killed_settings = settings(tiny_source, train_file, output=out["killed"], max_steps=400, save_every=2)
    launched = []
    try:
        interrupted = cura(*interrupted_flags)
        killed = cura(*flags(killed_settings), "--nproc", "2", "--fsdp")
        launched += [interrupted, killed]
        signalled = kill_at = None
        deadline = time.time() + 240
        while (signalled is None or kill_at is None) and time.time() < deadline:
            log = out["interrupted"] / "metrics.jsonl"
            if signalled is None and log.exists() and log.read_text().strip():
                interrupted.send_signal(signal.SIGTERM)
                signalled = time.time()
            if kill_at is None and latest_checkpoint(out["killed"] / "checkpoints") is not None:
                kill_rank(killed, 1)
                kill_at = time.time()
            time.sleep(0.05)
        assert signalled and kill_at, "the runs did not start within 240 s"
        result = {"paths": out, "interrupted_err": finish(interrupted)}
        try:
            _, result["killed_err"] = killed.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            _kill_tree(killed.pid)
            pytest.fail("the --fsdp job hung after a rank was killed")
        result["killed_seconds"], result["killed_rc"] = time.time() - kill_at, killed.returncode
        result["stopped_at"] = int(latest_checkpoint(out["interrupted"] / "checkpoints").name.split("-")[1])
        resume = cura(*interrupted_flags, "--resume")
        launched.append(resume)
        result["resume_err"] = finish(resume)
        yield result
    finally:
        for proc in launched:
            if proc.poll() is None:
                _kill_tree(proc.pid)
                proc.wait(timeout=30)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_fsdp_on_two_processes_equals_one_process_with_the_global_batch(runs):
    """Per-rank batch 2 on 2 sharded processes == batch 4 on one: the losses and the clipped gradient norms
    (the norm of the whole gradient, not of a shard) within float32 rounding; the saved adapter (gathered
    whole by rank 0, an ordinary PEFT file) too."""
    assert runs["one"]["completed"]
    got, want = metrics(runs["paths"]["sharded"]), metrics(runs["paths"]["one"])
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, STEPS + 1))
    for a, b in zip(got, want, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=LOSS_RTOL), f"step {a['step']}: {a} vs {b}"
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=LOSS_RTOL), f"step {a['step']}"
    one_adapter = adapter(runs["paths"]["one"])
    sharded_adapter = adapter(runs["paths"]["sharded"])
    assert set(sharded_adapter) == set(one_adapter)
    for key, value in sharded_adapter.items():
        assert value.shape == one_adapter[key].shape  # whole tensors, not a rank's shard
        torch.testing.assert_close(value, one_adapter[key], rtol=0, atol=ADAPTER_ATOL)


def test_an_fsdp_adapter_merges_like_any_other(runs, tmp_path, capsys):
    """`cura merge` on the sharded run's adapter (its own parity check against the adapter on the base)."""
    from cura.cli import main

    rc = main(
        ["merge", "--adapter", str(runs["paths"]["sharded"] / "adapter"), "--output", str(tmp_path / "m")]
    )
    assert rc == 0, capsys.readouterr().err[-2000:]
    assert (tmp_path / "m" / "config.json").is_file()


def test_each_rank_holds_about_half_of_the_4bit_base(runs):
    """summary.json: the bytes of 4-bit storage (codes, scales, code books) of the whole base, and those each
    rank held after sharding, measured on its own local shard tensors (padding included)."""
    summary = json.loads((runs["paths"]["sharded"] / "summary.json").read_text())
    whole, per_rank = summary["model_4bit_bytes"], summary["resident_4bit_bytes_per_rank"]
    assert summary["fsdp"] is True and summary["world_size"] == 2 and len(per_rank) == 2
    assert sum(per_rank) >= whole  # nothing lost (a shard's padding is counted)
    for held in per_rank:
        assert 0.45 * whole <= held <= 0.55 * whole, (held, whole)
    assert summary["communication_seconds_per_step"] > 0  # the all-gathers and reduce-scatters, timed
    for key in ("trainable_parameters", "total_parameters"):  # counted by their whole shapes, not shards
        assert summary[key] == runs["one"][key], key


def test_fsdp_checkpoint_holds_every_ranks_optimizer_shard_and_resumes_exactly(runs):
    """The checkpoint has rank 1's optimizer shard beside rank 0's; resumed from step 3 it gives exactly the
    losses and adapter of the run that was never stopped (same ranks, same sums: equal, not close)."""
    ckpt = checkpoint_dir(runs["paths"]["sharded"] / "checkpoints", SAVE_EVERY)
    assert (ckpt / "optimizer.safetensors").is_file() and (ckpt / "optimizer.rank1.safetensors").is_file()
    assert (
        f"resuming from {checkpoint_dir(runs['paths']['resumed'] / 'checkpoints', SAVE_EVERY)}"
        in (runs["resumed_err"])
    )
    assert losses(runs["paths"]["resumed"]) == losses(runs["paths"]["sharded"])
    reference = adapter(runs["paths"]["sharded"])
    for key, value in adapter(runs["paths"]["resumed"]).items():
        torch.testing.assert_close(value, reference[key], rtol=0, atol=0)


def test_fsdp_on_one_process_is_refused_in_one_sentence(tiny_source, train_file, tmp_path):  # noqa: F811
    config = one_process_config(tiny_source, train_file, tmp_path / "out", max_steps=1).replace(fsdp=True)
    with pytest.raises(CuraError, match="config key 'fsdp' shards the model across processes"):
        train(config)


def test_fsdp_with_a_preference_objective_is_refused():
    from cura.train import TrainConfig
    from cura.train.distributed import World
    from cura.train.fsdp import check_fsdp

    config = TrainConfig(fsdp=True, objective="dpo")
    with pytest.raises(CuraError, match="works with objective 'sft' only"):
        check_fsdp(config, World(rank=0, size=2))
    check_fsdp(config.replace(objective="sft"), World(rank=0, size=2))  # fine


def _plan_spec(**overrides):
    from tiny import plan_spec

    return plan_spec(**overrides)


def test_planner_fsdp_rank_holds_a_shard_plus_the_gathered_layer():
    """`cura estimate --nproc N --fsdp`: the 4-bit base, its constants, the LoRA weights and the optimizer
    state are 1/N per rank plus one whole layer (two on a GPU: the prefetched one); embeddings stay whole;
    the data-parallel all-reduce phase is gone (FSDP reduce-scatters in backward)."""
    from cura.memory import plan, shape_from_config
    from tiny import tiny_model

    shape = shape_from_config(tiny_model("llama").config.to_dict())
    one = plan(shape, _plan_spec())
    for device, gathered in (("cpu", 1), ("cuda", 2)):
        whole = plan(shape, _plan_spec(device=device))
        four = plan(shape, _plan_spec(device=device, world_size=4, fsdp=True))
        for name in ("quantized base weights", "quantization constants", "LoRA adapters"):
            total = whole.term(name)
            per_layer = -(-total // shape.num_layers)
            assert four.term(name) == -(-total // 4) + gathered * per_layer, name
        assert four.term("optimizer state") == -(-whole.term("optimizer state") // 4)
        assert four.term("embeddings, lm_head, norms") == whole.term("embeddings, lm_head, norms")
        assert "all_reduce" not in four.phases
    ddp = plan(shape, _plan_spec(world_size=4))
    assert "all_reduce" in ddp.phases and ddp.term("quantized base weights") == one.term(
        "quantized base weights"
    )


def test_estimate_fsdp_needs_several_processes(capsys):
    from cura.cli import main

    assert main(["estimate", "--model", "smollm2-135m", "--fsdp"]) == 2
    assert "--fsdp shards the model across processes" in capsys.readouterr().err
    assert main(["estimate", "--model", "smollm2-135m", "--fsdp", "--nproc", "2"]) == 0
    assert "FSDP-sharded parallel" in capsys.readouterr().out


def test_fit_suggests_fsdp_when_several_processes_do_not_fit():
    """`cura estimate --nproc N --fit MEM`: sharding is the first change when the per-process plan does not
    fit (it keeps the results), and it is not proposed for one process."""
    from cura.memory import KNOWN_SHAPES, fit, plan

    shape = KNOWN_SHAPES["llama-3-70b"]
    spec = _plan_spec(device="cuda", compute_dtype="bfloat16", batch_size=4, seq_len=512, world_size=8)
    budget = 24 * 2**30
    assert not plan(shape, spec).fits(budget)
    result = fit(shape, spec, budget)
    assert result.fits and [(c.field, c.new) for c in result.changes] == [("fsdp", True)]
    alone = fit(shape, _plan_spec(device="cuda", compute_dtype="bfloat16", batch_size=4, seq_len=512), budget)
    assert "fsdp" not in {c.field for c in alone.changes}


GUARD_SCRIPT = """
import json, sys
import torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import distribute_tensor, Shard
from cura.train.guard import weights_problem

dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (2,))
rank = dist.get_rank()
found = {}
for case, value in (("fine", 0.5), ("nan", float("nan")), ("huge", 1e9)):
    full = torch.full((4, 3), 0.25)
    if rank == 1 and case != "fine":  # only rank 1's rows (its local chunk) are bad
        full[3, 1] = value
    shards = [distribute_tensor(full, mesh, [Shard(0)], src_data_rank=None),
              distribute_tensor(torch.ones(1, 3), mesh, [Shard(0)], src_data_rank=None)]  # rank 1: empty
    found[case] = weights_problem(shards)
print(json.dumps({"rank": rank, **found}))
dist.destroy_process_group()
"""


def test_sharded_weights_are_judged_on_every_ranks_shards(tmp_path):
    """`guard.weights_problem` on DTensor shards: a NaN or huge weight on rank 1 alone stops both ranks (a
    DTensor's max() is Partial and float() would read each rank's own shard only), and an empty shard is fine."""
    import subprocess
    import sys

    from test_distributed import env

    script = tmp_path / "guard.py"
    script.write_text(GUARD_SCRIPT, encoding="utf-8")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(m) for m in re.findall(r"\{[^{}]*\}", proc.stdout)]  # the ranks' lines may interleave
    assert sorted(r["rank"] for r in rows) == [0, 1]
    for row in rows:
        assert row["fine"] is None
        assert row["nan"] == "non-finite (inf or NaN) LoRA weights"
        assert row["huge"] == "LoRA weights as large as 1e+09"


STREAM_SCRIPT = """
import json, sys
import torch
from cura.adapters import LoraConfig, attach_lora
from cura.models.loading import QuantSpec, load_checkpoint
from cura.train import TrainConfig, fsdp
from cura.train.distributed import init_world
from cura.train.run import build_model

folder = sys.argv[1]
from pathlib import Path
world = init_world()
config = TrainConfig(model=folder, lora=LoraConfig(r=4), seed=5, fsdp=True, compute_dtype="float32")
cpu, f32 = torch.device("cpu"), torch.float32

# what --fsdp does: each layer adapted and sharded as it loads, its live 4-bit bytes measured by the sharder
sharder = fsdp.LayerSharder(config, world, cpu)
streamed, _, _ = build_model(config, cpu, f32, sharder)

# the reference: the whole 4-bit base loaded, LoRA attached, rank 0's values broadcast, then sharded
spec = QuantSpec(config.quant_type, config.blocksize, config.double_quant)
ref = load_checkpoint(Path(folder), spec, compute_dtype=f32)
meter = fsdp.LiveBytes()
loaded = meter.track(ref)  # the end of the whole load: nothing 4-bit is freed while loading
layers = fsdp.decoder_layers(ref)
whole_layers = [fsdp.resident_4bit_bytes(layer) for layer in layers]
torch.manual_seed(config.seed)
attach_lora(ref, config.lora)
world.broadcast_params([p for p in ref.parameters() if p.requires_grad])
held = fsdp.quant_tensors(ref)  # alive through shard_model, as they are while fully_shard copies the shards
fsdp.shard_model(ref, world)
meter.track(ref)
del held
shards = [fsdp.resident_4bit_bytes(layer) for layer in layers]

def state(model):
    named = [*model.named_parameters(), *model.named_buffers()]
    return {k: (fsdp.local_tensor(t), t.shape, t.requires_grad) for k, t in named}

a, b = state(streamed), state(ref)
differ = sorted(set(a) ^ set(b)) + [
    k for k in a.keys() & b.keys()
    if a[k][1:] != b[k][1:] or a[k][0].dtype != b[k][0].dtype or a[k][0].shape != b[k][0].shape
    or not torch.equal(a[k][0], b[k][0])
]
# the streamed peak, computed from the layers' sizes: the shards before layer i, layer i whole, its shard
expected = max(sum(shards[:i]) + whole_layers[i] + shards[i] for i in range(len(layers)))
Path(sys.argv[2], f"rank{world.rank}.json").write_text(json.dumps({
    "rank": world.rank, "differ": differ, "n": len(a), "sharded": sum(hasattr(t, "to_local") for t in streamed.parameters()),
    "streamed_peak": sharder.meter.peak, "expected_peak": expected, "whole": sum(whole_layers),
    "layer": max(whole_layers), "old_load_peak": loaded, "old_peak": meter.peak,
    "resident": fsdp.resident_4bit_bytes(streamed), "report": streamed.get_decoder().cura_shard_report,
}))
world.close()
"""


@pytest.fixture(scope="module")
def eight_layers(tmp_path_factory) -> str:
    """A tiny Llama of 8 decoder layers (weights only: loading needs no tokenizer)."""
    from transformers import AutoModelForCausalLM

    from tiny import tiny_config

    config = tiny_config("llama")
    config.num_hidden_layers = 8
    folder = tmp_path_factory.mktemp("eight-layers")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return str(folder)


def test_fsdp_loading_shards_each_layer_as_it_loads(eight_layers, tmp_path):
    """--fsdp loading on 2 real processes: every parameter and buffer (the LoRA initialisation included) is
    bitwise the rank's shard of what sharding the whole loaded model gives, and the live 4-bit bytes of a
    rank, measured on its storages while it loads, peak at its shards of the layers before + one whole layer
    (+ that layer's shard while fully_shard copies it), about 1/N of the base + one layer: never the whole
    base, which the whole load holds (and, while it shards, its shards too)."""
    import subprocess
    import sys

    from test_distributed import env

    script = tmp_path / "stream.py"
    script.write_text(STREAM_SCRIPT, encoding="utf-8")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script)]
    cmd += [eight_layers, str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for row in rows:
        assert row["differ"] == [] and row["sharded"] > 0, row
        whole, layer, peak = row["whole"], row["layer"], row["streamed_peak"]
        assert peak == row["expected_peak"], row  # measured on storages == computed from the layer sizes
        assert peak <= whole / 2 + 1.5 * layer + 4096, row  # 1/N of the base + one layer (+ its shard)
        assert peak < 0.7 * whole, row  # 8 layers: ~0.63 of the base
        assert row["old_load_peak"] == whole and row["old_peak"] >= 1.45 * whole, row
        assert row["report"]["load_peak_4bit_bytes_per_rank"][row["rank"]] == peak
        assert row["report"]["model_4bit_bytes"] == whole
    print(
        json.dumps(
            {r["rank"]: {k: r[k] for k in ("whole", "layer", "streamed_peak", "old_peak")} for r in rows}
        )
    )


def test_fsdp_sigterm_then_resume_equals_the_run_never_stopped(runs, stopped):
    """SIGTERM to an --fsdp launcher: both ranks stop after the same step, one checkpoint (rank 1's optimizer
    shard included), exit 0; --resume then gives exactly the losses and adapter of the sharded run that was
    never stopped (same settings, same ranks: equal, not close)."""
    err = stopped["interrupted_err"]
    assert "SIGTERM" in err and "--resume" in err, err[-2000:]
    assert 1 <= stopped["stopped_at"] < STEPS, f"stopped at {stopped['stopped_at']}: the signal came too late"
    resumed, never = stopped["paths"]["interrupted"], runs["paths"]["sharded"]
    assert (
        f"resuming from {checkpoint_dir(resumed / 'checkpoints', stopped['stopped_at'])}"
        in stopped["resume_err"]
    )
    assert losses(resumed) == losses(never)
    reference = adapter(never)
    for key, value in adapter(resumed).items():
        torch.testing.assert_close(value, reference[key], rtol=0, atol=0)


def test_fsdp_killed_rank_stops_the_job_and_keeps_the_last_checkpoint(stopped):
    """kill -9 of rank 1 of an --fsdp job: rank 0 stops within a bounded time with one sentence (not a hang),
    the launcher exits non-zero, and the last checkpoint is complete: state, adapter, both optimizer shards."""
    from safetensors.torch import load_file

    from cura.train.checkpoint import latest_checkpoint

    err = stopped["killed_err"]
    lines = [line for line in err.splitlines() if "lost contact" in line]
    print(f"stopped {stopped['killed_seconds']:.1f} s after the kill, rc {stopped['killed_rc']}: {lines[:1]}")
    assert stopped["killed_rc"] != 0 and stopped["killed_seconds"] < 120, err[-3000:]
    assert "lost contact with the other processes" in err, err[-3000:]
    ckpt = latest_checkpoint(stopped["paths"]["killed"] / "checkpoints")
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == int(ckpt.name.split("-")[1])
    load_file(str(ckpt / "adapter_model.safetensors"))
    assert load_file(str(ckpt / "optimizer.safetensors")) and load_file(
        str(ckpt / "optimizer.rank1.safetensors")
    )
    assert set(load_file(str(ckpt / "rng.safetensors"))) == {"torch", "rank1.torch"}
