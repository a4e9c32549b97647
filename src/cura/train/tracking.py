"""Reporting a run to the experiment trackers people already use: TensorBoard, Weights & Biases, MLflow.

    train()  prepare_tracking(config)  the libraries `report_to` names are installed (one sentence if not),
                                       and the last step an earlier session reported (metrics.jsonl's)
             tracking.start(...)       one tracker run per backend: the flattened config, the base's record
             log_step -> tracking.log  every metrics.jsonl line, as that tool's scalars at its step
             finish   -> tracking.finish(summary, loss.png), or tracking.close(failed=True) on a crash

Each backend is one small class over its own library, imported through `cura.optional.require` only when a
run asks for it. Offline by default: TensorBoard writes event files (`<output>/tensorboard`); W&B runs in
`offline` mode (`<output>/wandb`, `wandb sync` uploads it) unless `WANDB_MODE` or `wandb online` says
otherwise; MLflow uses a SQLite store in the run folder (`<output>/mlflow/mlflow.db`, MLflow 3 refuses its
plain file store by default) unless `MLFLOW_TRACKING_URI` is set. Names follow the output folder.

A resumed run continues the same tracker runs, so it reads there as one curve, as metrics.jsonl does:
`<output>/tracking.json` keeps the W&B and MLflow run ids; TensorBoard's `purge_step` hides what a crashed
session logged after the checkpoint; W&B and MLflow cannot take points back, so the steps an earlier session
already reported are not sent again (a resume is exact: the redone steps have the same values).

A tracker never fails or stops training: an exception from one is a warning, and that tracker is dropped for
the rest of the run. Only rank 0 of a torchrun job reports.
"""

from __future__ import annotations

import configparser
import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from cura.atomic import write_json
from cura.config import to_dict
from cura.optional import available, require

Say = Callable[[str], None]
STATE_FILE = "tracking.json"


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def is_reporting_rank() -> bool:
    """Rank 0 of a torchrun job (or a plain process) reports; the other ranks would duplicate it."""
    return int(os.environ.get("RANK", "0")) == 0


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level of dotted keys (`lora.r`), the form every tracker's config table shows."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def numeric_fields(row: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics.jsonl line (booleans as 0/1, nested rewards flattened), without its step."""
    out = {}
    for key, value in flatten(row).items():
        if key == "step" or value is None or isinstance(value, str):
            continue
        if isinstance(value, (bool, int, float)):
            out[key] = float(value)
    return out


@dataclass
class TrackedRun:
    """What a backend needs to open (or reopen) its run."""

    out: Path  # the run's output folder
    name: str  # the run's name in the tracker: the output folder's
    config: dict[str, Any]  # the run config, flattened
    base: dict[str, Any]  # the run record of the base (`BaseSpec.to_dict`)
    resume_step: int  # the checkpoint step this session starts after; 0 for a new run
    saved: dict[str, Any] = field(default_factory=dict)  # this backend's entry of tracking.json

    @property
    def resumed(self) -> bool:
        return self.resume_step > 0


class Tracker:
    """One experiment tracker. `start` returns what a resume needs to reopen the same run (ids)."""

    name: ClassVar[str]
    module: ClassVar[str]  # the package `cura.optional.require` imports
    purges: ClassVar[bool] = False  # it hides an earlier session's steps after the resume point itself
    continued: bool = False  # `start` reopened an earlier session's run (which has its steps already)

    def start(self, run: TrackedRun) -> dict[str, Any]:
        raise NotImplementedError

    def log(self, step: int, metrics: dict[str, float]) -> None:
        raise NotImplementedError

    def finish(self, summary: dict[str, Any], plot: Path | None, status: str) -> None:
        """`status`: finished, interrupted (a stop signal; a resume continues it) or failed."""
        raise NotImplementedError

    def close(self) -> None:
        """The run died with an exception: end the tracker run as failed (a resume reopens it)."""
        raise NotImplementedError

    def where(self) -> str:
        """Where the user finds the run (said when it ends)."""
        return self.name

    @classmethod
    def load(cls):
        """The tracker's library, or one sentence saying what to install."""
        return require(cls.module, extra=cls.name, purpose=f"--report-to {cls.name}")


# -------------------------------------------------------------------------------------------- backends


class TensorBoardTracker(Tracker):
    """Event files in `<output>/tensorboard` through `torch.utils.tensorboard` (`tensorboard --logdir`)."""

    name = "tensorboard"
    module = "tensorboard"
    purges = True

    def start(self, run: TrackedRun) -> dict[str, Any]:
        self.load()
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package checked above

        # purge_step: events of earlier sessions from this step on are hidden (they were redone)
        self.writer = SummaryWriter(
            log_dir=str(run.out / "tensorboard"), purge_step=run.resume_step + 1, flush_secs=10
        )
        self.logdir = run.out / "tensorboard"
        self.writer.add_text("config", _json_block(run.config), run.resume_step)
        self.writer.add_text("base", _json_block(run.base), run.resume_step)
        return {}

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def finish(self, summary: dict[str, Any], plot: Path | None, status: str) -> None:
        step = int(summary.get("steps") or 0)
        for key, value in numeric_fields(summary).items():
            self.writer.add_scalar(f"summary/{key}", value, step)
        self.writer.add_text("summary", _json_block(summary), step)
        if plot is not None and plot.is_file():
            from matplotlib.image import imread  # matplotlib is a dependency (it draws loss.png)

            self.writer.add_image("loss_plot", imread(str(plot))[..., :3], step, dataformats="HWC")
        self.writer.close()

    def close(self) -> None:
        self.writer.close()

    def where(self) -> str:
        return f"TensorBoard: tensorboard --logdir {self.logdir}"


class WandbTracker(Tracker):
    """A W&B run in `<output>/wandb`, offline unless the user configured W&B otherwise."""

    name = "wandb"
    module = "wandb"

    def start(self, run: TrackedRun) -> dict[str, Any]:
        wandb = self.load()
        run_id = run.saved.get("run_id") if run.resumed else None
        self.continued = run_id is not None
        options: dict[str, Any] = {}
        if not wandb_mode_configured():
            options["mode"] = "offline"
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "cura"),
            name=run.name,
            id=run_id,  # None: W&B picks a new one, kept in tracking.json
            resume="allow",
            dir=str(run.out),
            config={**run.config, **flatten({"base": run.base})},
            settings=wandb.Settings(console="off", silent=True),
            **options,
        )
        return {"run_id": self.run.id}

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def finish(self, summary: dict[str, Any], plot: Path | None, status: str) -> None:
        wandb = self.load()  # already imported by `start`

        self.run.summary.update({k: v for k, v in summary.items() if v is not None})
        if plot is not None and plot.is_file():
            self.run.summary["loss_plot"] = wandb.Image(str(plot))
        self.run.finish(exit_code=1 if status == "failed" else 0)

    def close(self) -> None:
        self.run.finish(exit_code=1)

    def where(self) -> str:
        if self.run.settings._offline:
            sessions = Path(self.run.settings.sync_dir).parent / f"offline-run-*-{self.run.id}"
            return f"W&B: offline run {self.run.id}; upload it with: wandb sync {sessions}"
        return f"W&B: {self.run.url}"


def wandb_mode_configured() -> bool:
    """Whether the user chose W&B's mode: `WANDB_MODE`, or `wandb online` / `wandb offline` (settings file)."""
    if os.environ.get("WANDB_MODE"):
        return True
    folder = os.environ.get("WANDB_CONFIG_DIR") or Path.home() / ".config" / "wandb"
    settings = configparser.ConfigParser()
    try:
        settings.read(Path(folder) / "settings", encoding="utf-8")
    except (OSError, configparser.Error):
        return False
    return settings.has_option("default", "mode")


class MlflowTracker(Tracker):
    """An MLflow run: params (the config), metrics per step, artifacts (summary, base record, loss.png)."""

    name = "mlflow"
    module = "mlflow"

    def start(self, run: TrackedRun) -> dict[str, Any]:
        mlflow = self.load()
        self.entities = mlflow.entities
        local = run.out / "mlflow"
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(local / 'mlflow.db').resolve()}"
        if uri.startswith("sqlite:///"):
            Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.client, self.uri = mlflow.MlflowClient(tracking_uri=uri), uri
        run_id = run.saved.get("run_id") if run.resumed and run.saved.get("tracking_uri") == uri else None
        self.continued = run_id is not None
        if run_id:
            self.client.update_run(run_id, status="RUNNING")
        else:
            run_id = self.client.create_run(
                self._experiment(local, uri), run_name=run.name, tags={"cura.output_dir": str(run.out)}
            ).info.run_id
        self.run_id = run_id
        self._log_params(run)
        self.client.log_dict(run_id, run.base, "base.json")
        return {"run_id": run_id, "tracking_uri": uri}

    def _experiment(self, local: Path, uri: str) -> str:
        """MLFLOW_EXPERIMENT_NAME's experiment (default 'cura'); artifacts beside the store when it is ours."""
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "cura")
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        ours = not os.environ.get("MLFLOW_TRACKING_URI")
        location = (local / "artifacts").resolve().as_uri() if ours else None
        return self.client.create_experiment(name, artifact_location=location)

    def _log_params(self, run: TrackedRun) -> None:
        """The config (and the base record but its template) as params; MLflow params cannot change, so a
        value a resume changed (max_steps raised, say) goes into a tag `resumed.<key>`."""
        Param, RunTag = self.entities.Param, self.entities.RunTag
        values = {**run.config, **{f"base.{k}": v for k, v in run.base.items() if k != "chat_template"}}
        logged = self.client.get_run(self.run_id).data.params
        params = [Param(k, _text(v)) for k, v in values.items() if k not in logged]
        tags = [
            RunTag(f"resumed.{k}", _text(v)) for k, v in values.items() if logged.get(k, _text(v)) != _text(v)
        ]
        for i in range(0, max(len(params), len(tags)), 100):  # log_batch takes at most 100 params
            self.client.log_batch(self.run_id, params=params[i : i + 100], tags=tags[i : i + 100])

    def log(self, step: int, metrics: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        points = [self.entities.Metric(k, v, now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=points)

    def finish(self, summary: dict[str, Any], plot: Path | None, status: str) -> None:
        step = int(summary.get("steps") or 0)
        self.log(step, {f"summary.{k}": v for k, v in numeric_fields(summary).items()})
        self.client.log_dict(self.run_id, summary, "summary.json")
        if plot is not None and plot.is_file():
            self.client.log_artifact(self.run_id, str(plot))
        states = {"finished": "FINISHED", "interrupted": "KILLED", "failed": "FAILED"}
        self.client.set_terminated(self.run_id, states[status])

    def close(self) -> None:
        self.client.set_terminated(self.run_id, "FAILED")

    def where(self) -> str:
        if self.uri.startswith("sqlite:"):
            return f"MLflow: run {self.run_id}; mlflow ui --backend-store-uri {self.uri}"
        return f"MLflow: run {self.run_id} at {self.uri}"


BACKENDS: dict[str, type[Tracker]] = {t.name: t for t in (TensorBoardTracker, WandbTracker, MlflowTracker)}


def _json_block(data: dict[str, Any]) -> str:
    """Markdown TensorBoard's text tab shows as code (it would otherwise reflow the JSON)."""
    return "```\n" + json.dumps(data, indent=2, default=str) + "\n```"


def _text(value: Any) -> str:
    text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    return text[:6000]  # MLflow's limit for a param value


# ---------------------------------------------------------------------------------------- the fan-out


class Tracking:
    """The run's trackers behind one guard: a tracker that raises is reported once and dropped."""

    def __init__(self, trackers: Iterable[Tracker] = (), *, config=None, reported_through: int = 0,
                 say: Say = _say) -> None:  # fmt: skip
        self.trackers = list(trackers)
        self.config = config
        self.reported_through = reported_through  # the last step an earlier session sent (resume)
        self.say = say

    def _guard(self, tracker: Tracker, doing: str, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except Exception as exc:  # any tracker bug or outage: the run must go on
            if tracker in self.trackers:
                self.trackers.remove(tracker)
            self.say(
                f"warning: reporting to {tracker.name} failed while {doing} ({type(exc).__name__}: {exc}); "
                f"training goes on without {tracker.name}"
            )
            return None

    def start(self, resume_step: int, base: dict[str, Any], out: Path) -> None:
        """Open (or, on resume, reopen) every tracker's run and record their ids in tracking.json."""
        if not self.trackers:
            return
        state_path = out / STATE_FILE
        saved = _read_state(state_path) if resume_step else {}
        if not resume_step:
            self.reported_through = 0
        config = flatten(to_dict(self.config))
        for tracker in list(self.trackers):
            run = TrackedRun(out, out.resolve().name, config, base, resume_step, saved.get(tracker.name, {}))
            ids = self._guard(tracker, "starting", lambda t=tracker, r=run: t.start(r))
            if tracker in self.trackers:
                saved[tracker.name] = ids or {}
        write_json(state_path, saved)

    def log(self, row: dict[str, Any]) -> None:
        """One metrics.jsonl line; W&B and MLflow skip the steps an earlier session already sent them."""
        step, metrics = int(row["step"]), numeric_fields(row)
        for tracker in list(self.trackers):
            if step <= self.reported_through and tracker.continued and not tracker.purges:
                continue  # this tracker run has that step from the session a crash ended
            self._guard(tracker, f"logging step {step}", lambda t=tracker: t.log(step, metrics))

    def finish(self, summary: dict[str, Any], plot: Path | None) -> None:
        """The summary and the plot, then each tracker run ends (a resume reopens it)."""
        if summary.get("interrupted_by"):
            status = "interrupted"
        else:
            status = "finished" if summary.get("completed") else "failed"
        for tracker in list(self.trackers):
            where = self._guard(tracker, "finishing", lambda t=tracker: t.where())
            self._guard(tracker, "finishing", lambda t=tracker: t.finish(summary, plot, status))
            if tracker in self.trackers and where:
                self.say(where)
        self.trackers.clear()

    def close(self) -> None:
        """The run died (an exception): end each tracker run as failed; a resume reopens it."""
        for tracker in list(self.trackers):
            self._guard(tracker, "closing", tracker.close)
        self.trackers.clear()


def _read_state(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def last_reported_step(metrics_path: Path) -> int:
    """The last step metrics.jsonl (and so every tracker) got, before a resume drops the redone ones."""
    last = 0
    if metrics_path.is_file():
        for line in metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                last = max(last, int(json.loads(line).get("step", 0)))
            except (ValueError, AttributeError, TypeError):  # a line cut by a crash mid-write
                continue
    return last


def prepare_tracking(config, say: Say = _say) -> Tracking:
    """The trackers `config.report_to` names, checked installed before anything loads (one sentence if
    not); none on ranks other than 0."""
    for name in config.report_to:
        if not available(BACKENDS[name].module):
            BACKENDS[name].load()  # raises the sentence saying what to install
    if not config.report_to or not is_reporting_rank():
        return Tracking(say=say)
    reported = last_reported_step(Path(config.output_dir) / "metrics.jsonl") if config.resume else 0
    return Tracking([BACKENDS[n]() for n in config.report_to], config=config, reported_through=reported,
                    say=say)  # fmt: skip
