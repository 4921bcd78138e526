"""Shared fixtures: composed params, the shrunk params of every fit, a tiny dataset in the real layout
(ellipsoid brains, spherical lesions), and one tiny trained model shared by the training, evaluation and
score tests.

The tiny layout is independent of the demo generator so loader and preprocessing tests stay fast and
exercise the same code paths as real data. The tiny model is trained once per test session, also
under pytest-xdist: the first worker that needs it trains it into the session's shared temporary folder
under a file lock, the others wait and read it (`make test` runs `-n 2 --dist loadfile`).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from mhd_uad.io import save_nifti

REPO = Path(__file__).resolve().parents[1]
FIXTURE_SPLITS = Path(os.environ.get("MHD_UAD_FIXTURE_SPLITS", REPO.parent / "shared" / "fixtures" / "original-splits"))
TEST_SETS = {"Brats21": "t2", "MSLUB": "t2", "ATLAS_v2": "t1", "WMH": "t1"}

def load_benchmark(name: str):
    """benchmarks/<name>.py as a module, loaded once per test process: benchmarks/ goes on sys.path (the
    scripts import one another) and the module into sys.modules (their dataclasses look it up there)."""
    folder, path = REPO / "benchmarks", REPO / "benchmarks" / f"{name}.py"
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    loaded = sys.modules.get(name)
    if loaded is not None and Path(getattr(loaded, "__file__", "") or "").resolve() == path:
        return loaded
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` are skipped where no CUDA device is visible (the GPU check selects them by the
    marker, so a CUDA test is never left out of it)."""
    marked = [item for item in items if item.get_closest_marker("cuda")]
    if marked:
        import torch

        if not torch.cuda.is_available():
            for item in marked:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


# Every fit in the tests runs with these: a few steps, small batches, a validation every epoch, N = 3.
SHRUNK = ["pretrain.max_steps=3", "train.max_steps=4", "train.warmup_steps=1", "data.slices_per_volume=2",
          "pretrain.batch_size=4", "train.batch_size=4", "trainer.log_every_n_steps=1",
          "train.val_every_n_epochs=1", "mhd.num_reconstructions=3"]


def _ellipsoid(shape, centre, radii):
    grid = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii, strict=True)) <= 1.0


def write_scan(root: Path, rel_dir: str, name: str, modality: str, rng, shape, voxel, lesion: bool,
               origin=(0.0, 0.0, 0.0)) -> None:
    centre = np.array(shape) / 2 + rng.uniform(-1, 1, 3)
    brain = _ellipsoid(shape, centre, np.array(shape) * 0.42)
    image = (0.6 + 0.1 * rng.standard_normal(shape)).astype(np.float32) * brain
    seg = np.zeros(shape, dtype=np.uint8)
    if lesion:
        seg = (_ellipsoid(shape, centre + rng.uniform(-2, 2, 3), (3.0, 3.0, 3.0)) & brain).astype(np.uint8)
        image[seg > 0] += 0.5
    affine = np.diag([voxel, voxel, voxel, 1.0])
    affine[:3, 3] = origin
    base = root / rel_dir
    save_nifti(base / modality / f"{name}_{modality}.nii.gz", image, affine, dtype=np.float32)
    save_nifti(base / "mask" / f"{name}_mask.nii.gz", brain.astype(np.uint8), affine, dtype=np.uint8)
    if lesion:
        save_nifti(base / "seg" / f"{name}_seg.nii.gz", seg, affine, dtype=np.uint8)


def make_tiny_layout(root: Path, n_healthy: int = 8, n_test: int = 3, shape=(40, 44, 36), voxel: float = 4.0,
                     seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(n_healthy):
        for modality in ("t1", "t2"):  # the same subject in both contrasts
            write_scan(root, "Train/ixi", f"IXI{i:03d}-Tiny-{i:04d}", modality, np.random.default_rng([seed, i]),
                       shape, voxel, lesion=False)
    for dataset, modality in TEST_SETS.items():
        for i in range(n_test):
            write_scan(root, f"Test/{dataset}", f"{dataset}_case{i:02d}", modality, rng, shape, voxel, lesion=True)
    return root


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return make_tiny_layout(tmp_path_factory.mktemp("tiny") / "data")


@pytest.fixture(scope="session")
def demo_params():
    from mhd_uad.config import compose

    return compose([], REPO)


@pytest.fixture(scope="session")
def fixture_splits() -> Path:
    if not FIXTURE_SPLITS.is_dir():
        pytest.skip(f"the authors' split CSVs are not at {FIXTURE_SPLITS} (set MHD_UAD_FIXTURE_SPLITS)")
    return FIXTURE_SPLITS


def run_data_stages(data_root: Path, out: Path, params, only=None) -> Path:
    """The splits and prepare stages into out/splits and out/prepared (the pure functions, no CLI)."""
    from mhd_uad.data.prepared import build_prepare_stage
    from mhd_uad.data.preprocess import PrepareSettings
    from mhd_uad.data.splits import SplitSettings, build_splits_stage

    settings = SplitSettings.from_params(params)
    build_splits_stage(data_root, out / "splits", settings)
    build_prepare_stage(out / "splits", data_root, out / "prepared", settings, PrepareSettings.from_params(params),
                        only=only)
    return out


def make_workdir(root: Path, data: Path) -> Path:
    """A scratch project folder: conf/ linked from the repository, a copy of `data` as data/."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "conf").symlink_to(REPO / "conf")
    shutil.copytree(data, root / "data")
    return root


def shrunk_params(*extra: str, root: Path = REPO):
    """conf/ composed with SHRUNK and any further overrides."""
    from mhd_uad.config import compose

    return compose([*SHRUNK, *extra], root)


@dataclass(frozen=True)
class TinyModel:
    root: Path  # a project folder: conf/, data/, artifacts/{splits,prepared}, models/, mlflow.db
    params: object


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, worker_id) -> TinyModel:
    """SparK-pretrained encoders and fold-0 cDDPMs for T1 and T2 (SHRUNK), trained once per session.

    Tests read it and never change it: a test that needs to alter models or data works on `copy_project`."""
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp() if worker_id == "master" else tmp_path_factory.getbasetemp().parent
    root, done = shared / "tiny_model", shared / "tiny_model.done"
    with FileLock(str(shared / "tiny_model.lock")):
        if not done.exists():
            _train_tiny_model(root)
            done.touch()
    return TinyModel(root, shrunk_params())


def _train_tiny_model(root: Path) -> None:
    from mhd_uad.training import run_pretrain, run_train

    shutil.rmtree(root, ignore_errors=True)
    make_workdir(root, make_tiny_layout(root.parent / "tiny_model_data"))
    params = shrunk_params()
    mp = pytest.MonkeyPatch()
    mp.chdir(root)
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    try:
        run_data_stages(root / "data", root / "artifacts", params, only=["IXI_t1", "IXI_t2", "MSLUB_t2"])
        for modality in ("t1", "t2"):
            run_pretrain(params, modality)
            run_train(params, modality, 0)
    finally:
        mp.undo()


def copy_project(source: Path, dest: Path) -> Path:
    """A private copy of a project folder (conf/ stays a link; the MLflow store is not copied)."""
    shutil.copytree(source, dest, symlinks=True, ignore=shutil.ignore_patterns("mlflow.db"))
    return dest
