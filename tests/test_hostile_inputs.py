"""Hostile inputs (tests/hostile.py): each gives one sentence naming the file or key, exit 2, no traceback.

Plus the pieces around them: the top-level handler (a bug -> a saved crash report and one line; Ctrl-C ->
130), stale GGUF conversions cleaned, a long CSV field read rather than refused, and cura's table of ggml
block sizes against the gguf package's.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hostile import CASES, build_env, long_csv_field, run_case


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return build_env(tmp_path_factory.mktemp("hostile-env"))


@pytest.mark.parametrize("case", CASES, ids=[f"{c.category}: {c.name}" for c in CASES])
def test_hostile_input_is_one_sentence(case, env, tmp_path):
    outcome = run_case(case, tmp_path, env)
    assert outcome.held, f"{case.name}: {', '.join(outcome.problems())}\n{outcome.message[-3000:]}"


def test_a_csv_field_longer_than_the_csv_default_limit_is_read(tmp_path, env):
    """131,072 characters is the csv module's default field limit; a long document is data, not an error."""
    from cura.data.readers import read_csv

    rows = list(read_csv(long_csv_field(tmp_path, env)))
    assert len(rows) == 1 and len(rows[0][1]["prompt"]) == 200_000


def test_a_bug_is_one_line_and_a_saved_crash_report(tmp_path, monkeypatch, capsys):
    from cura.cli import EXIT_BUG, run_command

    monkeypatch.setenv("CURA_CACHE", str(tmp_path))

    def buggy():
        return {}["no such key"]

    assert run_command(buggy, ["train", "--x"]) == EXIT_BUG
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "KeyError" in err
    (report,) = (tmp_path / "crash").glob("crash-*.txt")
    assert report.name in err
    text = report.read_text()
    assert "command: cura train --x" in text and "Traceback" in text and "def buggy" not in text
    assert 'return {}["no such key"]' in text  # the failing line, as a traceback shows it
    assert not [p for p in (tmp_path / "crash").iterdir() if p.name.startswith(".")]  # written atomically


def test_ctrl_c_exits_130_quietly(capsys):
    from cura.cli import EXIT_INTERRUPTED, run_command

    def interrupted():
        raise KeyboardInterrupt

    assert run_command(interrupted, ["chat"]) == EXIT_INTERRUPTED
    assert capsys.readouterr().err.strip() == "interrupted"


def test_the_cura_command_exits_2_with_one_line(tmp_path):
    """The real entry point: `python -m cura` on an adapter folder whose JSON is a list exits 2 with one
    line (a CuraError), through the same handler the in-process cases use."""
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("[1, 2]")
    (folder / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    env = {**os.environ, "CURA_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(
        [sys.executable, "-m", "cura", "generate", "--adapter", str(folder), "--prompt", "hi"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "adapter_config.json" in done.stderr


def test_stale_gguf_conversions_are_removed(tmp_path):
    """A conversion killed with -9 leaves its temporary folder: the next conversion removes it when its
    owner is gone, keeps one whose owner still runs, and removes an owner-less one only after a day."""
    from cura.models.gguf import OWNER_FILE, remove_stale_conversions

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    folders = {}
    for name, owner in {
        "dead": f"{dead.pid} {host}",
        "alive": f"{os.getpid()} {host}",
        "other-host": "1 elsewhere",
    }.items():
        folders[name] = tmp_path / f".model-abc.{name}"
        folders[name].mkdir()
        (folders[name] / OWNER_FILE).write_text(owner)
        (folders[name] / "model.safetensors").write_bytes(b"\0" * 1000)
    for name, age in {"old-unowned": 2 * 86400, "new-unowned": 60}.items():
        folders[name] = tmp_path / f".model-abc.{name}"
        folders[name].mkdir()
        os.utime(folders[name], (time.time() - age, time.time() - age))
    (tmp_path / "model-abc").mkdir()  # a finished conversion: never touched
    removed = remove_stale_conversions(tmp_path)
    assert sorted(p.name for p in removed) == [".model-abc.dead", ".model-abc.old-unowned"]
    assert folders["alive"].is_dir() and folders["other-host"].is_dir() and folders["new-unowned"].is_dir()
    assert (tmp_path / "model-abc").is_dir()


def test_ggml_block_sizes_match_the_gguf_package():
    from gguf.constants import GGML_QUANT_SIZES

    from cura.memory.gguf_meta import GGML_BLOCKS

    theirs = {int(k): tuple(v) for k, v in GGML_QUANT_SIZES.items()}
    assert {k: v for k, v in theirs.items() if k in GGML_BLOCKS} == GGML_BLOCKS
    assert set(GGML_BLOCKS) == set(theirs)


def test_the_bundled_gguf_passes_the_header_checks(smollm2_gguf):
    from cura.memory.gguf_meta import read_gguf_metadata

    meta, names = read_gguf_metadata(smollm2_gguf)
    assert meta["general.architecture"] == "llama" and len(names) > 100


def test_config_checks_apply_to_the_python_api(tmp_path):
    """The same range checks when a TrainConfig is built in Python (no CLI in between)."""
    from cura.errors import CuraError
    from cura.train.config import TrainConfig

    for bad in (
        dict(max_grad_norm=float("nan")),
        dict(threads=10**6),
        dict(adam_beta1=1.5),
        dict(seed=2**64),
    ):
        with pytest.raises(CuraError):
            TrainConfig(output_dir=str(tmp_path / "run"), **bad)
    assert TrainConfig(output_dir=str(tmp_path / "run"), force=True).force


def test_force_starts_a_run_the_memory_plan_refuses(env, tmp_path):
    """--force is the user insisting: preflight then lets a run start that the plan says does not fit."""
    import torch

    from cura.adapters import LoraConfig
    from cura.errors import CuraError
    from cura.train.config import TrainConfig
    from cura.train.preflight import preflight

    config = TrainConfig(model=env.model, output_dir=str(tmp_path / "run"), lora=LoraConfig(r=10**9))
    with pytest.raises(CuraError, match="--force starts it anyway"):
        preflight(config, torch.device("cpu"))
    preflight(config.replace(force=True), torch.device("cpu"))


def test_an_index_of_symlinked_shards_loads_as_in_the_hugging_face_cache(env, tmp_path):
    """The check is on the names in the index: shards that are symlinks into a blobs folder outside the
    snapshot (how the Hugging Face cache stores them) still load, and give the same tensors."""
    import torch

    from cura.models.checkpoint import CheckpointReader

    snapshot, blobs = tmp_path / "snapshots" / "abc", tmp_path / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    shutil.copy(Path(env.model) / "model.safetensors", blobs / "sha256-1")
    (snapshot / "model-00001-of-00001.safetensors").symlink_to(blobs / "sha256-1")
    with CheckpointReader(Path(env.model)) as plain:
        weight_map = {key: "model-00001-of-00001.safetensors" for key in plain.keys()}
        (snapshot / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        with CheckpointReader(snapshot) as linked:
            assert linked.keys() == plain.keys()
            key = plain.keys()[0]
            torch.testing.assert_close(linked.get(key), plain.get(key), rtol=0, atol=0)
