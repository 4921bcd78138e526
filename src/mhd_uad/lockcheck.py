"""`mhd-uad check-lock`: is dvc.lock current for the committed params, code and metrics, without data?

CI has no DVC remote access on pull requests, so data, prepared arrays and checkpoints are absent there;
DVC reports those as deleted, which says nothing about staleness. What must match dvc.lock is what git
holds: params, code dependencies, the stage commands, and the git-tracked outputs (metrics, plots).
"""

from __future__ import annotations

from pathlib import Path

from mhd_uad.errors import MhdUadError

IGNORED_STATES = {"deleted", "not in cache"}


def stale_entries(status: dict) -> list[str]:
    """Lines naming each stage whose lock entry no longer matches params, code or git-tracked outputs."""
    problems = []
    for stage, changes in status.items():
        for change in changes:
            if isinstance(change, str):  # "changed command", "always changed"
                if change != "always changed":
                    problems.append(f"{stage}: {change}")
                continue
            for kind, paths in change.items():
                for path, state in paths.items():
                    if isinstance(state, dict):  # params: {key: "modified" | "new" | "deleted"}
                        for key, pstate in state.items():
                            problems.append(f"{stage}: param {key} {pstate} ({path})")
                    elif state not in IGNORED_STATES:
                        problems.append(f"{stage}: {kind.removeprefix('changed ')} {path} {state}")
    return problems


def check_lock(root: str | Path = ".") -> list[str]:
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo(str(root)) as repo:
            status = repo.status()
    except DvcException as exc:
        raise MhdUadError(f"dvc status failed: {exc}") from None
    return stale_entries(status)
