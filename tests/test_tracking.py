"""The MLflow store: fits started side by side on a fresh store, and a resumed fit whose run the store lost."""

import subprocess
import sys

from mhd_uad import tracking

CREATE = "from mhd_uad.tracking import ensure_store; ensure_store()"


def test_processes_side_by_side_create_one_fresh_store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {"MLFLOW_TRACKING_URI": uri, "PATH": ""}
    procs = [subprocess.Popen([sys.executable, "-c", CREATE], env=env, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    errors = [p.communicate()[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    from mlflow.tracking import MlflowClient

    assert [e.name for e in MlflowClient(uri).search_experiments() if e.name == tracking.EXPERIMENT] == \
        [tracking.EXPERIMENT]


def test_a_lost_run_of_an_interrupted_fit_continues_in_a_new_run(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    first = tracking.lightning_logger("train@t1-fold0", {"a": 1})
    again = tracking.lightning_logger("train@t1-fold0", {"a": 1}, run_id=first.run_id)
    assert again.run_id == first.run_id
    lost = tracking.lightning_logger("train@t1-fold0", {"a": 1}, run_id="0" * 32)
    assert lost.run_id not in (first.run_id, "0" * 32)
    assert "not in" in caplog.text
