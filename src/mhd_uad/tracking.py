"""MLflow in one place: the store, run tags, the training logger, the evaluation runs and checkpoint records.

No other module imports mlflow (a test checks it); mlflow is imported lazily (about 1.3 s).

The default store is `mlflow.db` at the repository root, by absolute path: queued DVC experiments run in
temporary copies of the repository (`.dvc/tmp/exps/...`), and a relative path would vanish with them.
`MLFLOW_TRACKING_URI` overrides it (a shared tracking server, say).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from mhd_uad.config import flatten

log = logging.getLogger(__name__)

EXPERIMENT = "mhd-uad"
_TEMP_EXP_MARKER = os.sep.join(("", ".dvc", "tmp", "exps", ""))


def repository_root(start: str | Path = ".") -> Path:
    """The repository a command belongs to, also from inside a queued DVC experiment's temporary copy."""
    path = Path(start).resolve()
    text = str(path) + os.sep
    if _TEMP_EXP_MARKER in text:
        return Path(text.split(_TEMP_EXP_MARKER, 1)[0])
    for candidate in (path, *path.parents):
        if (candidate / "dvc.yaml").is_file() or (candidate / ".git").exists():
            return candidate
    return path


def tracking_uri(start: str | Path = ".") -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repository_root(start) / 'mlflow.db'}"


def ensure_store(uri: str | None = None) -> str:
    """The tracking URI, its sqlite store created under a file lock beside it: MLflow builds a new store's
    schema as it first opens it, and fits started side by side on a fresh store would race (the loser fails
    with "duplicate column name"); the project's experiment is made under the same lock."""
    uri = uri or tracking_uri()
    if uri.startswith("sqlite:///"):
        from filelock import FileLock
        from mlflow.tracking import MlflowClient

        with FileLock(uri[len("sqlite:///"):] + ".lock"):
            client = MlflowClient(uri)
            if client.get_experiment_by_name(EXPERIMENT) is None:
                client.create_experiment(EXPERIMENT)
    return uri


def git_commit(start: str | Path = ".") -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=start, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_tags(stage: str) -> dict[str, str]:
    return {
        "git_commit": git_commit(),
        "stage": stage,
        "dvc_experiment": os.environ.get("DVC_EXP_NAME", "workspace"),
        "dvc_stage": os.environ.get("DVC_STAGE", stage),
    }


def _has_run(uri: str, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(uri).get_run(run_id)
    except MlflowException:
        return False
    return True


def lightning_logger(stage: str, params: Mapping, run_id: str | None = None):
    """An MLFlowLogger on the project store: a new run named and tagged after the stage, with params
    logged, or (run_id) the run of an interrupted fit, continued (a new one if the store lost it)."""
    os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    from lightning.pytorch.loggers import MLFlowLogger

    uri = ensure_store()
    if run_id is not None:
        if _has_run(uri, run_id):
            return MLFlowLogger(experiment_name=EXPERIMENT, tracking_uri=uri, run_id=run_id)
        log.warning("MLflow run %s of the interrupted fit is not in %s: the fit continues in a new run", run_id, uri)
    logger = MLFlowLogger(experiment_name=EXPERIMENT, run_name=stage, tracking_uri=uri,
                          tags=run_tags(stage), log_model=False)
    logger.log_hyperparams(flatten(params))
    return logger


def record_checkpoint(run_id: str, checkpoint: Path) -> None:
    """Tag a finished fit's run with the checkpoint it produced."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri())
    client.set_tag(run_id, "checkpoint", str(checkpoint.resolve()))
    client.log_param(run_id, "checkpoint_path", str(checkpoint))


class StageRun:
    """The MLflow run of a stage in progress (`stage_run`); `record` logs the stage's results into it. Without a
    run (not asked for on this rank, or the store failed to open one) it does nothing."""

    def __init__(self, stage: str, run_id: str | None = None):
        self.stage, self.run_id = stage, run_id

    def record(self, metrics: Mapping, artifacts: Sequence[Path] = ()) -> None:
        """The finite numeric metrics (flattened) and the files given that exist."""
        if self.run_id is None:
            return
        try:
            import mlflow

            mlflow.log_metrics({k.replace("/", "_"): v for k, v in flatten(metrics).items()
                                if isinstance(v, int | float) and v == v and abs(v) != float("inf")},
                               run_id=self.run_id)
            for path in artifacts:
                if Path(path).is_file():
                    mlflow.log_artifact(str(path), run_id=self.run_id)
        except Exception as exc:  # tracking must not lose a finished stage
            log.warning("MLflow logging of %s failed: %s", self.stage, exc)

    def end(self, status: str) -> None:
        if self.run_id is None:
            return
        try:
            import mlflow

            mlflow.end_run(status)
        except Exception as exc:
            log.warning("MLflow could not end the run of %s: %s", self.stage, exc)


def _start_run(stage: str, params: Mapping) -> str | None:
    """A new run on the project store, named and tagged after the stage, its params flattened; None (and a
    warning) when the store fails."""
    try:
        import mlflow

        mlflow.set_tracking_uri(ensure_store())
        mlflow.set_experiment(EXPERIMENT)
        run_id = mlflow.start_run(run_name=stage, tags=run_tags(stage)).info.run_id
    except Exception as exc:
        log.warning("MLflow: no run for %s: %s", stage, exc)
        return None
    try:
        flat = list(flatten(params).items())
        for start in range(0, len(flat), 90):  # MLflow takes at most 100 params per call
            mlflow.log_params(dict(flat[start:start + 90]), run_id=run_id)
    except Exception as exc:
        log.warning("MLflow logging of %s's params failed: %s", stage, exc)
    return run_id


@contextlib.contextmanager
def stage_run(stage: str, params: Mapping, active: bool = True) -> Iterator[StageRun]:
    """An MLflow run that spans the block (so its start, end and duration are the stage's): opened on entry,
    ended FINISHED when the block completes and FAILED when it raises (the exception goes on). `active=False`
    (the ranks other than 0 of a distributed stage) opens none. A tracking failure is a warning: the stage
    goes on untracked rather than fail."""
    run = StageRun(stage, _start_run(stage, params) if active else None)
    try:
        yield run
    except BaseException:
        run.end("FAILED")
        raise
    run.end("FINISHED")


def log_evaluation(stage: str, params: Mapping, metrics: Mapping, artifacts: list[Path]) -> None:
    """One MLflow run for a finished evaluation, opened and ended at once: flattened params, the finite
    numeric metrics, the files given. A tracking failure is logged as a warning and never loses the
    evaluation."""
    with stage_run(stage, params) as run:
        run.record(metrics, artifacts)
