"""The demo's recipes (src/mhd_uad/recipe.py, conf/recipe/gpu.yaml): the switch `make demo` makes, the gpu recipe's
step count and settings, its refusal outside the demo profile, its README block, and a tiny fit of it on the CPU
whose checkpoint loads under the base recipe's params."""

import shutil
import subprocess
import sys

import pytest

from conftest import REPO, SHRUNK, copy_project, shrunk_params
from mhd_uad import recipe
from mhd_uad.config import compose, composed_yaml, flatten, to_plain
from mhd_uad.errors import ConfigError
from mhd_uad.evaluation.report import (
    README_END,
    README_GPU_END,
    README_GPU_START,
    README_START,
    update_readme,
)
from mhd_uad.models.factory import encoder_spec, model_spec


@pytest.fixture()
def project(tmp_path):
    """conf/ and the committed-style params.yaml (the composed demo) in a scratch folder."""
    shutil.copytree(REPO / "conf", tmp_path / "conf")
    (tmp_path / "params.yaml").write_text(composed_yaml([], tmp_path))
    return tmp_path


def test_auto_picks_the_gpu_recipe_only_beside_a_cuda_device():
    assert recipe.choose("auto", cuda_available=True) == "gpu"
    assert recipe.choose("auto", cuda_available=False) == "base"
    assert recipe.choose("base", cuda_available=True) == "base"
    assert recipe.choose("gpu", cuda_available=False) == "gpu"
    with pytest.raises(ConfigError, match="recipe must be"):
        recipe.choose("fast")


def test_the_gpu_recipe_fits_ten_times_longer_with_the_same_data_and_networks():
    base, gpu = compose([], REPO), compose(["recipe=gpu"], REPO)
    assert (base.recipe, gpu.recipe) == ("base", "gpu")
    assert gpu.train.max_steps >= 10 * base.train.max_steps
    assert gpu.train.warmup_steps == 10 * base.train.warmup_steps  # the schedule stretched alike
    assert (gpu.trainer.accelerator, gpu.trainer.precision) == ("gpu", "16-mixed")
    # checkpoints of either recipe load under the other's params: the networks' spec is the same
    assert model_spec(gpu) == model_spec(base) and encoder_spec(gpu) == encoder_spec(base)
    changed = {k.split(".")[0] for k, v in flatten(to_plain(gpu)).items() if flatten(to_plain(base))[k] != v}
    assert changed == {"recipe", "train", "trainer", "mhd"}
    assert to_plain(gpu.data) == to_plain(base.data) and to_plain(gpu.prepare) == to_plain(base.prepare)
    assert gpu.pretrain.max_steps == base.pretrain.max_steps  # pretraining is not lengthened


def test_the_gpu_recipe_is_the_demo_profiles_only():
    with pytest.raises(ConfigError, match="recipe=gpu is the demo profile's"):
        compose(["profile=paper", "recipe=gpu"], REPO)
    assert compose(["profile=paper"], REPO).recipe == "base"


def test_switch_recomposes_an_untouched_demo_and_back(project):
    committed = (project / "params.yaml").read_text()
    assert recipe.switch("gpu", project) == "gpu"
    switched = (project / "params.yaml").read_text()
    assert switched == composed_yaml(["recipe=gpu"], project) and "recipe: gpu" in switched
    assert recipe.switch("gpu", project) == "gpu"  # nothing to do
    assert recipe.switch("base", project) == "base"
    assert (project / "params.yaml").read_text() == committed


def test_switch_keeps_params_with_changes_of_their_own(project, caplog):
    own = composed_yaml(["seed=5"], project)
    (project / "params.yaml").write_text(own)
    assert recipe.switch("gpu", project) == "base"
    assert (project / "params.yaml").read_text() == own
    assert "changes of its own" in caplog.text
    paper = composed_yaml(["profile=paper"], project)
    (project / "params.yaml").write_text(paper)
    assert recipe.switch("gpu", project) == "base"
    assert (project / "params.yaml").read_text() == paper


def test_the_demo_recipe_command_prints_and_applies(project):
    run = [sys.executable, "-m", "mhd_uad.cli", "demo-recipe"]
    done = subprocess.run([*run, "--recipe", "gpu", "--apply"], cwd=project, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "gpu", done.stderr
    assert "recipe: gpu" in (project / "params.yaml").read_text()
    bad = subprocess.run([*run, "--recipe", "x"], cwd=project, capture_output=True, text=True)
    assert bad.returncode != 0 and "recipe must be" in bad.stderr and "Traceback" not in bad.stderr


def test_the_gpu_recipes_results_go_to_their_own_readme_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"a\n{README_START}\ncpu figures\n{README_END}\nb\n{README_GPU_START}\nnone yet\n{README_GPU_END}\n")
    summary = tmp_path / "summary.md"
    summary.write_text("# Results\n\ngpu figures\n")
    assert update_readme(readme, summary, "gpu")
    text = readme.read_text()
    assert "cpu figures" in text and "gpu figures" in text and "none yet" not in text
    summary.write_text("# Results\n\nnew cpu figures\n")
    update_readme(readme, summary)
    assert "new cpu figures" in readme.read_text() and "gpu figures" in readme.read_text()


@pytest.mark.slow
def test_a_tiny_fit_of_the_gpu_recipe_on_the_cpu_loads_under_the_base_recipe(tiny_model, tmp_path, monkeypatch):
    from mhd_uad.models.checkpoint import cddpm_path, load_cddpm
    from mhd_uad.training import run_train

    root = copy_project(tiny_model.root, tmp_path / "work")
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    shutil.rmtree(root / "models" / "t1" / "fold0")
    # the recipe with the CPU's device settings (as benchmarks/demo_long_fit.py runs it), SHRUNK to a few steps
    params = compose(["recipe=gpu", "trainer.accelerator=cpu", "trainer.precision=bf16-mixed",
                      "trainer.benchmark=false", *SHRUNK], REPO)
    assert params.recipe == "gpu" and params.train.max_steps == 4
    run_train(params, "t1", 0)
    _, meta = load_cddpm(shrunk_params(), cddpm_path(root, "t1", 0), "t1")
    assert meta["global_step"] == 4
