"""The training loop on a tiny random Llama with the real SmolLM2 tokenizer: loss, resume, signals, failures."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cura.errors import CuraError
from cura.train import TrainConfig, TrainHooks, train
from cura.train.checkpoint import TrainerState, latest_checkpoint, load_checkpoint, save_checkpoint
from cura.train.steps import loss_sum, lr_lambda

DEMO_TRAIN = Path(__file__).resolve().parents[1] / "src" / "cura" / "demo" / "orders_train.jsonl"


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory, chat_tokenizer):
    """A tiny Llama saved as a transformers folder, with the tiny ChatML tokenizer (tests/tiny.py)."""
    from tiny import save_tiny_chat_model

    folder = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_chat_model(folder, chat_tokenizer)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    lines = DEMO_TRAIN.read_text(encoding="utf-8").splitlines()
    (folder / "train.jsonl").write_text("\n".join(lines[:48]) + "\n", encoding="utf-8")
    (folder / "eval.jsonl").write_text("\n".join(lines[48:56]) + "\n", encoding="utf-8")
    return folder


def make_config(source, data, out, **overrides) -> TrainConfig:
    from cura.adapters import LoraConfig
    from cura.data import DataConfig

    settings = dict(
        model=source,
        output_dir=str(out),
        data=DataConfig(path=str(data / "train.jsonl"), eval_path=str(data / "eval.jsonl"), max_length=128),
        lora=LoraConfig(r=4, alpha=8.0, dropout=0.1),
        lr=5e-3,
        max_steps=6,
        batch_size=2,
        save_every=2,
        progress=False,
        seed=3,
        compute_dtype="float32",  # the same numbers on every CPU ("auto" picks bf16 where it is native)
        gradient_checkpointing=True,  # the path with recompute ("auto" would skip it where memory is free)
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def losses(out: Path) -> list[tuple[int, float | None]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows]


def test_loss_sum_matches_transformers(make_tiny):
    model = make_tiny("llama")
    torch.manual_seed(1)
    ids = torch.randint(3, 300, (2, 24))
    labels = ids.clone()
    labels[:, :9] = -100  # a masked prompt
    labels[1, 20:] = -100
    reference = model(input_ids=ids, labels=labels).loss
    for chunk in (1, 7, 4096):
        s, n = loss_sum(model, {"input_ids": ids, "labels": labels}, chunk)
        torch.testing.assert_close(s / n, reference, rtol=1e-6, atol=1e-6)
    # gradients through the chunked, checkpointed head match the plain loss
    model.zero_grad()
    reference.backward()
    expected = model.model.layers[0].mlp.up_proj.weight.grad.clone()
    model.zero_grad()
    s, n = loss_sum(model, {"input_ids": ids, "labels": labels}, 5)
    (s / n).backward()
    torch.testing.assert_close(model.model.layers[0].mlp.up_proj.weight.grad, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("arch,softcap", [("llama", None), ("qwen2", None), ("llama", 5.0)])  # qwen2: tied
def test_frozen_head_loss_matches_the_checkpointed_loss(make_tiny, monkeypatch, arch, softcap):
    """With a frozen output layer (LoRA) each loss chunk makes its gradient in its forward, in place in
    its logits' buffer (`_HeadLoss`): the same loss bit for bit as checkpointing the chunk, and its
    gradients to float32 round-off (torch's log-softmax backward has its own exp), for the step's scale
    and, rescaled, for any other incoming gradient."""
    from cura.adapters import LoraConfig, attach_lora
    from cura.train import steps

    model = make_tiny(arch)
    model.config.final_logit_softcapping = softcap  # as Gemma 2 caps its logits
    attach_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0))
    torch.nn.init.normal_(model.model.layers[0].mlp.up_proj.lora_B.weight, std=0.02)  # B != 0: every path
    torch.manual_seed(1)
    ids = torch.randint(3, 300, (2, 24))
    labels = ids.clone()
    labels[:, :9] = -100
    batch = {"input_ids": ids, "labels": labels}
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(chunk, fused, factor=1.0):
        monkeypatch.setattr(steps, "_frozen", lambda head: fused)
        model.zero_grad()
        s, n = loss_sum(model, batch, chunk, 1.0 / 29)
        (s / 29 * factor).backward()
        return s.detach(), [p.grad.clone() for p in params]

    def close(got, expected):  # float32 round-off, relative to each tensor's scale
        for a, b in zip(got, expected, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))

    for chunk in (1, 7, 4096):
        (s_fused, g_fused), (s_ckpt, g_ckpt) = grads(chunk, True), grads(chunk, False)
        assert torch.equal(s_fused, s_ckpt)
        close(g_fused, g_ckpt)
    _, g_fused = grads(5, True, factor=3.0)
    _, g_ckpt = grads(5, False, factor=3.0)
    close(g_fused, g_ckpt)
    monkeypatch.undo()
    assert steps._frozen(model.get_output_embeddings())


def test_fused_chunk_loss_matches_autograd_cross_entropy_in_each_dtype():
    """The in-place gradient of `_fused_chunk_loss` against autograd's cross-entropy through the same head,
    in float32 and bfloat16 (the head's output takes the cast gradient), with and without a soft cap."""
    from cura.train.steps import _fused_chunk_loss, autograd_chunk_loss

    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for softcap in (None, 3.0):
            head = torch.nn.Linear(16, 50, bias=False).to(dtype)
            hidden = torch.randn(9, 16, dtype=dtype) * 2
            targets = torch.randint(0, 50, (9,))
            scale = torch.ones(()) * 0.25
            total, grad = _fused_chunk_loss(hidden, targets, head, softcap, scale)
            ref, ref_grad = autograd_chunk_loss(hidden, targets, head, softcap, scale)
            assert torch.equal(total, ref) and grad.dtype == dtype
            tol = 1e-5 if dtype == torch.float32 else 2e-2  # bfloat16: one rounding of the cast gradient
            torch.testing.assert_close(grad, ref_grad, rtol=tol, atol=tol * float(ref_grad.abs().max()))


def test_schedules():
    cosine = lr_lambda("cosine", 2, 10)
    assert [round(cosine(s), 4) for s in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert cosine(10) == pytest.approx(0.0, abs=1e-12)
    assert cosine(6) == pytest.approx(0.5)
    assert lr_lambda("constant", 0, 10)(9) == 1.0
    assert lr_lambda("linear", 0, 10)(5) == pytest.approx(0.5)


def test_trainer_state_round_trips_and_old_checkpoints_still_load(tmp_path):
    from torch.optim.lr_scheduler import LambdaLR

    def optimizer_and_schedule():
        params = [torch.nn.Parameter(torch.arange(3.0))]
        opt = torch.optim.AdamW(params, lr=0.1)
        return params, opt, LambdaLR(opt, lambda s: 1.0 / (s + 1))

    params, opt, sched = optimizer_and_schedule()
    params[0].grad = torch.ones(3)
    opt.step()
    sched.step()
    state = TrainerState(step=7, total_steps=10, epoch=1, index=3, eval_loss_before=2.5, last_eval_loss=1.5,
                         bad_streak=1, skipped=2)  # fmt: skip
    path = save_checkpoint(
        tmp_path, state, save_adapter_to=lambda folder: None, optimizer=opt, scheduler=sched
    )
    assert path.name == "step-000007"
    _, opt2, sched2 = optimizer_and_schedule()
    assert load_checkpoint(path, optimizer=opt2, scheduler=sched2) == state
    torch.testing.assert_close(
        opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"]
    )
    assert sched2.state_dict() == sched.state_dict()
    # a checkpoint written before TrainerState existed: the same keys but last_eval_loss
    record = json.loads((path / "trainer_state.json").read_text())
    del record["last_eval_loss"]
    (path / "trainer_state.json").write_text(json.dumps(record))
    _, opt3, sched3 = optimizer_and_schedule()
    old = load_checkpoint(path, optimizer=opt3, scheduler=sched3)
    assert old == TrainerState(step=7, total_steps=10, epoch=1, index=3, eval_loss_before=2.5, bad_streak=1,
                               skipped=2)  # fmt: skip


def test_run_writes_adapter_metrics_summary_plot(tiny_source, tiny_data, tmp_path):
    out = tmp_path / "run"
    result = train(make_config(tiny_source, tiny_data, out, max_steps=8, save_every=3))
    assert result["steps"] == 8 and result["completed"]
    for name in ("metrics.jsonl", "summary.json", "loss.png", "config.json"):
        assert (out / name).is_file(), name
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    summary = json.loads((out / "summary.json").read_text())
    for key in (
        "steps",
        "train_loss_first",
        "train_loss_last",
        "eval_loss_before",
        "eval_loss_after",
        "tokens_per_second",
        "peak_memory_bytes",
        "wall_seconds",
        "trainable_parameters",
        "total_parameters",
    ):
        assert summary[key] is not None, key
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):  # the base's own count: the frozen 4-bit weights are buffers, not parameters
        base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_source))
    lora = 4 * sum(m.in_features + m.out_features for n, m in base.named_modules() if n.endswith("_proj"))
    assert summary["trainable_parameters"] == lora
    assert summary["total_parameters"] == sum(p.numel() for p in base.parameters()) + lora
    # a real decrease on data the model can fit: the tiny model learns the fixed answer format
    assert summary["train_loss_last"] < summary["train_loss_first"]
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    assert [s for s, _ in losses(out)] == list(range(1, 9))
    # only the newest checkpoints are kept, and the last one is complete
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == ["step-000006", "step-000008"]
    assert latest_checkpoint(out / "checkpoints").name == "step-000008"


def test_interrupted_run_resumes_exactly(tiny_source, tiny_data, tmp_path):
    reference = tmp_path / "reference"
    train(make_config(tiny_source, tiny_data, reference, grad_accum=2))

    out = tmp_path / "interrupted"

    def interrupt_at_3(step, row):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # the real signal: the loop finishes the step and saves

    first = train(
        make_config(tiny_source, tiny_data, out, grad_accum=2), hooks=TrainHooks(on_step_end=interrupt_at_3)
    )
    assert first["interrupted_by"] == "SIGINT" and first["steps"] == 3 and not first["completed"]
    assert latest_checkpoint(out / "checkpoints").name == "step-000003"
    # debris from a save that died half-way must be ignored
    (out / "checkpoints" / ".tmp-step-000005").mkdir()
    (out / "checkpoints" / "step-000009").mkdir()  # no trainer_state.json: incomplete

    resumed = train(make_config(tiny_source, tiny_data, out, grad_accum=2, resume=True))
    assert resumed["completed"] and resumed["steps"] == 6
    assert losses(out) == losses(reference)  # every logged loss, exactly
    assert (
        resumed["eval_loss_before"]
        == json.loads((reference / "summary.json").read_text())["eval_loss_before"]
    )


def test_resume_refuses_a_checkpoint_of_another_base(tiny_source, tiny_data, tmp_path):
    """A checkpoint's LoRA weights fit any blocksize or quant type; resuming them onto another base would
    silently train a different model."""
    out = tmp_path / "run"
    train(make_config(tiny_source, tiny_data, out, max_steps=2))
    before = (out / "metrics.jsonl").read_text()
    for change in ({"blocksize": 128}, {"quant_type": "fp4"}, {"double_quant": False}):
        config = make_config(
            tiny_source, tiny_data, out, max_steps=4, resume=True, allow_change="max_steps", **change
        )
        with pytest.raises(CuraError, match="not on the .* this run's config describes; resume with"):
            train(config)
    assert (out / "metrics.jsonl").read_text() == before  # nothing of the run was touched
    resumed = train(
        make_config(tiny_source, tiny_data, out, max_steps=4, resume=True, allow_change="max_steps")
    )
    assert resumed["completed"] and resumed["steps"] == 4


def test_non_finite_steps_are_skipped_then_stop_the_run(tiny_source, tiny_data, tmp_path):
    poisoned: set[int] = {2}
    current = {"step": 1}

    def on_model_ready(model, tokenizer):
        layer = model.model.layers[0].mlp.down_proj

        def poison(module, inputs, output):
            return output * float("nan") if current["step"] in poisoned else output

        layer.register_forward_hook(poison)

    def on_step_end(step, row):
        current["step"] = step + 1

    hooks = TrainHooks(on_model_ready=on_model_ready, on_step_end=on_step_end)
    out = tmp_path / "nan"
    result = train(make_config(tiny_source, tiny_data, out, max_steps=4), hooks=hooks)
    assert result["completed"] and result["skipped_steps"] == 1
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["skipped"] is True and rows[1]["loss"] is None
    assert all(math.isfinite(r["loss"]) for i, r in enumerate(rows) if i != 1)

    poisoned.clear()
    poisoned.update(range(3, 100))  # steps 1-2 good (checkpoint at 2), then bad from step 3 on
    current["step"] = 1
    out2 = tmp_path / "nan-stop"
    with pytest.raises(CuraError, match="non-finite steps in a row"):
        train(
            make_config(tiny_source, tiny_data, out2, max_steps=10, max_bad_steps=3, save_every=2),
            hooks=hooks,
        )
    # the last good checkpoint (step 2) is kept, none was written from a bad state
    assert latest_checkpoint(out2 / "checkpoints").name == "step-000002"


def test_bfloat16_compute_keeps_float32_adapter_weights(tiny_source, tiny_data, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "bf16"
    result = train(make_config(tiny_source, tiny_data, out, max_steps=4, compute_dtype="bfloat16"))
    assert result["compute_dtype"] == "bfloat16" and result["completed"]
    assert result["train_loss_last"] < result["train_loss_first"]
    assert result.model.get_input_embeddings().weight.dtype == torch.bfloat16
    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}


def test_existing_output_is_never_overwritten(tiny_source, tiny_data, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    for flags in ({}, {"overwrite": True}, {"resume": True}):
        with pytest.raises(CuraError, match="holds files that are not a cura run .precious.txt."):
            train(make_config(tiny_source, tiny_data, out, **flags))
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    assert (out / "precious.txt").read_text() == "keep me"


def test_bad_data_stops_before_anything_is_written(tiny_source, tmp_path):
    data = tmp_path / "bad"
    data.mkdir()
    (data / "train.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{not json\n')
    (data / "eval.jsonl").write_text(
        '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n'
    )
    out = tmp_path / "out"
    with pytest.raises(CuraError, match="train.jsonl:2"):
        train(make_config(tiny_source, data, out))
    assert not out.exists()


def _cura(*args, **kwargs):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "cura", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        **kwargs,
    )


def test_cli_errors_are_one_sentence(tmp_path):
    proc = _cura("train", "--data", "x.jsonl", "--set", "lora.rr=3")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert err.strip() == "error: unknown config key 'lora.rr'; did you mean 'lora.r'?"
    proc = _cura("train", "--data", "x.jsonl", "--batch-size", "many")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "'batch_size' must be an integer" in err and "Traceback" not in err


def test_cli_sigterm_saves_and_resume_finishes(tiny_source, tiny_data, tmp_path):
    out = tmp_path / "cli-run"
    args = [
        "train",
        "--model",
        tiny_source,
        "--data",
        str(tiny_data / "train.jsonl"),
        "--output",
        str(out),
        "--batch-size",
        "2",
        "--seq-len",
        "96",
        "--save-every",
        "0",
        "--lora.r",
        "4",
    ]
    proc = _cura(*args, "--max-steps", "400")
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "--resume" in err
    ckpt = latest_checkpoint(out / "checkpoints")
    assert ckpt is not None
    done = int(ckpt.name.split("-")[1])
    assert 2 <= done < 400
    proc = _cura(*args, "--max-steps", str(done + 2), "--resume", "--allow-change", "max_steps")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert [s for s, _ in losses(out)] == list(range(1, done + 3))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_checkpointing_on_or_off_trains_the_same_weights(tiny_source, tiny_data, tmp_path, dtype):
    """Recomputing a layer in backward changes memory, not numbers: the losses and the adapter are bit for
    bit those of a run that kept every activation (so `gradient_checkpointing` may differ on a resume)."""
    from safetensors.torch import load_file

    runs = {}
    for ckpt in (True, False):
        out = tmp_path / f"ckpt-{ckpt}"
        train(make_config(tiny_source, tiny_data, out, gradient_checkpointing=ckpt, compute_dtype=dtype))
        runs[ckpt] = (losses(out), load_file(out / "adapter" / "adapter_model.safetensors"))
    assert runs[True][0] == runs[False][0]
    assert runs[True][1].keys() == runs[False][1].keys()
    assert all(torch.equal(runs[True][1][k], runs[False][1][k]) for k in runs[True][1])


def test_checkpointing_auto_is_decided_said_and_may_change_on_resume(tiny_source, tiny_data, tmp_path):
    """`auto` (the default) is settled before the model loads and said in one line; config.json keeps the
    decision; a resume with checkpointing set the other way needs no --allow-change and gives the losses of
    an uninterrupted run."""
    reference = tmp_path / "reference"
    train(make_config(tiny_source, tiny_data, reference, gradient_checkpointing=True))
    out, messages = tmp_path / "auto", []

    def interrupt_at_3(step, row):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    first = make_config(tiny_source, tiny_data, out, gradient_checkpointing="auto")
    train(first, hooks=TrainHooks(on_step_end=interrupt_at_3), say=messages.append)
    said = [m for m in messages if m.startswith("gradient_checkpointing auto:")]
    assert len(said) == 1 and ": off," in said[0]  # a tiny model's activations fit anywhere
    assert json.loads((out / "config.json").read_text())["gradient_checkpointing"] is False
    resumed = train(make_config(tiny_source, tiny_data, out, gradient_checkpointing=True, resume=True))
    assert resumed["completed"]
    assert losses(out) == losses(reference)
    assert json.loads((out / "config.json").read_text())["gradient_checkpointing"] is True
