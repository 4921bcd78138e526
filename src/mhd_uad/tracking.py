"""MLflow in one place: the store, run tags, flattened params. mlflow is imported lazily (about 1.3 s).

The default store is `mlflow.db` at the repository root, by absolute path: queued DVC experiments run in
temporary copies of the repository (`.dvc/tmp/exps/...`), and a relative path would vanish with them.
`MLFLOW_TRACKING_URI` overrides it (a shared tracking server, say).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

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


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists become strings (MLflow params are scalars)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value) if isinstance(value, list | tuple) else value
    return out


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
