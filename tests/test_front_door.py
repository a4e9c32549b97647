"""What a new user meets first: flags that are not silently guessed, the model list, runs refused before
they start when they cannot work, the demo's settings for each kind of CPU, and what benchmarks record."""

from __future__ import annotations

import pytest

from cura.cli import main
from cura.errors import CuraError


def test_abbreviated_flag_is_refused_with_the_nearest_one(capsys):
    assert main(["train", "--max-step", "10"]) == 2  # argparse would have taken it as --max-steps
    err = capsys.readouterr().err
    assert "unknown option --max-step (did you mean --max-steps?)" in err


def test_underscore_spelling_gets_the_real_flag(capsys):
    assert main(["train", "--output_dir", "x"]) == 2
    assert "did you mean --output-dir?" in capsys.readouterr().err


def test_every_alias_in_help_is_a_real_flag(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "examples:" in out and "cura train --data my.jsonl" in out
    from cura.cli import build_parser

    train = build_parser("train")._subparsers._group_actions[0].choices["train"]
    flags = set(train._option_string_actions)
    for line in out.splitlines():
        if "same as --" in line:
            assert line.split("same as ")[1].split()[0] in flags, line


def test_estimate_lists_the_known_models(capsys):
    assert main(["estimate", "--list"]) == 0
    out = capsys.readouterr().out
    for name in (
        "llama-3-70b",
        "gemma-2-9b",
        "phi-3-mini",
        "qwen2.5-0.5b",
        "qwen2.5-72b",
        "mistral-nemo-12b",
    ):
        assert name in out


def test_known_shapes_have_their_published_sizes():
    from cura.memory.shapes import KNOWN_SHAPES

    # parameter counts from the model cards (billions, rounded as published)
    published = {"llama-3-70b": 70.6, "gemma-2-9b": 9.24, "phi-3-mini": 3.82, "qwen2.5-72b": 72.7}
    for name, billions in published.items():
        assert KNOWN_SHAPES[name].total_params / 1e9 == pytest.approx(billions, rel=0.01), name


def test_unknown_model_suggests_names(capsys):
    assert main(["estimate", "--model", "gemma2-9b"]) == 2
    assert "did you mean gemma-2-9b" in capsys.readouterr().err


def test_sequence_longer_than_the_context_is_refused():
    from cura.memory.shapes import KNOWN_SHAPES
    from cura.train.preflight import check_context

    shape = KNOWN_SHAPES["smollm2-135m"]
    check_context(shape, 8192, "smollm2-135m")
    with pytest.raises(CuraError, match=r"100,000 tokens but smollm2-135m was trained for at most 8,192"):
        check_context(shape, 100_000, "smollm2-135m")


def test_plan_over_the_available_memory_is_refused():
    from cura.train.preflight import check_memory

    check_memory(2 << 30, 3 << 30, "this machine")
    check_memory(2 << 30, None, "this machine")  # unknown: nothing to check against
    with pytest.raises(
        CuraError,
        match=r"plans a peak of 207 GiB but this machine has 23 GiB available: add --auto-fit 20.7GiB",
    ):
        check_memory(207 << 30, 23 << 30, "this machine")


def test_demo_is_lighter_where_compute_is_float32():
    from cura.demo import DEMO, demo_settings

    assert demo_settings({"compute_dtype": "bfloat16"})["batch_size"] == DEMO["batch_size"]
    light = demo_settings({"compute_dtype": "float32"})
    assert light["batch_size"] < DEMO["batch_size"]
    assert demo_settings({"compute_dtype": "float32", "batch_size": 8})["batch_size"] == 8  # the user wins


def test_checkpointing_auto_is_off_only_where_the_plan_without_it_fits(monkeypatch):
    """The demo leaves gradient_checkpointing at `auto`; `cura train` decides it from the plan without
    recompute and the free memory (`cura.train.plan.settle_checkpointing`), the same rule for any run."""
    from cura.config import from_dict
    from cura.demo import demo_settings
    from cura.memory import plan, shape_from_source
    from cura.memory.allocator import fast_malloc_bound
    from cura.train import cpu_pool
    from cura.train.config import TrainConfig
    from cura.train.plan import AUTO_CHECKPOINTING_SHARE, plan_spec, settle_checkpointing

    config = from_dict(TrainConfig, demo_settings({"compute_dtype": "bfloat16"}))
    assert config.gradient_checkpointing == "auto"

    def off_peak(c):  # the plan without recompute (with the pool, its headroom is a term)
        return plan(
            shape_from_source(c.model), plan_spec(c.replace(gradient_checkpointing=False), "cpu")
        ).peak_bytes

    fast = config.replace(cpu_malloc="fast")
    needs = fast_malloc_bound(off_peak(fast))  # glibc's default malloc may hold this much
    settled, why = settle_checkpointing(fast, "cpu", needs)
    assert settled.gradient_checkpointing is False and "off" in why
    settled, why = settle_checkpointing(fast, "cpu", needs - 1)
    assert settled.gradient_checkpointing is True and "recomputed" in why
    for malloc in ("tight", "pool"):  # freed memory goes back, or is held within the plan: its margin only
        c = config.replace(cpu_malloc=malloc)
        follows = int(off_peak(c) / AUTO_CHECKPOINTING_SHARE) + 1
        assert settle_checkpointing(c, "cpu", follows)[0].gradient_checkpointing is False
    # auto: cura's pool where it builds (this machine has a compiler), else glibc's default
    follows = int(off_peak(config) / AUTO_CHECKPOINTING_SHARE) + 1
    assert settle_checkpointing(config, "cpu", follows)[0].gradient_checkpointing is (
        cpu_pool.buildable() is not None
    )
    monkeypatch.setenv("CURA_CPU_POOL", "0")
    assert settle_checkpointing(config, "cpu", follows)[0].gradient_checkpointing is True
    assert (
        settle_checkpointing(config, "cpu", fast_malloc_bound(off_peak(config)))[0].gradient_checkpointing
        is False
    )
    assert (
        settle_checkpointing(config, "cpu", None)[0].gradient_checkpointing is True
    )  # unknown: the safe choice
    assert settle_checkpointing(config, "cpu", 10**15, world_size=2)[0].gradient_checkpointing is True
    for setting in (True, False):  # a set value is kept, whatever the memory
        assert settle_checkpointing(config.replace(gradient_checkpointing=setting), "cpu", 1) == (
            config.replace(gradient_checkpointing=setting),
            None,
        )
    with pytest.raises(ValueError, match="settle"):
        plan_spec(config, "cpu")  # the two plans differ: an unsettled config has no plan


def test_demo_says_how_long_it_will_take():
    from cura.demo import ANSWERS_IN_STEPS, expected_duration

    line = expected_duration(6.0, 28)
    assert f"about {(28 + ANSWERS_IN_STEPS) * 6 // 60} min" in line and "28 more steps" in line


def test_machine_description_names_the_cpu_and_its_flags():
    from cura.hardware import CPU_FEATURES, describe_machine

    machine = describe_machine()
    assert machine["cpu"] and machine["cores"] >= 1
    assert set(machine["cpu_flags"]) <= set(CPU_FEATURES)
    assert machine["cpu_kind"] in ("bf16", "avx512", "avx2", "other")
    assert machine["compute_dtype_auto"] in ("bfloat16", "float32")


def test_loss_plot_has_the_held_out_points(tmp_path):
    from cura.train.report import _ema, plot_losses

    rows = [{"step": s, "loss": 2.0 / s} for s in range(1, 11)]
    plot_losses(rows, tmp_path / "loss.png", held_out=[(0, 1.4), (10, 0.03)])
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert _ema([1.0, 0.0]) == [1.0, 0.7]


def test_auto_fit_on_a_cpu_fits_what_the_process_will_hold(monkeypatch):
    """The plan of a CPU run is what it adds to the process: auto-fit leaves room for the runtime already
    resident and for the planner's error, and holds memory to the plan (cura's pool where it builds, else
    glibc made to return freed memory)."""
    import cura.train.autofit as autofit
    from cura.memory import plan
    from cura.train import TrainConfig, cpu_pool
    from cura.train.plan import plan_spec

    monkeypatch.setattr(autofit, "runtime_rss", lambda: 300 << 20)
    monkeypatch.setattr("cura.hardware.default_device", lambda: __import__("torch").device("cpu"))
    messages = []
    fitted = autofit.auto_fit(TrainConfig(model="smollm2-135m"), "1GB", say=messages.append)
    assert fitted.cpu_malloc == ("pool" if cpu_pool.buildable() is None else "tight")
    room = int((1 << 30) * autofit.FIT_HEADROOM) - (300 << 20)
    from cura.hardware import native_bf16
    from cura.memory import shape_from_source

    peak = plan(shape_from_source("smollm2-135m"), plan_spec(fitted, "cpu", native_bf16=native_bf16("cpu")))
    assert peak.peak_bytes <= room
    assert any("300 MiB of 1 GiB is this process before loading" in m for m in messages)


def test_a_bare_flag_is_true_also_where_auto_is_allowed():
    """`--gradient-checkpointing` alone still means true now that the key also takes `auto`."""
    import argparse

    from cura.cli import config_settings
    from cura.cli.train import add_config_flags
    from cura.config import from_dict
    from cura.train import TrainConfig

    parser = argparse.ArgumentParser()
    parser.add_argument("config", nargs="?")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    add_config_flags(parser, TrainConfig, set())
    for argv, value in ((["--gradient-checkpointing"], True), (["--gradient-checkpointing", "false"], False),
                        (["--gradient-checkpointing", "auto"], "auto"), ([], "auto")):  # fmt: skip
        config = from_dict(TrainConfig, config_settings(parser.parse_args(argv)))
        assert config.gradient_checkpointing == value and type(config.gradient_checkpointing) is type(value)


def test_every_train_flag_has_a_meaning():
    """`cura train --help` gives each flag one line of meaning, read from the config's own field docs."""
    from cura.config import leaf_docs, leaf_fields
    from cura.train import TrainConfig

    docs = leaf_docs(TrainConfig)
    missing = [key for key, _, _ in leaf_fields(TrainConfig) if not docs.get(key)]
    assert not missing, f"fields without a docstring: {missing}"
    assert docs["lora.r"] == "rank of the LoRA update"


def test_cura_train_refuses_an_overlong_sequence_before_loading(tmp_path, capsys):
    """`--seq-len` beyond the model's context stops `cura train` with one sentence; nothing is written."""
    from tiny import tiny_config

    model = tmp_path / "tiny"
    model.mkdir()
    tiny_config("llama").to_json_file(model / "config.json")  # no weights: the refusal comes first
    data = tmp_path / "rows.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n', encoding="utf-8")
    out = tmp_path / "run"
    code = main(
        ["train", "--model", str(model), "--data", str(data), "--seq-len", "100000", "--output", str(out)]
    )
    assert code == 2
    assert "100,000 tokens but" in capsys.readouterr().err
    assert not out.exists()
