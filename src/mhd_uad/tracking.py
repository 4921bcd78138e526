"""MLflow in one place: the store, run tags, the training logger, the evaluation and checkpoint records.

No other module imports mlflow (a test checks it); mlflow is imported lazily (about 1.3 s).

The default store is `mlflow.db` at the repository root, by absolute path: queued DVC experiments run in
temporary copies of the repository (`.dvc/tmp/exps/...`), and a relative path would vanish with them.
`MLFLOW_TRACKING_URI` overrides it (a shared tracking server, say).
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Mapping
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


def lightning_logger(stage: str, params: Mapping, run_id: str | None = None):
    """An MLFlowLogger on the project store: a new run named and tagged after the stage, with params
    logged, or (run_id) the run of an interrupted fit, continued."""
    os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    from lightning.pytorch.loggers import MLFlowLogger

    if run_id is not None:
        return MLFlowLogger(experiment_name=EXPERIMENT, tracking_uri=tracking_uri(), run_id=run_id)
    logger = MLFlowLogger(experiment_name=EXPERIMENT, run_name=stage, tracking_uri=tracking_uri(),
                          tags=run_tags(stage), log_model=False)
    logger.log_hyperparams(flatten(params))
    return logger


def record_checkpoint(run_id: str, checkpoint: Path) -> None:
    """Tag a finished fit's run with the checkpoint it produced."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri())
    client.set_tag(run_id, "checkpoint", str(checkpoint.resolve()))
    client.log_param(run_id, "checkpoint_path", str(checkpoint))


def log_evaluation(stage: str, params: Mapping, metrics: Mapping, artifacts: list[Path]) -> None:
    """One MLflow run for an evaluation: flattened params, the finite numeric metrics, the files given.

    A tracking failure is logged as a warning and never loses a finished evaluation."""
    try:
        import mlflow

        mlflow.set_tracking_uri(tracking_uri())
        mlflow.set_experiment(EXPERIMENT)
        with mlflow.start_run(run_name=stage, tags=run_tags(stage)):
            flat = list(flatten(params).items())
            for start in range(0, len(flat), 90):  # MLflow takes at most 100 params per call
                mlflow.log_params(dict(flat[start:start + 90]))
            mlflow.log_metrics({k.replace("/", "_"): v for k, v in flatten(metrics).items()
                                if isinstance(v, int | float) and v == v and abs(v) != float("inf")})
            for path in artifacts:
                if Path(path).is_file():
                    mlflow.log_artifact(str(path))
    except Exception as exc:  # tracking must not lose a finished evaluation
        log.warning("MLflow logging of %s failed: %s", stage, exc)
