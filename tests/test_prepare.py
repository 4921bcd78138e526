import gzip
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, run_data_stages, write_scan
from mhd_uad.data.prepared import PreparedSet
from mhd_uad.data.preprocess import PrepareSettings, preprocess_scan
from mhd_uad.errors import InputFileError
from mhd_uad.io import load_nifti, save_nifti


@pytest.fixture(scope="module")
def prepared(tiny_data, demo_params, tmp_path_factory):
    return run_data_stages(tiny_data, tmp_path_factory.mktemp("prep"), demo_params) / "prepared"


def test_prepare_writes_every_set_on_the_profile_grid(prepared, demo_params):
    names = sorted(p.name for p in prepared.iterdir())
    assert names == ["ATLAS_v2_t1", "Brats21_t2", "IXI_t1", "IXI_t2", "MSLUB_t2", "WMH_t1"]
    x, y, z = demo_params.prepare.grid
    for name in names:
        ps = PreparedSet.open(prepared / name)
        assert ps.images.shape == ps.masks.shape == ps.segs.shape == (len(ps), z, x, y)
        assert ps.images.dtype == ps.masks.dtype == np.float32 and ps.segs.dtype == np.uint8


def test_intensities_are_clipped_and_scaled_within_the_brain(prepared):
    ps = PreparedSet.open(prepared / "IXI_t1")
    for i in range(len(ps)):
        image, brain = np.asarray(ps.images[i]), np.asarray(ps.masks[i]) > 0
        inside = image[brain]
        # [p1, p99] -> [0, 1]; B-spline resampling may over/undershoot a little near edges (method.md §2.3)
        assert np.percentile(inside, 1) >= -0.05 and np.percentile(inside, 99) <= 1.05
        assert inside.max() > 0.9 and np.abs(image[~brain]).mean() < 0.02


def test_lesions_stay_inside_the_brain_and_healthy_scans_have_none(prepared):
    for name in ("Brats21_t2", "WMH_t1"):
        ps = PreparedSet.open(prepared / name)
        assert (np.asarray(ps.segs) > 0).sum() > 0
        assert not ((np.asarray(ps.segs) > 0) & (np.asarray(ps.masks) == 0)).any()
    assert not np.asarray(PreparedSet.open(prepared / "IXI_t2").segs).any()


def test_source_geometry_and_brain_mask_are_kept_for_writing_maps_back(prepared, tiny_data):
    ps = PreparedSet.open(prepared / "MSLUB_t2")
    for pos, scan in enumerate(ps.index["scans"]):
        data, affine = load_nifti(tiny_data / scan["key"])
        geometry = ps.geometry(pos)
        assert geometry.source_shape == data.shape
        assert geometry.grid_shape == (ps.images.shape[2], ps.images.shape[3], ps.images.shape[1])
        np.testing.assert_allclose(geometry.source_affine, affine)
        np.testing.assert_allclose(np.abs(np.diag(geometry.grid_affine)[:3]), 3.0)
        mask_path = str(tiny_data / scan["key"]).replace("/t2/", "/mask/").replace("_t2.nii.gz", "_mask.nii.gz")
        np.testing.assert_array_equal(ps.source_mask(pos), load_nifti(mask_path)[0] > 0)


def test_different_source_grids_give_the_same_model_grid(tmp_path, demo_params):
    settings = PrepareSettings.from_params(demo_params)
    rng = np.random.default_rng(0)
    out = []
    for shape, voxel in (((60, 70, 50), 2.0), ((120, 130, 100), 1.0)):
        write_scan(tmp_path / f"v{voxel}", "Test/X", "case", "t1", rng, shape, voxel, lesion=True)
        base = tmp_path / f"v{voxel}" / "Test" / "X"
        out.append(preprocess_scan(base / "t1/case_t1.nii.gz", base / "mask/case_mask.nii.gz",
                                   base / "seg/case_seg.nii.gz", settings))
    assert out[0].image.shape == out[1].image.shape == (settings.grid[2], settings.grid[0], settings.grid[1])
    assert out[0].geometry.source_shape != out[1].geometry.source_shape


# ---- bad inputs: one clear error naming the file, nothing half-written ------------------------------------

def _scan(tmp_path):
    rng = np.random.default_rng(1)
    write_scan(tmp_path, "Test/X", "case", "t1", rng, (30, 32, 28), 4.0, lesion=True)
    base = tmp_path / "Test" / "X"
    return base / "t1/case_t1.nii.gz", base / "mask/case_mask.nii.gz", base / "seg/case_seg.nii.gz"


def _expect(tmp_path, demo_params, corrupt, target, match):
    image, mask, seg = _scan(tmp_path)
    paths = {"image": image, "mask": mask, "seg": seg}
    corrupt(paths[target])
    with pytest.raises(InputFileError, match=match) as err:
        preprocess_scan(image, mask, seg, PrepareSettings.from_params(demo_params))
    assert str(paths[target]) in str(err.value)


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path):
    path.write_bytes(b"this is not a nifti file at all" * 20)


def _rewrite(path, fn, affine_fn=lambda a: a):
    data, affine = load_nifti(path)
    save_nifti(path, fn(data), affine_fn(affine))


@pytest.mark.parametrize("target,corrupt,match", [
    ("image", _truncate, "unreadable or truncated"),
    ("mask", _garbage, "unreadable or truncated"),
    ("image", lambda p: p.unlink(), "image file not found"),
    ("seg", lambda p: p.unlink(), "segmentation file not found"),
    ("image", lambda p: _rewrite(p, lambda d: np.where(d > 0.7, np.nan, d)), "NaN/inf"),
    ("image", lambda p: _rewrite(p, lambda d: np.where(d > 0.7, np.inf, d)), "NaN/inf"),
    ("image", lambda p: _rewrite(p, lambda d: np.stack([d, d], -1)), "must be a 3-D volume"),
    ("mask", lambda p: _rewrite(p, lambda d: np.zeros_like(d)), "brain mask is empty"),
    ("mask", lambda p: _rewrite(p, lambda d: d[:-1]), r"brain mask shape \(29, 32, 28\) does not match"),
    ("seg", lambda p: _rewrite(p, lambda d: d[:, :-2]), "segmentation shape"),
    ("seg", lambda p: _rewrite(p, lambda d: d, lambda a: a * np.diag([1, 1, 2, 1])), "segmentation affine"),
])
def test_bad_scans_give_an_error_naming_the_file(tmp_path, demo_params, target, corrupt, match):
    _expect(tmp_path, demo_params, corrupt, target, match)


def test_a_mask_affine_within_tolerance_is_accepted_and_changes_nothing(tmp_path, demo_params):
    settings = PrepareSettings.from_params(demo_params)
    image, mask, seg = _scan(tmp_path)
    reference = preprocess_scan(image, mask, seg, settings)
    _rewrite(mask, lambda d: d, lambda a: a + np.diag([1e-4, 0, 0, 0]))  # below the 1e-3 tolerance
    nudged = preprocess_scan(image, mask, seg, settings)
    np.testing.assert_array_equal(nudged.mask, reference.mask)
    np.testing.assert_array_equal(nudged.image, reference.image)
    _rewrite(mask, lambda d: d, lambda a: a + np.diag([1e-2, 0, 0, 0]))  # beyond it
    with pytest.raises(InputFileError, match="brain mask affine") as err:
        preprocess_scan(image, mask, seg, settings)
    assert str(mask) in str(err.value)


def test_gzip_written_nifti_is_deterministic(tmp_path):
    arr = np.random.default_rng(0).random((5, 6, 7)).astype(np.float32)
    save_nifti(tmp_path / "a.nii.gz", arr, np.eye(4))
    save_nifti(tmp_path / "b.nii.gz", arr, np.eye(4))
    assert (tmp_path / "a.nii.gz").read_bytes() == (tmp_path / "b.nii.gz").read_bytes()
    assert gzip.decompress((tmp_path / "a.nii.gz").read_bytes())[:4] == (348).to_bytes(4, "little")


def _run_cli(args, cwd):
    return subprocess.run([sys.executable, "-m", "mhd_uad.cli", *args], cwd=cwd, capture_output=True, text=True)


@pytest.fixture()
def workdir(tmp_path, tiny_data):
    (tmp_path / "conf").symlink_to(REPO / "conf")
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(tiny_data, tmp_path / "data")
    return tmp_path


def test_cli_stages_run_and_a_bad_scan_fails_cleanly(workdir):
    ok = _run_cli(["splits"], workdir)
    assert ok.returncode == 0, ok.stderr
    assert (workdir / "artifacts" / "splits" / "IXI_test.csv").is_file()
    victim = next((workdir / "data" / "Test" / "ATLAS_v2" / "t1").iterdir())
    _truncate(victim)
    bad = _run_cli(["prepare"], workdir)
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr and str(victim.name) in bad.stderr and "truncated" in bad.stderr
    leftovers = [p for p in (workdir / "artifacts").iterdir() if p.name != "splits"]
    assert leftovers == [], leftovers  # no prepared folder, no temporary folder


def test_cli_rejects_unknown_params_keys_without_traceback(workdir):
    text = (workdir / "params.yaml").read_text().replace("\nseed: 3141\n", "\nseed: 3141\nsede: 1\n", 1)
    (workdir / "params.yaml").write_text(text)
    bad = _run_cli(["splits"], workdir)
    assert bad.returncode == 2 and "unknown params keys: sede" in bad.stderr and "Traceback" not in bad.stderr
    bad = _run_cli(["prepare", "prepare.grid=[1,2]"], workdir)  # each command checks the sections it reads
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_prepared_index_is_json_and_arrays_load_without_pickle(prepared):
    index = json.loads((prepared / "WMH_t1" / "index.json").read_text())
    assert index["format_version"] == 2 and len(index["scans"]) == 3
    np.load(prepared / "WMH_t1" / "images.npy", allow_pickle=False)


# ---- quirks of the published data ---------------------------------------------------------------------

def test_soft_mask_values_are_kept_and_weight_the_maps_by_their_square(tmp_path, demo_params):
    from mhd_uad.scoring.anomaly_maps import anomaly_maps

    image, mask, seg = _scan(tmp_path)
    data, affine = load_nifti(mask)
    border = (data > 0) & ~np.asarray(__import__("scipy").ndimage.binary_erosion(data > 0, iterations=2))
    save_nifti(mask, np.where(border, 0.4, data).astype(np.float32), affine)  # as after linear registration
    scan = preprocess_scan(image, mask, seg, PrepareSettings.from_params(demo_params))
    assert scan.mask.dtype == np.float32 and np.isclose(scan.mask, 0.4).any() and scan.mask.max() == 1.0
    np.testing.assert_allclose(np.unique(scan.mask), [0.0, 0.4, 1.0], rtol=1e-6)  # nearest resampling keeps them
    rng = np.random.default_rng(0)
    recos = np.clip(scan.image[None] + 0.05 * rng.standard_normal((4, *scan.image.shape)), 0, 1).astype(np.float32)
    soft = anomaly_maps(scan.image, recos, scan.mask, scorers=("mhd", "mean"))
    binary = anomaly_maps(scan.image, recos, (scan.mask > 0).astype(np.float32), scorers=("mhd", "mean"))
    np.testing.assert_allclose(soft["mhd"], binary["mhd"] * scan.mask ** 2, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(soft["mean"], binary["mean"] * scan.mask, rtol=1e-5, atol=1e-7)


def test_a_mask_outside_zero_one_is_named(tmp_path, demo_params):
    _expect(tmp_path, demo_params, lambda p: _rewrite(p, lambda d: d * 255), "mask", r"values must lie in \[0, 1\]")


def test_segmentation_labels_keep_every_voxel_above_zero_and_round_the_rest():
    from mhd_uad.data.preprocess import segmentation_labels

    seg = np.array([0.0, -0.2, 0.1, 0.49, 1.0, 1.4, 1.6, 2.0, 300.0])
    np.testing.assert_array_equal(segmentation_labels(seg), [0, 0, 1, 1, 1, 1, 2, 2, 255])
    assert segmentation_labels(seg).dtype == np.uint8


def test_a_lesion_outside_the_model_grid_keeps_the_scan_with_a_warning(tmp_path, demo_params, caplog):
    import logging

    from mhd_uad.data.prepared import write_prepared_set
    from mhd_uad.data.splits import read_split_csv

    rng = np.random.default_rng(2)
    for i in range(2):
        write_scan(tmp_path / "data", "Test/ATLAS_v2", f"case{i}", "t1", rng, (40, 44, 36), 4.0, lesion=True)
    seg_path = tmp_path / "data/Test/ATLAS_v2/seg/case1_seg.nii.gz"
    seg, affine = load_nifti(seg_path)
    brain = load_nifti(tmp_path / "data/Test/ATLAS_v2/mask/case1_mask.nii.gz")[0] > 0
    low = np.zeros_like(seg)
    low[18:22, 20:24, 4:6] = 1  # 48-56 mm below the centre: inside the brain, below the 96 mm z field of view
    assert (low.astype(bool) & brain).sum() > 8  # the moved lesion lies in the brain
    save_nifti(seg_path, (low.astype(bool) & brain).astype(np.uint8), affine)
    rows = "\n".join(f"{i},case{i},1,/Test/ATLAS_v2/t1/case{i}_t1.nii.gz,/Test/ATLAS_v2/mask/case{i}_mask.nii.gz,"
                     f"/Test/ATLAS_v2/seg/case{i}_seg.nii.gz" for i in range(2))
    (tmp_path / "list.csv").write_text(",img_name,label,img_path,mask_path,seg_path\n" + rows + "\n")
    scans = read_split_csv(tmp_path / "list.csv", tmp_path / "data", "t1")
    with caplog.at_level(logging.WARNING):
        write_prepared_set(tmp_path / "prepared", scans, PrepareSettings.from_params(demo_params), desc="x")
    ps = PreparedSet.open(tmp_path / "prepared")
    assert len(ps) == 2 and np.asarray(ps.segs[0]).any() and not np.asarray(ps.segs[1]).any()
    assert "1 lesioned scans have no lesion voxel on the model grid" in caplog.text and "case1" in caplog.text


def test_a_scan_stored_in_another_voxel_order_prepares_to_the_same_volume(tmp_path, demo_params):
    from mhd_uad.data.geometry import to_source_space

    settings = PrepareSettings.from_params(demo_params)
    image, mask, seg = _scan(tmp_path)
    ras = preprocess_scan(image, mask, seg, settings)
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])  # LPS voxel order, as ingest (and the original's RAI) writes
    for path in (image, mask, seg):
        data, affine = load_nifti(path)
        shift = np.eye(4)
        shift[:3, 3] = (np.array(data.shape) - 1) * [1, 1, 0]
        save_nifti(path, data[::-1, ::-1].copy(), affine @ shift @ flip)
    lps = preprocess_scan(image, mask, seg, settings)
    np.testing.assert_array_equal(lps.image, ras.image)
    np.testing.assert_array_equal(lps.mask, ras.mask)
    np.testing.assert_array_equal(lps.seg, ras.seg)
    np.testing.assert_allclose(lps.geometry.grid_affine, ras.geometry.grid_affine)
    assert lps.geometry.source_affine[0, 0] < 0  # the map goes back to the file's own order
    back = to_source_space(lps.image, lps.geometry, lps.source_brain)
    np.testing.assert_allclose(back[::-1, ::-1], to_source_space(ras.image, ras.geometry, ras.source_brain),
                               atol=1e-5)


def _noise_sigma(prepared) -> float:
    """Noise sd of a prepared ramp along the first voxel axis: the sd within each plane across it (where the
    ramp is constant), over the scan's eroded footprint. A Laplacian-kernel estimate would miss smoothed,
    correlated noise."""
    from scipy import ndimage as ndi

    inside = ndi.binary_erosion(prepared.mask > 0.5, iterations=3)  # [S, H, W]: H is the ramp's axis
    planes = [prepared.image[:, h][inside[:, h]] for h in range(inside.shape[1]) if inside[:, h].sum() > 50]
    return float(np.sqrt(np.mean([p.var() for p in planes])))


def test_antialiasing_gives_a_1mm_and_a_2mm_scan_the_same_noise_on_the_model_grid(tmp_path, demo_params):
    # One noisy ramp, acquired at 1 mm and at 2 mm (the 2 mm one averages 8 sub-voxels, as a scanner's coarser
    # voxel does), prepared to the demo's 3 mm grid with and without Gaussian smoothing before downsampling.
    from dataclasses import replace

    rng = np.random.default_rng(0)
    fine_shape = (120, 120, 80)
    ramp = np.linspace(0.3, 1.0, fine_shape[0])[:, None, None] * np.ones(fine_shape)
    fine = ramp + 0.05 * rng.standard_normal(fine_shape)
    coarse = fine.reshape(60, 2, 60, 2, 40, 2).mean(axis=(1, 3, 5))
    paths = {}
    for name, image, voxel in (("fine", fine, 1.0), ("coarse", coarse, 2.0)):
        affine = np.diag([voxel, voxel, voxel, 1.0])
        paths[name] = (tmp_path / f"{name}.nii.gz", tmp_path / f"{name}_mask.nii.gz")
        save_nifti(paths[name][0], image.astype(np.float32), affine)
        save_nifti(paths[name][1], np.ones(image.shape, dtype=np.uint8), affine)
    base = replace(PrepareSettings.from_params(demo_params), curvature_flow_iterations=0)
    assert base.spacing_mm == 3.0 and base.antialias  # the demo profile smooths
    sigma = {}
    for antialias in (False, True):
        settings = replace(base, antialias=antialias)
        for name, (image, mask) in paths.items():
            prepared = preprocess_scan(image, mask, None, settings)
            sigma[antialias, name] = _noise_sigma(prepared)
            assert np.array_equal(np.unique(prepared.mask), [0.0, 1.0])  # label maps are never smoothed
    # Without smoothing the 1 mm scan keeps its full voxel noise, about sqrt(8) times the 2 mm scan's; with
    # torchio's kernels (Cardoso et al. 2015) the two land within a factor of two of each other (the 1 mm one
    # the smoother: its FWHM-matched kernel averages more than a 3 mm voxel would).
    assert sigma[False, "fine"] > 2.5 * sigma[False, "coarse"]
    assert 0.5 < sigma[True, "fine"] / sigma[True, "coarse"] < 2.0
    assert sigma[True, "fine"] < 0.25 * sigma[False, "fine"]


def test_field_of_view_is_the_centred_crop_the_model_scores(tmp_path, demo_params):
    from mhd_uad.evaluation.score import field_of_view

    # A brain 130 mm tall at 1 mm: the demo's 192 x 192 x 96 mm view keeps its central 96 mm.
    shape = (100, 110, 130)
    image = np.random.default_rng(0).random(shape).astype(np.float32) + 0.5
    for name, data in (("scan", image), ("mask", np.ones(shape, dtype=np.uint8))):
        save_nifti(tmp_path / f"{name}.nii.gz", data, np.eye(4))
    prepared = preprocess_scan(tmp_path / "scan.nii.gz", tmp_path / "mask.nii.gz", None,
                               PrepareSettings.from_params(demo_params))
    fov = field_of_view(prepared)
    assert fov.shape == shape
    planes = np.flatnonzero(fov.any(axis=(0, 1)))
    assert len(planes) == 96 and planes[0] == 17 and planes[-1] == 112  # (130 - 96) / 2 = 17 planes off each end
    assert fov[:, :, planes].all()  # the whole 100 x 110 mm plane fits in 192 x 192 mm
