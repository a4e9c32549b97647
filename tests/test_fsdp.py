"""`cura train --nproc 2 --fsdp` (FSDP2 sharding the 4-bit base), started for real through torchrun (gloo on
CPU) on the tiny random Llama of tests/test_distributed.py.

One sharded run is compared with one process reading the whole global batch (losses, gradient norms and the
saved adapter), its summary reports what each rank held, and its checkpoint is resumed.
"""

from __future__ import annotations

import json
import re
import shutil
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
    from cura.memory.spec import PlanSpec

    base = dict(
        method="qlora",
        quant_type="nf4",
        double_quant=True,
        blocksize=64,
        lora_r=8,
        lora_targets="all-linear",
        lora_dropout=0.05,
        optimizer="paged_adamw",
        compute_dtype="float32",
        batch_size=2,
        seq_len=24,
        gradient_checkpointing=True,
        loss_chunk_tokens=1024,
        packing=True,
        device="cpu",
    )
    return PlanSpec(**{**base, **overrides})


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
