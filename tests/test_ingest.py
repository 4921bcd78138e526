"""`mhd-uad ingest` and `score --raw` on real anatomy: the SRI24 head *with skull* (tests/data, 2 mm) moved by
a known affine, resampled onto an oblique-free but permuted, anisotropic grid, multiplied by a bias field
and stored as int16, then ingested into nilearn's MNI152 brain (another anatomy, 2 mm) as the template.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi
from scipy.spatial.transform import Rotation

from conftest import REPO, SHRUNK
from mhd_uad.errors import ConfigError, InputFileError
from mhd_uad.io import load_nifti, save_nifti

DATA = Path(__file__).resolve().parent / "data"
FAST = ["ingest.spacing_mm=2.0"]  # the test scans and template are 2 mm; the method's 1 mm is the default


# ---------------------------------------------------------------- raw scans with a known geometry and bias


def known_affine(rotation_deg=(6.0, -4.0, 12.0), shift_mm=(8.0, -6.0, 5.0), scale=1.06) -> np.ndarray:
    moved = np.eye(4)
    moved[:3, :3] = Rotation.from_euler("xyz", rotation_deg, degrees=True).as_matrix() * scale
    moved[:3, 3] = shift_mm
    return moved


def _raw_grid(shape, affine, moved, spacing, axcodes):
    """A grid of voxel size `spacing` with voxel axes along `axcodes`, covering the moved head."""
    corners = np.array([[i, j, k, 1] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1)
                        for k in (0, shape[2] - 1)]).T
    world = (moved @ affine @ corners)[:3]
    lo, hi = world.min(axis=1), world.max(axis=1)
    grid, out_shape = np.zeros((4, 4)), []
    grid[3, 3] = 1
    for vox_axis, (world_axis, flip) in enumerate(nib.orientations.axcodes2ornt(tuple(axcodes))):
        world_axis = int(world_axis)
        grid[world_axis, vox_axis] = spacing[vox_axis] * flip
        grid[world_axis, 3] = lo[world_axis] if flip > 0 else hi[world_axis]
        out_shape.append(int(np.ceil((hi[world_axis] - lo[world_axis]) / spacing[vox_axis])) + 1)
    return tuple(out_shape), grid


def _world(shape, affine):
    idx = np.indices(shape).reshape(3, -1)
    return (affine @ np.vstack([idx, np.ones(idx.shape[1])]))[:3]


def make_raw_head(folder: Path, name: str = "head", *, moved=None, spacing=(2.2, 2.0, 2.6), axcodes="PSR",
                  bias: float = 0.35, lesion=None):
    """The SRI24 head moved by `moved` onto a new grid, times a smooth bias field, as int16, with its brain
    mask; `lesion` = (centre in the head's world mm, radius mm, intensity factor) brightens a sphere first."""
    head, head_affine = load_nifti(DATA / "sri24_head_2mm.nii.gz")
    brain, _ = load_nifti(DATA / "sri24_head_2mm_brainmask.nii.gz")
    moved = known_affine() if moved is None else moved
    shape, affine = _raw_grid(head.shape, head_affine, moved, spacing, axcodes)
    world = _world(shape, affine)
    src = (np.linalg.inv(head_affine) @ np.linalg.inv(moved) @ np.vstack([world, np.ones(world.shape[1])]))[:3]
    image = ndi.map_coordinates(head, src, order=1).reshape(shape)
    mask = ndi.map_coordinates(brain, src, order=0).reshape(shape) > 0.5
    lesion_mask = None
    if lesion is not None:
        centre, radius, gain = lesion
        centre_raw = (moved @ np.append(centre, 1.0))[:3]
        lesion_mask = (np.linalg.norm(world - centre_raw[:, None], axis=0).reshape(shape) <= radius) & mask
        image = np.where(lesion_mask, image * gain, image)
    rel = (world - world.mean(axis=1, keepdims=True)) / 80.0
    field = np.exp(bias * (rel[0] + 0.6 * rel[1] - 0.5 * rel[2] + 0.4 * rel[0] * rel[2])).reshape(shape)
    folder.mkdir(parents=True, exist_ok=True)
    save_nifti(folder / f"{name}.nii.gz", np.round(image * field), affine, dtype=np.int16)
    save_nifti(folder / f"{name}_mask.nii.gz", mask, affine, dtype=np.uint8)
    return folder / f"{name}.nii.gz", folder / f"{name}_mask.nii.gz", lesion_mask


@pytest.fixture(scope="module")
def mni_template(tmp_path_factory):
    """nilearn's MNI152 brain at 2 mm as a template file, with its brain mask and white-matter map."""
    from nilearn import datasets, image

    out = tmp_path_factory.mktemp("template")
    t1 = datasets.load_mni152_template(resolution=1)
    grid = np.diag([2.0, 2.0, 2.0, 1.0])
    grid[:3, 3] = t1.affine[:3, 3]

    def at_2mm(img, interpolation):
        return image.resample_img(img, target_affine=grid, target_shape=(99, 117, 95), interpolation=interpolation,
                                  force_resample=True, copy_header=True)

    brain = np.asarray(at_2mm(datasets.load_mni152_brain_mask(resolution=1), "nearest").dataobj) > 0
    wm = np.asarray(at_2mm(datasets.load_mni152_wm_template(resolution=1), "continuous").dataobj)
    save_nifti(out / "mni_brain.nii.gz", np.asarray(at_2mm(t1, "continuous").dataobj) * brain, grid,
               dtype=np.float32)
    return {"path": out / "mni_brain.nii.gz", "brain": brain, "wm": wm, "affine": grid}


def _cli(*args) -> tuple[int, str]:
    """`mhd-uad ARGS` in-process: (exit status, stderr) of a command that fails before logging anything."""
    from mhd_uad.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, err.getvalue()


def _run(*args) -> tuple[int, str]:
    """`mhd-uad ARGS` as a user runs it, from the repository root (its conf/): (exit status, stderr)."""
    done = subprocess.run([sys.executable, "-m", "mhd_uad.cli", *args], cwd=REPO, capture_output=True, text=True)
    return done.returncode, done.stderr


def _in_template_grid(volume, record, mni):
    """An ingested (cropped, LPS) volume pasted back into the MNI grid's own voxel order."""
    from mhd_uad.ingest.spatial import reorient_array

    full = np.zeros(record["grid"]["template_shape"], dtype=np.float32)
    box = tuple(slice(a, b) for a, b in zip(record["grid"]["crop_lo"], record["grid"]["crop_hi"], strict=True))
    full[box] = volume
    _, lps_affine = reorient_array(np.zeros(mni["brain"].shape), mni["affine"], "LPS")
    back, _ = reorient_array(full, lps_affine, "".join(nib.aff2axcodes(mni["affine"])))
    return back


def dice(a, b) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


# ---------------------------------------------------------------- one ingest run, shared by the tests below


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, mni_template):
    """A good raw head and an unreadable scan through `mhd-uad ingest` (2 processes), then the same run again,
    then the good one with N4 turned off."""
    root = tmp_path_factory.mktemp("ingest")
    raw = root / "raw"
    image, mask, _ = make_raw_head(raw)
    (raw / "broken.nii.gz").write_bytes(b"\x1f\x8b this is no NIfTI")
    (raw / "scans.csv").write_text("set,modality,image,mask\nIXI,t1,head.nii.gz,head_mask.nii.gz\n"
                                   "IXI,t1,broken.nii.gz,head_mask.nii.gz\n")
    out = root / "data"
    args = ["ingest", "--manifest", str(raw / "scans.csv"), "--out", str(out), "--template",
            str(mni_template["path"]), "--quiet", *FAST]
    first = _run(*args, "--workers", "2")
    record = json.loads((out / "Train/ixi/transforms/head.json").read_text())
    stamps = {p: p.stat().st_mtime_ns for p in (out / "Train/ixi").rglob("*") if p.is_file()}
    corrected, _ = load_nifti(out / "Train/ixi/t1/head_t1.nii.gz")
    second = _run(*args, "--workers", "1")
    restamps = {p: p.stat().st_mtime_ns for p in (out / "Train/ixi").rglob("*") if p.is_file()}
    (raw / "good.csv").write_text("set,modality,image,mask\nIXI,t1,head.nii.gz,head_mask.nii.gz\n")
    third = _run(*[a if a != str(raw / "scans.csv") else str(raw / "good.csv") for a in args], "--workers", "1",
                 "ingest.n4.enabled=false")
    uncorrected, _ = load_nifti(out / "Train/ixi/t1/head_t1.nii.gz")
    return {"out": out, "raw_image": image, "raw_mask": mask, "first": first, "second": second, "third": third,
            "record": record, "stamps": (stamps, restamps), "corrected": corrected, "uncorrected": uncorrected}


def test_a_known_affine_is_undone_the_mask_lands_on_the_templates_brain(ingested, mni_template):
    out, record = ingested["out"], ingested["record"]
    image, affine = load_nifti(out / "Train/ixi/t1/head_t1.nii.gz")
    mask, mask_affine = load_nifti(out / "Train/ixi/mask/head_mask.nii.gz")
    assert image.shape == mask.shape and np.allclose(affine, mask_affine)
    assert nib.aff2axcodes(affine) == ("L", "P", "S") and np.allclose(np.abs(np.diag(affine)[:3]), 2.0)
    assert ((mask > 0) & (mask < 1)).any() and mask.min() >= 0 and mask.max() <= 1  # linear: soft edges
    assert image[mask > 0.5].min() >= 0 and image[mask > 0.5].mean() > 10 * np.abs(image[mask == 0]).mean()
    registered = _in_template_grid(mask, record, mni_template) > 0.5
    assert dice(registered, mni_template["brain"]) >= 0.9
    assert record["modalities"]["t1"]["skull_strip"] == "mask"
    assert (out / "NOTICE-template.txt").read_text().count(str(mni_template["path"])) == 1


def test_the_kept_transform_takes_template_space_back_to_the_raw_grid(ingested, tmp_path):
    import SimpleITK as sitk

    from mhd_uad.ingest.run import map_to_raw

    out = ingested["out"]
    back = map_to_raw(out / "Train/ixi/mask/head_mask.nii.gz", out / "Train/ixi/transforms/head.json", "t1",
                      tmp_path / "mask_raw.nii.gz")
    mask_raw, affine = load_nifti(back)
    given, given_affine = load_nifti(ingested["raw_mask"])
    assert mask_raw.shape == given.shape and np.allclose(affine, given_affine)
    assert dice(mask_raw > 0.5, given > 0) >= 0.95
    tfm = sitk.ReadTransform(str(out / "Train/ixi/transforms/head_t1.tfm"))
    assert tfm.GetName() == "AffineTransform"


def test_n4_lowers_the_white_matter_intensity_spread(ingested, mni_template):
    record = ingested["record"]
    wm = (_in_template_grid(np.ones(record["grid"]["shape"]), record, mni_template) > 0) & (mni_template["wm"] > 0.9)
    mask, _ = load_nifti(ingested["out"] / "Train/ixi/mask/head_mask.nii.gz")
    core = ndi.binary_erosion(_in_template_grid(mask, record, mni_template) > 0.99, iterations=2) & wm

    def cv(volume):
        values = _in_template_grid(volume, record, mni_template)[core]
        return float(values.std() / values.mean())

    assert core.sum() > 500
    before, after = cv(ingested["uncorrected"]), cv(ingested["corrected"])
    assert after < 0.85 * before, (before, after)


def test_rerun_skips_done_subjects_and_a_changed_setting_reruns(ingested):
    code2, err2 = ingested["second"]
    assert code2 == 2 and "0 subject(s) ingested, 1 skipped" in err2
    stamps, restamps = ingested["stamps"]
    assert stamps == restamps  # nothing rewritten
    code3, err3 = ingested["third"]
    assert code3 == 0 and "1 subject(s) ingested, 0 skipped" in err3
    assert not np.allclose(ingested["corrected"], ingested["uncorrected"])


def test_a_bad_scan_among_good_ones_is_named_skipped_and_fails_the_run(ingested):
    code, err = ingested["first"]
    assert code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("mhd-uad ingest: error: 1 of 2 subject(s) failed") and "broken.nii.gz" in last
    assert "unreadable or truncated" in last
    assert "1 subject(s) ingested, 0 skipped" in err
    assert not list(ingested["out"].rglob("broken*"))
    assert (ingested["out"] / "Train/ixi/t1/head_t1.nii.gz").is_file()


# ---------------------------------------------------------------- errors that stop a scan before registration


@pytest.fixture(scope="module")
def small_raw(tmp_path_factory):
    folder = tmp_path_factory.mktemp("raw_small")
    image, mask, _ = make_raw_head(folder, "scan", spacing=(4.0, 4.0, 4.0), bias=0.0)
    return image, mask


def _ingest_one(template, image, mask=None, seg=None, **settings):
    from mhd_uad.ingest.manifest import ScanSpec
    from mhd_uad.ingest.scan import ingest_subject
    from mhd_uad.ingest.settings import IngestSettings
    from mhd_uad.ingest.template import load_template

    s = IngestSettings.from_dict({"template": str(template), "spacing_mm": 2.0, **settings})
    return ingest_subject([ScanSpec("IXI", "t1", "x", Path(image), mask and Path(mask), seg and Path(seg))],
                          load_template(s.template, s.orientation), s)


def test_no_mask_and_no_hdbet_is_an_error_naming_the_scan(mni_template, small_raw, monkeypatch):
    import mhd_uad.ingest.skullstrip as skullstrip

    monkeypatch.setattr(skullstrip, "hdbet_status", lambda: (False, "HD-BET is not installed"))
    with pytest.raises(InputFileError, match="no brain mask given and HD-BET is not installed") as err:
        _ingest_one(mni_template["path"], small_raw[0])
    assert str(small_raw[0]) in str(err.value)
    with pytest.raises(InputFileError, match="ingest.skull_strip is `mask`"):
        _ingest_one(mni_template["path"], small_raw[0], skull_strip="mask")


@pytest.mark.parametrize("case, message", [
    ("unreadable", "unreadable or truncated NIfTI image"),
    ("missing", "image file not found"),
    ("nan", "NaN/inf voxels"),
    ("mask_shape", "does not match the image shape"),
    ("mask_affine", "brain mask affine does not match"),
    ("empty_mask", "brain mask is empty"),
    ("seg_shape", "segmentation shape"),
    ("constant", "image is constant"),
])
def test_bad_inputs_are_errors_that_name_the_file(mni_template, small_raw, tmp_path, case, message):
    image, mask = small_raw
    data, affine = load_nifti(image)
    mdata, _ = load_nifti(mask)
    seg = None
    bad = tmp_path / "bad.nii.gz"
    if case == "unreadable":
        bad.write_bytes(b"not a nifti at all")
        image = bad
    elif case == "missing":
        image = tmp_path / "nowhere.nii.gz"
    elif case == "nan":
        data[3, 3, 3] = np.nan
        save_nifti(bad, data, affine)
        image = bad
    elif case == "mask_shape":
        save_nifti(bad, mdata[:-2], affine)
        mask = bad
    elif case == "mask_affine":
        shifted = affine.copy()
        shifted[0, 3] += 5
        save_nifti(bad, mdata, shifted)
        mask = bad
    elif case == "empty_mask":
        save_nifti(bad, np.zeros_like(mdata), affine)
        mask = bad
    elif case == "seg_shape":
        save_nifti(bad, mdata[:, :-1], affine)
        seg = bad
    elif case == "constant":
        save_nifti(bad, np.full_like(data, 7.0), affine)
        image = bad
    with pytest.raises(InputFileError, match=message) as err:
        _ingest_one(mni_template["path"], image, mask, seg)
    assert str(bad if case not in ("missing",) else image) in str(err.value)


def test_manifest_and_folder_conventions(tmp_path):
    from mhd_uad.ingest.manifest import group_subjects, read_manifest, scan_folder, subject_paths

    for name in ("a.nii.gz", "a_mask.nii.gz", "a_seg.nii", "b.nii", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    specs = scan_folder(tmp_path, "Brats21", "t2")
    assert [(s.name, s.mask and s.mask.name, s.seg and s.seg.name) for s in specs] == [
        ("a", "a_mask.nii.gz", "a_seg.nii"), ("b", None, None)]
    paths = subject_paths(tmp_path / "data", [specs[0]])
    assert paths.image("t2") == tmp_path / "data/Test/Brats21/t2/a_t2.nii.gz"
    assert paths.mask == tmp_path / "data/Test/Brats21/mask/a_mask.nii.gz"
    assert paths.record == tmp_path / "data/Test/Brats21/transforms/a.json"
    (tmp_path / "m.csv").write_text("set,modality,image,mask,name\nIXI,t1,a.nii.gz,a_mask.nii.gz,s1\n"
                                    "IXI,t2,b.nii,,s1\nixi,t1,b.nii,,s2\n")
    groups = group_subjects(read_manifest(tmp_path / "m.csv"))
    assert [[(s.name, s.modality) for s in g] for g in groups] == [[("s1", "t1"), ("s1", "t2")], [("s2", "t1")]]
    assert subject_paths(tmp_path, groups[0]).image("t2") == tmp_path / "Train/ixi/t2/s1_t2.nii.gz"


@pytest.mark.parametrize("rows, message", [
    ("set,modality,image,name\nIXI,t1,a.nii.gz,../../etc\n", "leave the output folder"),
    ("set,modality,image\n../x,t1,a.nii.gz\n", "leave the output folder"),
    ("set,modality,image\nIXI,flair,a.nii.gz\n", "modality must be one of t1, t2"),
    ("set,image\nIXI,a.nii.gz\n", "lacks the column"),
    ("set,modality,image\nIXI,t1,a.nii.gz\nIXI,t1,a.nii.gz\n", "listed twice"),
])
def test_bad_manifests_are_errors_naming_the_manifest(tmp_path, rows, message):
    from mhd_uad.ingest.manifest import read_manifest

    (tmp_path / "m.csv").write_text(rows)
    with pytest.raises(InputFileError, match=message) as err:
        read_manifest(tmp_path / "m.csv")
    assert "m.csv" in str(err.value)


def test_settings_default_to_the_originals_and_bad_values_are_config_errors():
    from mhd_uad.config import compose
    from mhd_uad.ingest.settings import IngestSettings

    s = IngestSettings.from_params(compose([], REPO))
    assert (s.template, s.orientation, s.spacing_mm) == ("sri24", "LPS", 1.0)
    assert s.n4.iterations == (200, 200, 200, 200) and s.n4.tolerance == 5e-4 and s.n4.mask_sigma_mm == 1.0
    assert s.registration.sampling_fraction == 0.2 and s.registration.histogram_bins == 32
    for bad, key in [({"spacing_mm": 0}, "ingest.spacing_mm"), ({"skull_strip": "bet"}, "ingest.skull_strip"),
                     ({"orientation": "LLS"}, "ingest.orientation"), ({"n4": {"iterations": []}}, "ingest.n4.iterations"),
                     ({"registration": {"sampling_fraction": 2}}, "sampling_fraction"), ({"nope": 1}, "unknown")]:
        with pytest.raises(ConfigError, match=key):
            IngestSettings.from_dict(bad)
    code, err = _cli("ingest", "--input", ".", "--set", "IXI", "--modality", "t1", "ingest.spacing_mm=-1")
    assert code == 2 and "ingest.spacing_mm" in err and "Traceback" not in err


def test_the_bundled_template_is_the_sri24_t1_brain_with_its_notice():
    from mhd_uad.ingest.template import load_template

    template = load_template("sri24", "LPS")
    assert template.shape == (240, 240, 155) and nib.aff2axcodes(template.affine) == ("L", "P", "S")
    assert np.allclose(np.abs(template.affine[:3, :3]), np.eye(3))
    assert 0.1 < (template.array > 0).mean() < 0.25  # a skull-stripped brain
    notice = template.notice()
    assert "CC BY-SA 3.0" in notice and "Rohlfing" in notice
    with pytest.raises(InputFileError, match="template file not found"):
        load_template("/nonexistent/template.nii.gz", "LPS")


def test_hdbet_is_used_when_installed_with_weights(tmp_path, monkeypatch):
    """The HD-BET backend's plumbing, with a stand-in package (the real one needs its downloaded weights)."""
    import types

    from mhd_uad.ingest import skullstrip
    from mhd_uad.ingest.spatial import to_sitk

    weights = tmp_path / "params" / "fold_all" / "checkpoint_final.pth"
    package = types.ModuleType("HD_BET")
    package.__path__ = []
    paths = types.ModuleType("HD_BET.paths")
    paths.folder_with_parameter_files = str(tmp_path / "params")
    prediction = types.ModuleType("HD_BET.hd_bet_prediction")
    prediction.get_hdbet_predictor = lambda **kw: "predictor"

    def predict(src, out, predictor, keep_brain_mask, compute_brain_extracted_image):
        img = nib.load(src)
        nib.save(nib.Nifti1Image((np.asarray(img.dataobj) > 50).astype(np.uint8), img.affine),
                 out[: -len(".nii.gz")] + "_bet.nii.gz")

    prediction.hdbet_predict = predict
    monkeypatch.setitem(sys.modules, "HD_BET", package)
    monkeypatch.setitem(sys.modules, "HD_BET.paths", paths)
    monkeypatch.setitem(sys.modules, "HD_BET.hd_bet_prediction", prediction)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: object() if name == "HD_BET" else None)
    skullstrip._hdbet_predictor.cache_clear()
    usable, why = skullstrip.hdbet_status()
    assert not usable and "weights are not at" in why
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"")
    assert skullstrip.hdbet_status() == (True, "")
    assert skullstrip.choose_backend("auto", False, tmp_path / "x.nii.gz") == "hdbet"
    assert skullstrip.choose_backend("auto", True, tmp_path / "x.nii.gz") == "mask"
    image = np.zeros((10, 12, 8), dtype=np.float32)
    image[3:7, 4:9, 2:6] = 100
    mask, affine = skullstrip.from_sitk(skullstrip.hdbet_mask(to_sitk(image, np.diag([1.0, 1.0, 1.0, 1.0])), tmp_path))
    assert np.array_equal(mask > 0, image > 50) and np.allclose(affine, np.eye(4))
    skullstrip._hdbet_predictor.cache_clear()


# ---------------------------------------------------------------- score --raw


def _score_raw(root, *args):
    return subprocess.run([sys.executable, "-m", "mhd_uad.cli", "score", "--raw", *args, *SHRUNK, *FAST,
                           "ingest.n4.iterations=[50,50,50]"], cwd=root, capture_output=True, text=True)


@pytest.mark.slow
def test_score_raw_writes_the_map_in_the_raw_grid_and_finds_a_lesion(tiny_model, mni_template, tmp_path):
    root = tmp_path / "project"
    (root / "models").mkdir(parents=True)
    (root / "conf").symlink_to(REPO / "conf")
    shutil.copytree(tiny_model.root / "models" / "t1", root / "models" / "t1")
    lesion = (np.array([-145.0, 95.0, 90.0]), 9.0, 1.8)  # in the white matter of the SRI24 head, world mm
    scans = {}
    for name, spec in (("lesion", lesion), ("healthy", None)):
        image, mask, lesion_mask = make_raw_head(tmp_path / "raw", name, lesion=spec)
        out = tmp_path / f"{name}_map.nii.gz"
        done = _score_raw(root, str(image), "--mask", str(mask), "--modality", "t1", "--out", str(out),
                          "--template", str(mni_template["path"]), "--threshold", "0.5", "--out-mask",
                          str(tmp_path / f"{name}_lesion.nii.gz"))
        assert done.returncode == 0, done.stderr
        scans[name] = (image, mask, lesion_mask, out)
    image, mask, lesion_mask, out = scans["lesion"]
    amap, affine = load_nifti(out)
    raw, raw_affine = load_nifti(image)
    brain = load_nifti(mask)[0] > 0
    assert amap.shape == raw.shape and np.allclose(affine, raw_affine)
    assert amap[~brain].max() == 0 and amap.max() > 0
    healthy_map = load_nifti(scans["healthy"][3])[0]
    assert lesion_mask.sum() > 20
    assert amap[lesion_mask].mean() > healthy_map[lesion_mask].mean()  # measured 0.50 against 0.41
    assert amap[lesion_mask].mean() > amap[brain & ~lesion_mask].mean()  # and against 0.25 elsewhere

    from mhd_uad.ingest.skullstrip import hdbet_status

    if hdbet_status()[0]:
        return  # HD-BET with its weights is installed here: a scan without a mask is stripped by it
    no_mask = _score_raw(root, str(image), "--modality", "t1", "--out", str(tmp_path / "x.nii.gz"))
    assert no_mask.returncode == 2 and "no brain mask given" in no_mask.stderr and str(image) in no_mask.stderr
    assert "Traceback" not in no_mask.stderr and not (tmp_path / "x.nii.gz").exists()
