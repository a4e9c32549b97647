"""`report_to`: TensorBoard, W&B and MLflow get the run through their own libraries, offline, and a crashed,
then interrupted, then resumed run reads there as one curve; each tracker's own files are read back."""

from __future__ import annotations

import json
import struct
import sys
import zlib
from pathlib import Path

import pytest

import test_train
from cura.errors import CuraError
from cura.train import TrainHooks, train
from cura.train.tracking import Tracker, Tracking
from test_train import make_config

tiny_source, tiny_data = test_train.tiny_source, test_train.tiny_data  # the tiny Llama and data (fixtures)

ALL = ("tensorboard", "wandb", "mlflow")


@pytest.fixture
def offline_env(monkeypatch, tmp_path):
    """No user W&B / MLflow settings leak in (a home without W&B settings, no tracking URI)."""
    for name in ("WANDB_MODE", "WANDB_PROJECT", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    for name in ("WANDB_DISABLE_GIT", "WANDB_X_DISABLE_STATS", "WANDB_X_DISABLE_MACHINE_INFO"):
        monkeypatch.setenv(name, "true")  # seconds of metadata collection per run this test does not read
    monkeypatch.setenv("WANDB_X_SAVE_REQUIREMENTS", "false")


# ------------------------------------------------------------------------- the trackers' own files, read back


def tensorboard_scalars(folder: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of `tag` as TensorBoard shows it: every event file, crashed sessions' purged."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def wandb_records(path: Path):
    """The protobuf records of a W&B `.wandb` file: W&B's LevelDB-log framing (a 7-byte file header, then
    32 KiB blocks of records `crc32 (IEEE) | length u16 | type u8 | data`, a record split FIRST/MIDDLE/LAST
    across blocks), each payload one `wandb_internal_pb2.Record`."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    pos, pending, block = 7, b"", 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue  # zero padding
        assert zlib.crc32(bytes([kind]) + chunk) == crc, f"{path}: bad record checksum at {pos}"
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # FULL or LAST: one whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def wandb_history(out: Path) -> tuple[set[str], list[dict]]:
    """The run ids and history rows ({key: value}) of every offline W&B session in `out/wandb`."""
    ids, rows = set(), []
    for path in sorted(out.glob("wandb/offline-run-*/run-*.wandb")):
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.add(record.run.run_id)
            elif kind == "history":
                rows.append(
                    {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
                )
    return ids, rows


def wandb_sessions(out: Path, kind: str) -> list:
    return [
        getattr(r, kind)
        for path in sorted(out.glob("wandb/offline-run-*/run-*.wandb"))
        for r in wandb_records(path)
        if r.WhichOneof("record_type") == kind
    ]


def metrics_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------- tests


def test_crashed_interrupted_and_resumed_run_is_one_curve_in_every_tracker(
    tiny_source, tiny_data, tmp_path, offline_env, monkeypatch
):
    """Session 1 crashes after step 3 (checkpoint at 2: step 3 is redone), session 2 stops on SIGINT after
    step 4, session 3 finishes at 6: every tracker has each step's loss exactly once, metrics.jsonl's."""
    import os
    import signal

    out = tmp_path / "tracked"
    config = dict(report_to=ALL, max_steps=6, save_every=2)

    def crash_at_3(step, row):
        if step == 3:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        train(make_config(tiny_source, tiny_data, out, **config), hooks=TrainHooks(on_step_end=crash_at_3))

    def interrupt_at_4(step, row):
        if step == 4:
            os.kill(os.getpid(), signal.SIGINT)

    second = train(
        make_config(tiny_source, tiny_data, out, resume=True, **config),
        hooks=TrainHooks(on_step_end=interrupt_at_4),
    )
    assert second["interrupted_by"] == "SIGINT" and second["steps"] == 4
    said: list[str] = []
    third = train(make_config(tiny_source, tiny_data, out, resume=True, **config), say=said.append)
    assert third["completed"] and third["steps"] == 6
    assert f"TensorBoard: tensorboard --logdir {out / 'tensorboard'}" in said
    assert any(m.startswith("W&B: offline run ") and "upload it with: wandb sync" in m for m in said)
    assert any(m.startswith("MLflow: run ") and "mlflow ui --backend-store-uri sqlite:///" in m for m in said)
    assert not any(m.startswith("warning:") for m in said), said

    rows = metrics_rows(out)
    expected = [(r["step"], r["loss"]) for r in rows]
    assert [s for s, _ in expected] == [1, 2, 3, 4, 5, 6]

    # TensorBoard: the crashed session's step 3 is purged, the redone one shown
    tb = tensorboard_scalars(out / "tensorboard", "loss")
    assert [s for s, _ in tb] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in tb] == pytest.approx([v for _, v in expected], rel=1e-6)  # float32 scalars
    lr = tensorboard_scalars(out / "tensorboard", "lr")
    assert [s for s, _ in lr] == [1, 2, 3, 4, 5, 6]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert "loss_plot" in acc.Tags()["images"]
    assert {"config/text_summary", "base/text_summary", "summary/text_summary"} <= set(acc.Tags()["tensors"])
    base_text = acc.Tensors("base/text_summary")[0].tensor_proto.string_val[0].decode()
    assert json.loads(base_text.strip("`\n"))["quant_type"] == "nf4"
    assert {"summary/train_loss_last", "tokens_per_second", "memory_bytes", "grad_norm"} <= set(
        acc.Tags()["scalars"]
    )

    # W&B: three offline sessions of one run id; each step once, with every metrics.jsonl field
    ids, history = wandb_history(out)
    assert len(ids) == 1 and json.loads((out / "tracking.json").read_text())["wandb"]["run_id"] in ids
    assert sorted(h["_step"] for h in history) == [1, 2, 3, 4, 5, 6]
    by_step = {h["_step"]: h for h in history}
    for row in rows:  # step 3 is the crashed session's: the same numbers (an exact resume) but its timings
        for key in ("loss", "lr", "grad_norm", "trained_tokens", "epoch"):
            assert by_step[row["step"]][key] == pytest.approx(row[key]), (row["step"], key)
        assert by_step[row["step"]]["tokens_per_second"] > 0 and by_step[row["step"]]["memory_bytes"] > 0
    runs = wandb_sessions(out, "run")
    assert {r.display_name for r in runs} == {"tracked"}
    config_keys = {u.key for u in runs[-1].config.update}
    assert {"lora.r", "data.max_length", "max_steps", "base.quant_type", "base.blocksize"} <= config_keys
    summary_keys = {u.key for s in wandb_sessions(out, "summary") for u in s.update}
    assert {"train_loss_last", "eval_loss_after", "loss_plot"} <= summary_keys

    # MLflow: one run in the SQLite store under the run folder, each step once
    import mlflow

    uri = json.loads((out / "tracking.json").read_text())["mlflow"]["tracking_uri"]
    assert uri == f"sqlite:///{(out / 'mlflow' / 'mlflow.db').resolve()}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # what a user pointing `mlflow ui` at the store does
    found = mlflow.search_runs(experiment_names=["cura"], output_format="list")
    assert len(found) == 1
    run = found[0]
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == expected
    assert len(client.get_metric_history(run.info.run_id, "tokens_per_second")) == 6
    assert run.data.params["lora.r"] == "4" and run.data.params["base.quant_type"] == "nf4"
    assert run.data.tags["resumed.resume"] == "True"  # a param a resume changed is kept as a tag
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"loss.png", "summary.json", "base.json"} <= artifacts
    assert (out / "mlflow" / "artifacts").is_dir()  # artifacts beside the store, not in the working folder


def test_a_missing_tracker_library_is_one_sentence(tiny_source, tiny_data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: `import wandb` fails
    out = tmp_path / "run"
    with pytest.raises(
        CuraError, match=r"--report-to wandb needs the 'wandb' package.*pip install 'cura\[wandb\]'"
    ):
        train(make_config(tiny_source, tiny_data, out, report_to=("wandb",)))
    assert not out.exists()  # refused before anything was loaded or written


def test_a_failing_tracker_never_stops_training(tiny_source, tiny_data, tmp_path):
    """A real failure (TensorBoard cannot create its folder: a file is in the way) is one warning and the
    run goes on (the fan-out test below: the other trackers too)."""
    from cura.train import TrainHooks

    out = tmp_path / "run"
    messages: list[str] = []
    config = make_config(tiny_source, tiny_data, out, max_steps=2, report_to="tensorboard")
    # the file is put in the way once the run owns its folder (cura never writes over a user's files)
    in_the_way = TrainHooks(on_model_ready=lambda model, tokenizer: (out / "tensorboard").write_text("x"))
    result = train(config, hooks=in_the_way, say=messages.append)
    assert result["completed"] and result["steps"] == 2, messages
    warnings = [
        m for m in messages if m.startswith("warning: reporting to tensorboard failed while starting")
    ]
    assert len(warnings) == 1 and "training goes on without tensorboard" in warnings[0]
    assert [r["step"] for r in metrics_rows(out)] == [1, 2]


class _Recorder(Tracker):
    """A tracker that keeps what it gets (and raises at step `fail_at`), to test the fan-out's rules."""

    module = "json"

    def __init__(self, name: str, fail_at: int | None = None) -> None:
        self.name, self.fail_at, self.steps, self.status = name, fail_at, [], None

    def start(self, run):
        self.continued = bool(run.saved)  # as W&B and MLflow do: reopen the saved run
        return {"id": self.name}

    def log(self, step, metrics):
        if step == self.fail_at:
            raise ConnectionError("server went away")
        self.steps.append(step)

    def finish(self, summary, plot, status):
        self.status = status


def test_the_fan_out_drops_a_tracker_that_raises_and_keeps_the_others(tmp_path):
    from cura.train import TrainConfig

    broken, healthy = _Recorder("broken", fail_at=2), _Recorder("healthy")
    messages: list[str] = []
    tracking = Tracking([broken, healthy], config=TrainConfig(), say=messages.append)
    tracking.start(0, {"source": "x"}, tmp_path)
    for step in (1, 2, 3):
        tracking.log({"step": step, "loss": 1.0 / step, "skipped": False, "grad_norm": None})
    tracking.finish({"completed": True, "steps": 3}, None)
    assert broken.steps == [1] and healthy.steps == [1, 2, 3] and healthy.status == "finished"
    assert broken.status is None  # dropped: not called again
    assert messages == [
        "warning: reporting to broken failed while logging step 2 (ConnectionError: server went away); "
        "training goes on without broken",
        "healthy",  # where the run is (the tracker's `where`)
    ]
    assert json.loads((tmp_path / "tracking.json").read_text()) == {
        "broken": {"id": "broken"},
        "healthy": {"id": "healthy"},
    }


def test_a_resume_sends_a_reopened_run_only_the_steps_it_lacks(tmp_path):
    """Resumed from step 2 after a crash at step 4: the reopened run has 3 and 4 already; a tracker added
    on resume has nothing, so it gets every step from the resume on."""
    from cura.train import TrainConfig

    (tmp_path / "tracking.json").write_text(json.dumps({"old": {"id": "old"}}))
    old, new = _Recorder("old"), _Recorder("new")
    tracking = Tracking([old, new], config=TrainConfig(), reported_through=4, say=print)
    tracking.start(2, {"source": "x"}, tmp_path)
    for step in (3, 4, 5):
        tracking.log({"step": step, "loss": 1.0})
    tracking.finish({"interrupted_by": "SIGTERM", "steps": 5}, None)
    assert old.steps == [5] and new.steps == [3, 4, 5]
    assert old.status == new.status == "interrupted"


def test_report_to_flag_and_key():
    from cura.cli import build_parser
    from cura.cli.train import build_config
    from cura.train import TrainConfig

    parser = build_parser("train")
    args = parser.parse_args(["train", "--data", "x.jsonl", "--report-to", "tensorboard,mlflow,tensorboard"])
    assert build_config(args)[0].report_to == ("tensorboard", "mlflow")
    assert (
        build_config(parser.parse_args(["train", "--data", "x.jsonl", "--report-to", "none"]))[0].report_to
        == ()
    )
    assert TrainConfig().report_to == () and TrainConfig(report_to="wandb, none").report_to == ("wandb",)
    with pytest.raises(CuraError, match="'report_to.*must be one of .*got 'tensorbord'"):
        build_config(parser.parse_args(["train", "--data", "x.jsonl", "--report-to", "tensorbord"]))
    with pytest.raises(CuraError, match="config key 'report_to' takes none, tensorboard, wandb, mlflow"):
        TrainConfig(report_to="neptune")


def test_only_rank_0_reports(tmp_path, monkeypatch):
    from cura.train import TrainConfig
    from cura.train.tracking import prepare_tracking

    config = TrainConfig(output_dir=str(tmp_path), report_to="tensorboard")
    monkeypatch.setenv("RANK", "1")
    assert prepare_tracking(config).trackers == []
    monkeypatch.setenv("RANK", "0")
    assert [t.name for t in prepare_tracking(config).trackers] == ["tensorboard"]
