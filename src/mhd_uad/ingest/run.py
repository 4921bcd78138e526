"""The `ingest` command: raw scans -> the layout, in parallel processes, resumable, nothing half-written.

A subject (the rows of one set sharing a name) is done when its record `transforms/<name>.json` exists with
the same key: the SHA-256 of its input files' bytes, the settings and the template's bytes. Such subjects
are skipped; a changed input, setting or template re-runs them. Every output is written under a temporary
name and renamed, the record last, so an interrupted run leaves no subject that looks done. A bad scan is
named and skipped; the summary lists it and the command exits non-zero.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np

from mhd_uad import __version__
from mhd_uad.errors import MhdUadError
from mhd_uad.ingest.manifest import ScanSpec, SubjectPaths, group_subjects, subject_paths
from mhd_uad.ingest.scan import IngestedSubject, ingest_subject, to_raw_space
from mhd_uad.ingest.settings import IngestSettings
from mhd_uad.ingest.spatial import affine_transform_from_ras
from mhd_uad.ingest.template import NOTICE_NAME, file_sha256, load_template
from mhd_uad.io import atomic_path, atomic_write_text, load_nifti, save_nifti

log = logging.getLogger("mhd_uad.ingest")
RECORD_FORMAT = "mhd-uad ingest record 1"


def _file_entry(path: Path | None, previous: dict | None) -> dict | None:
    """Path, size, mtime and SHA-256 of an input; the hash is reused when size and mtime match the last run."""
    if path is None:
        return None
    stat = path.stat() if path.is_file() else None
    if stat is None:
        return {"path": str(path), "sha256": None}
    if previous and previous.get("size") == stat.st_size and previous.get("mtime_ns") == stat.st_mtime_ns:
        sha = previous["sha256"]
    else:
        sha = file_sha256(path)
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha}


def _read_record(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("format") == RECORD_FORMAT else None


def subject_inputs(group: list[ScanSpec], previous: dict | None = None) -> dict:
    old = (previous or {}).get("inputs", {})
    return {s.modality: {role: _file_entry(getattr(s, role), old.get(s.modality, {}).get(role))
                         for role in ("image", "mask", "seg")} for s in group}


def subject_key(inputs: dict, settings: IngestSettings, template_sha: str) -> str:
    content = {"inputs": [[m, role, (e or {}).get("sha256")] for m, roles in inputs.items()
                          for role, e in roles.items()],
               "settings": {k: v for k, v in settings.as_dict().items() if k != "template"},  # its bytes count
               "template": template_sha}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def is_done(paths: SubjectPaths, key: str, record: dict | None) -> bool:
    if record is None or record.get("key") != key:
        return False
    return all((paths.root / paths.set_dir / rel).is_file() for rel in record.get("outputs", []))


def write_subject(subject: IngestedSubject, paths: SubjectPaths, key: str, inputs: dict,
                  settings: IngestSettings, template) -> dict:
    """Every output of one subject, each atomically, the record last."""
    import SimpleITK as sitk

    set_root = paths.root / paths.set_dir
    outputs, modalities = [], {}
    for modality, item in subject.modalities.items():
        save_nifti(paths.image(modality), item.image, subject.affine, dtype=np.float32)
        with atomic_path(paths.transform(modality), suffix=".tfm") as tmp:
            sitk.WriteTransform(affine_transform_from_ras(item.template_to_raw), str(tmp))
        rel_image, rel_tfm = (str(p.relative_to(set_root)) for p in (paths.image(modality), paths.transform(modality)))
        outputs += [rel_image, rel_tfm]
        modalities[modality] = {"output": rel_image, "transform": rel_tfm, "skull_strip": item.skull_strip,
                                "template_to_raw_ras": item.template_to_raw.tolist(),
                                "raw_shape": list(item.raw_shape), "raw_affine": item.raw_affine.tolist()}
    save_nifti(paths.mask, subject.mask, subject.affine, dtype=np.float32)
    outputs.append(str(paths.mask.relative_to(set_root)))
    if subject.seg is not None:
        save_nifti(paths.seg, subject.seg, subject.affine, dtype=np.float32)
        outputs.append(str(paths.seg.relative_to(set_root)))
    record = {"format": RECORD_FORMAT, "mhd_uad_version": __version__, "key": key, "name": subject.name,
              "set_dir": paths.set_dir, "reference_modality": next(iter(subject.modalities)),
              "template": {"path": str(template.path), "sha256": template.sha256},
              "settings": settings.as_dict(), "inputs": inputs, "outputs": outputs, "modalities": modalities,
              "grid": {"shape": list(subject.mask.shape), "affine": subject.affine.tolist(),
                       "crop_lo": subject.crop[0], "crop_hi": subject.crop[1], "template_shape": list(template.shape)},
              "transform_convention": "template_to_raw_ras maps template-space RAS points to raw-scan RAS points "
                                      "(the .tfm holds the same affine in ITK's LPS convention, fixed = template); "
                                      "bring a template-space map to the raw grid by resampling through its inverse",
              "seconds": {k: round(v, 3) for k, v in subject.timings.items()}}
    atomic_write_text(paths.record, json.dumps(record, indent=1) + "\n")
    return record


def _run_one(job: tuple) -> tuple[str, str, str, dict]:
    """(label, status, message, timings) of one subject; every failure is caught and named, never raised."""
    group, root, settings, key, inputs = job
    label = f"{group[0].set}/{group[0].name} ({', '.join(s.modality for s in group)})"
    try:
        template = load_template(settings.template, settings.orientation)
        subject = ingest_subject(group, template, settings)
        write_subject(subject, subject_paths(root, group), key, inputs, settings, template)
        return label, "done", "", subject.timings
    except MhdUadError as exc:
        return label, "failed", str(exc), {}
    except Exception as exc:  # noqa: BLE001 - one bad scan must not stop the others; it is named in the summary
        return label, "failed", f"{group[0].image}: {type(exc).__name__}: {exc}", {}


def _init_worker(threads: int) -> None:
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(max(1, threads))


def _plan(groups, root: Path, settings: IngestSettings, template_sha: str):
    jobs, skipped = [], []
    for group in groups:
        paths = subject_paths(root, group)
        previous = _read_record(paths.record)
        inputs = subject_inputs(group, previous)
        key = subject_key(inputs, settings, template_sha)
        if is_done(paths, key, previous):
            skipped.append(f"{group[0].set}/{group[0].name}")
        else:
            jobs.append((group, root, settings, key, inputs))
    return jobs, skipped


def run_ingest(specs: list[ScanSpec], out_root: str | Path, settings: IngestSettings, *, workers: int = 1,
               progress: bool = True) -> dict:
    """Ingest every subject of `specs` into the layout under `out_root`; returns the summary.

    Raises MhdUadError after the others are done when any subject failed (each failure is in the message)."""
    from tqdm.auto import tqdm

    if not isinstance(workers, int) or workers < 1:
        raise MhdUadError(f"--workers must be a positive integer, got {workers!r}")
    started = time.perf_counter()
    root = Path(out_root)
    template = load_template(settings.template, settings.orientation)
    jobs, skipped = _plan(group_subjects(specs), root, settings, template.sha256)
    results: list[tuple[str, str, str, dict]] = []
    bar = tqdm(total=len(jobs), desc="ingest", unit="subject", disable=not progress or not jobs)
    try:
        if workers == 1 or len(jobs) < 2:
            for job in jobs:
                results.append(_run_one(job))
                bar.update(1)
        else:
            n = min(workers, len(jobs))
            ctx = multiprocessing.get_context("spawn")  # SimpleITK and torch threads do not survive fork well
            with concurrent.futures.ProcessPoolExecutor(n, mp_context=ctx, initializer=_init_worker,
                                                        initargs=((os.cpu_count() or 1) // n,)) as pool:
                for result in pool.map(_run_one, jobs):
                    results.append(result)
                    bar.update(1)
    finally:
        bar.close()
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(root / NOTICE_NAME, template.notice())
    return _summarise(results, skipped, time.perf_counter() - started)


def _summarise(results, skipped: list[str], seconds: float) -> dict:
    failed = {label: message for label, status, message, _ in results if status == "failed"}
    done = [label for label, status, _, _ in results if status == "done"]
    timings: dict[str, float] = {}
    for *_, t in results:
        for k, v in t.items():
            timings[k] = timings.get(k, 0.0) + v
    summary = {"done": done, "skipped": skipped, "failed": failed, "seconds": round(seconds, 2),
               "seconds_per_step": {k: round(v, 2) for k, v in timings.items()}}
    log.info("ingest: %d subject(s) ingested, %d skipped (done before with the same inputs, settings and "
             "template), %d failed, in %.1f s", len(done), len(skipped), len(failed), seconds)
    for label, message in failed.items():
        log.error("ingest failed for %s: %s", label, message)
    if failed:
        raise MhdUadError(f"{len(failed)} of {len(results) + len(skipped)} subject(s) failed: "
                          + "; ".join(f"{label}: {message}" for label, message in failed.items()))
    return summary


def map_to_raw(volume_path: str | Path, record_path: str | Path, modality: str, out_path: str | Path,
               *, linear: bool = True) -> Path:
    """Write a template-space volume (e.g. an anomaly map of an ingested scan) on its raw scan's own grid and
    affine, through the inverse of the transform kept in the subject's record."""
    record = _read_record(Path(record_path))
    if record is None:
        raise MhdUadError("not an ingest record", record_path)
    if modality not in record["modalities"]:
        raise MhdUadError(f"the record has no modality {modality!r} (has {sorted(record['modalities'])})",
                          record_path)
    entry = record["modalities"][modality]
    volume, affine = load_nifti(volume_path, what="template-space volume")
    raw = to_raw_space(volume, affine, np.asarray(entry["template_to_raw_ras"]), tuple(entry["raw_shape"]),
                       np.asarray(entry["raw_affine"]), linear=linear)
    return save_nifti(out_path, raw, np.asarray(entry["raw_affine"]), dtype=np.float32)
