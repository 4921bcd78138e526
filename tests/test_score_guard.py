"""`mhd-uad score`'s guard (mhd_uad.evaluation.guard) and `score --out-reconstruction`.

Fast tests: a prepared IXI set of the tiny layout is the training side; a scan of the same kind passes, and each
check refuses its own failing case (the same scan with flipped or permuted voxel axes, coarser voxels, the brain
off the grid's centre, the brain mostly outside the field of view, a skull, another intensity histogram). The
CLI's messages and `--out-reconstruction`'s plumbing run in-process with a stand-in model. Slow tests score
with the shared tiny model (`--force`, the real mean reconstruction), and take the repository's raw test head
(skull on) through `score` and `score --raw` against the demo's prepared IXI set (skipped before `make demo`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from conftest import REPO, SHRUNK, run_data_stages, shrunk_params, write_scan
from mhd_uad import cli
from mhd_uad.data.preprocess import PrepareSettings, preprocess_scan
from mhd_uad.evaluation import guard
from mhd_uad.io import load_nifti, save_nifti

DATA = Path(__file__).resolve().parent / "data"
RAW_HEAD, RAW_MASK = DATA / "sri24_head_2mm.nii.gz", DATA / "sri24_head_2mm_brainmask.nii.gz"
SHAPE, VOXEL = (40, 44, 36), 4.0  # the tiny layout's scans (conftest.make_tiny_layout)


@pytest.fixture(scope="module")
def project(tiny_data, tmp_path_factory):
    """A project folder whose artifacts/prepared/IXI_t1 is the tiny layout's 8 healthy T1 scans."""
    root = tmp_path_factory.mktemp("guard") / "project"
    root.mkdir()
    (root / "conf").symlink_to(REPO / "conf")
    params = shrunk_params()
    run_data_stages(tiny_data, root / "artifacts", params, only=["IXI_t1"])
    return root, params


def tiny_scan(folder: Path, name: str = "scan", seed: int = 7) -> tuple[Path, Path]:
    """A healthy scan made as the tiny layout's are (a noisy ellipsoid brain, 4 mm, RAS)."""
    write_scan(folder, "new", name, "t1", np.random.default_rng(seed), SHAPE, VOXEL, lesion=False)
    return folder / "new" / "t1" / f"{name}_t1.nii.gz", folder / "new" / "mask" / f"{name}_mask.nii.gz"


def save_pair(folder: Path, name: str, image, mask, affine) -> tuple[Path, Path]:
    return (save_nifti(folder / f"{name}.nii.gz", image, affine, dtype=np.float32),
            save_nifti(folder / f"{name}_mask.nii.gz", mask, affine, dtype=np.uint8))


def failed_checks(project, image: Path, mask: Path, modality: str = "t1") -> list[str]:
    """The checks the scan fails (`guard.guard_scan` with force: warnings, not an error)."""
    root, params = project
    prepared = preprocess_scan(image, mask, None, PrepareSettings.from_params(params))
    return guard.guard_scan(params, prepared, modality, image, root=root, force=True)


# ------------------------------------------------------------------------------------ the checks, one by one


def test_a_scan_like_the_training_scans_passes_and_the_summary_is_cached(project, tmp_path):
    root, _ = project
    image, mask = tiny_scan(tmp_path)
    assert failed_checks(project, image, mask) == []
    cache = root / "artifacts" / guard.CACHE_FOLDER / "IXI_t1.json"
    assert cache.is_file()
    cached = guard.training_features(root / "artifacts" / "prepared" / "IXI_t1", cache.parent)
    assert len(cached) == 8 and {t["axcodes"] for t in cached} == {"RAS"}
    # A cache of another prepared set (another fingerprint) is not used: the summary is computed again.
    cache.write_text(cache.read_text().replace('"fingerprint": "', '"fingerprint": "x'))
    assert guard.training_features(root / "artifacts" / "prepared" / "IXI_t1", cache.parent) == cached


def _reoriented(image: Path, mask: Path, axcodes: str, out: Path) -> tuple[Path, Path]:
    """The same scan (same world positions) stored in another voxel order."""
    paths = []
    for path in (image, mask):
        img = nib.load(str(path))
        ornt = nib.orientations.ornt_transform(nib.orientations.io_orientation(img.affine),
                                               nib.orientations.axcodes2ornt(tuple(axcodes)))
        moved = img.as_reoriented(ornt)
        paths.append(save_nifti(out / f"{axcodes}_{path.name}", np.asarray(moved.dataobj), moved.affine))
    return paths[0], paths[1]


def _coarser(tmp_path: Path):
    """The same kind of brain on 6 mm voxels (the training scans': 4 mm; accepted up to 5 mm)."""
    write_scan(tmp_path, "coarse", "scan", "t1", np.random.default_rng(7), (27, 29, 24), 6.0, lesion=False)
    return tmp_path / "coarse/t1/scan_t1.nii.gz", tmp_path / "coarse/mask/scan_mask.nii.gz"


def _padded(image: Path, mask: Path, pad, name: str, out: Path) -> tuple[Path, Path]:
    """The scan with zero voxels added before/after each axis: the centred crop moves over the brain."""
    data, affine = load_nifti(image)
    brain, _ = load_nifti(mask)
    moved = affine.copy()
    moved[:3, 3] -= affine[:3, :3] @ np.array([p[0] for p in pad], dtype=np.float64)
    return save_pair(out, name, np.pad(data, pad), np.pad(brain, pad), moved)


def _with_skull(image: Path, mask: Path, out: Path) -> tuple[Path, Path]:
    """A bright shell 12-20 mm outside the brain (room made by padding 6 voxels all round)."""
    data, affine = load_nifti(image)
    brain, _ = load_nifti(mask)
    data, brain = np.pad(data, 6), np.pad(brain, 6)
    affine = affine.copy()
    affine[:3, 3] -= affine[:3, :3] @ np.full(3, 6.0)
    distance = ndi.distance_transform_edt(brain == 0)
    return save_pair(out, "skull", np.where((distance > 3) & (distance <= 5), 0.9, data), brain, affine)


def _bimodal(image: Path, mask: Path, out: Path) -> tuple[Path, Path]:
    """Another contrast: two tissue classes (dark left half, bright right half) instead of one."""
    data, affine = load_nifti(image)
    brain, _ = load_nifti(mask)
    rng = np.random.default_rng(1)
    x = np.arange(data.shape[0])[:, None, None] < np.argwhere(brain > 0)[:, 0].mean()
    other = (np.where(x, 0.25, 0.9) + 0.03 * rng.standard_normal(data.shape)) * (brain > 0)
    return save_pair(out, "bimodal", other, brain, affine)


CASES = {
    "flipped voxel order (LAS)": (lambda i, m, t: _reoriented(i, m, "LAS", t), "voxel order"),
    "permuted voxel axes (PSR)": (lambda i, m, t: _reoriented(i, m, "PSR", t), "voxel order"),
    "6 mm voxels": (lambda i, m, t: _coarser(t), "voxel size"),
    # 12 voxels (48 mm) added left of the brain: the centred crop sees it 24 mm right of the centre
    "brain off the grid's centre": (lambda i, m, t: _padded(i, m, ((12, 0), (0, 0), (0, 0)), "off", t),
                                    "brain on the model grid"),
    # 48 voxels (192 mm) added above: the crop's 96 mm of z hold only the top of the brain, if anything
    "brain outside the field of view": (lambda i, m, t: _padded(i, m, ((0, 0), (0, 0), (0, 48)), "cut", t),
                                        "field of view"),
    "skull on": (lambda i, m, t: _with_skull(i, m, t), "skull stripped"),
    "another contrast": (lambda i, m, t: _bimodal(i, m, t), "intensities"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_check_refuses_its_failing_case(project, tmp_path, case):
    make, check = CASES[case]
    image, mask = make(*tiny_scan(tmp_path), tmp_path)
    failed = failed_checks(project, image, mask)
    assert [f.split(":")[0] for f in failed if f.startswith(check)] == [check], failed
    if case not in ("brain outside the field of view", "6 mm voxels"):  # these move the grid's mask too
        assert len(failed) == 1, failed


def test_no_training_scans_is_a_warning_not_an_error(project, tmp_path, caplog):
    root, params = project
    image, mask = tiny_scan(tmp_path)
    prepared = preprocess_scan(image, mask, None, PrepareSettings.from_params(params))
    with caplog.at_level("WARNING"):
        assert guard.guard_scan(params, prepared, "t2", image, root=root) is None  # no IXI_t2 prepared here
    assert "was not checked against the training scans" in caplog.text and "IXI_t2" in caplog.text


def test_after_ingest_the_message_names_the_raw_scan_and_does_not_ask_for_raw(project, tmp_path):
    root, params = project
    image, mask = _with_skull(*tiny_scan(tmp_path), tmp_path)
    prepared = preprocess_scan(image, mask, None, PrepareSettings.from_params(params))
    with pytest.raises(guard.ScanGuardError) as caught:
        guard.guard_scan(params, prepared, "t1", image, root=root, raw_source=tmp_path / "raw_head.nii.gz")
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'raw_head.nii.gz'}: after ingest the scan still does not look like")
    assert "skull stripped" in message and "--force" in message and "--raw" not in message


# ------------------------------------------------------------------------------------ the CLI, stand-in model


@pytest.fixture
def stand_in(monkeypatch):
    """A stand-in for the cDDPM: the k-th checkpoint 'reconstructs' the image as k * image, its map is 0."""
    import mhd_uad.evaluation.score as score

    calls = []

    def score_volume(model, image, mask, settings, scan, device, scorers):
        calls.append(model)
        return {"mhd": np.zeros_like(image)}, np.asarray(image, dtype=np.float32) * len(calls)

    class Model:
        def to(self, device):
            return self

    monkeypatch.setattr(score, "load_cddpm", lambda params, ckpt, modality: (Model(), {}))
    monkeypatch.setattr(score, "score_volume", score_volume)
    return calls


def _score(root, monkeypatch, *args) -> int:
    monkeypatch.chdir(root)
    return cli.main(["score", *args, *SHRUNK])


def test_refused_scan_gets_one_line_and_force_scores_it(project, tmp_path, monkeypatch, capsys, caplog,
                                                        stand_in):
    root, _ = project
    image, mask = _with_skull(*tiny_scan(tmp_path), tmp_path)
    out, reco = tmp_path / "map.nii.gz", tmp_path / "reco.nii.gz"
    ckpt = ["--checkpoint", "a.ckpt", "--checkpoint", "b.ckpt"]
    monkeypatch.setattr("mhd_uad.evaluation.score.checkpoint_modality", lambda c: "t1")
    code = _score(root, monkeypatch, str(image), "--mask", str(mask), "--out", str(out), *ckpt)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"mhd-uad score: error: {image}: does not look like the T1 training scans (skull stripped:")
    assert "pass --raw" in err and "--force" in err
    assert not out.exists() and not reco.exists() and stand_in == []  # refused before any model ran

    with caplog.at_level("WARNING"):
        code = _score(root, monkeypatch, str(image), "--mask", str(mask), "--out", str(out), *ckpt, "--force",
                      "--out-reconstruction", str(reco))
    assert code == 0 and len(stand_in) == 2
    assert "does not look like the training scans (skull stripped" in caplog.text and "(--force)" in caplog.text
    assert out.is_file() and reco.is_file()


def test_out_reconstruction_is_the_checkpoints_mean_in_the_scans_space(project, tmp_path, monkeypatch, caplog,
                                                                       stand_in):
    root, params = project
    image, mask = tiny_scan(tmp_path)
    out, reco = tmp_path / "map.nii.gz", tmp_path / "reco.nii.gz"
    monkeypatch.setattr("mhd_uad.evaluation.score.checkpoint_modality", lambda c: "t1")
    with caplog.at_level("WARNING"):
        code = _score(root, monkeypatch, str(image), "--mask", str(mask), "--out", str(out), "--checkpoint",
                      "a.ckpt", "--checkpoint", "b.ckpt", "--out-reconstruction", str(reco))
    assert code == 0 and len(stand_in) == 2
    assert "training scans" not in caplog.text  # an in-space scan passes the guard silently
    written, affine = load_nifti(reco)
    scan, scan_affine = load_nifti(image)
    brain = load_nifti(mask)[0] > 0
    assert written.shape == scan.shape == load_nifti(out)[0].shape
    np.testing.assert_allclose(affine, scan_affine)
    assert np.all(written[~brain] == 0)
    # the two checkpoints' means, 1 x and 2 x the preprocessed image, average to 1.5 x it, brought back to the
    # scan's grid: 1.5 x the scan's [0, 1]-scaled version inside the brain and the field of view
    prepared = preprocess_scan(image, mask, None, PrepareSettings.from_params(params))
    from mhd_uad.data.geometry import to_source_space

    expected = 1.5 * to_source_space(prepared.image, prepared.geometry, prepared.source_brain)
    np.testing.assert_allclose(written, expected, atol=1e-5)
    scored = brain & (written > 0)
    assert scored.sum() > 0.5 * brain.sum()
    assert np.corrcoef(written[scored], scan[scored])[0, 1] > 0.9


# ------------------------------------------------------------------------------------ real models


@pytest.mark.slow
def test_force_scores_with_the_tiny_model_and_writes_its_mean_reconstruction(tiny_model, tmp_path, monkeypatch):
    root = tmp_path / "project"
    (root / "artifacts" / "prepared").mkdir(parents=True)
    (root / "conf").symlink_to(REPO / "conf")
    (root / "models").symlink_to(tiny_model.root / "models")
    (root / "artifacts" / "prepared" / "IXI_t1").symlink_to(tiny_model.root / "artifacts" / "prepared" / "IXI_t1")
    image, mask = _with_skull(*tiny_scan(tmp_path), tmp_path)
    out, reco = tmp_path / "map.nii.gz", tmp_path / "reco.nii.gz"
    args = [str(image), "--mask", str(mask), "--modality", "t1", "--out", str(out)]
    assert _score(root, monkeypatch, *args) == 2 and not out.exists()
    assert _score(root, monkeypatch, *args, "--force", "--out-reconstruction", str(reco)) == 0
    written, affine = load_nifti(reco)
    scan, scan_affine = load_nifti(image)
    brain = load_nifti(mask)[0] > 0
    assert written.shape == scan.shape and np.allclose(affine, scan_affine)
    assert np.all(written[~brain] == 0) and np.isfinite(written).all()
    inside = written[brain & (written != 0)]
    assert inside.size > 0.5 * brain.sum() and -0.5 < inside.mean() < 1.5  # the model's [0, 1] scale


def _demo_project(tmp_path: Path) -> Path:
    """A project folder whose training scans are the repository's demo IXI set (skip without `make demo`)."""
    prepared = REPO / "artifacts" / "prepared"
    if not all((prepared / f"IXI_{m}" / "index.json").is_file() for m in ("t1", "t2")):
        pytest.skip("the demo's prepared IXI sets are missing (run `make demo`)")
    root = tmp_path / "project"
    (root / "artifacts" / "prepared").mkdir(parents=True)
    (root / "conf").symlink_to(REPO / "conf")
    for m in ("t1", "t2"):
        (root / "artifacts" / "prepared" / f"IXI_{m}").symlink_to(prepared / f"IXI_{m}")
    return root


def test_demo_scans_pass_and_the_raw_head_and_another_contrast_do_not(tmp_path):
    root = _demo_project(tmp_path)
    scans = {ds: sorted((REPO / "data" / "Test" / ds / m).glob("*.nii.gz"))[:1]
             for ds, m in (("Brats21", "t2"), ("MSLUB", "t2"), ("ATLAS_v2", "t1"), ("WMH", "t1"))}
    if not all(scans.values()):
        pytest.skip("the demo data are missing (run `make demo`)")
    project = (root, shrunk_params())
    for image, in scans.values():
        modality = image.parent.name
        mask = image.parent.parent / "mask" / image.name.replace(f"_{modality}.", "_mask.")
        assert failed_checks(project, image, mask, modality) == [], image
        other = "t1" if modality == "t2" else "t2"
        assert [f.split(":")[0] for f in failed_checks(project, image, mask, other)] == ["intensities"], image
    assert [f.split(":")[0] for f in failed_checks(project, RAW_HEAD, RAW_MASK)] == ["skull stripped"]


@pytest.mark.slow
def test_raw_head_is_refused_without_raw_and_scored_with_it(tiny_model, tmp_path, monkeypatch, capsys):
    """The repository's raw test head (skull on): refused by `score`, ingested and scored by `score --raw` (the
    ingested scan passes the guard against the demo's training scans), its map and mean reconstruction written
    in the raw head's own grid."""
    root = _demo_project(tmp_path)
    shutil.copytree(tiny_model.root / "models" / "t1", root / "models" / "t1")
    out, reco = tmp_path / "map.nii.gz", tmp_path / "reco.nii.gz"
    args = [str(RAW_HEAD), "--mask", str(RAW_MASK), "--modality", "t1", "--out", str(out)]
    assert _score(root, monkeypatch, *args) == 2
    err = capsys.readouterr().err
    assert "skull stripped" in err and "pass --raw" in err and not out.exists()
    code = _score(root, monkeypatch, "--raw", *args, "--out-reconstruction", str(reco),
                  "ingest.spacing_mm=2.0", "ingest.n4.iterations=[50,50,50]")
    assert code == 0, capsys.readouterr().err
    head, head_affine = load_nifti(RAW_HEAD)
    brain = load_nifti(RAW_MASK)[0] > 0
    for path in (out, reco):
        written, affine = load_nifti(path)
        assert written.shape == head.shape and np.allclose(affine, head_affine)
        assert np.all(written[~brain] == 0) and written[brain].max() > 0
