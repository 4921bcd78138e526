from pathlib import Path

import pytest
import yaml

from mhd_uad.config import compose, composed_yaml, load_params, validate_keys
from mhd_uad.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_params_yaml_is_exactly_the_composition_of_conf():
    # Only `dvc exp run` recomposes params.yaml; `dvc repro` would silently use a stale one.
    assert (REPO / "params.yaml").read_text(encoding="utf-8") == composed_yaml([], REPO), (
        "params.yaml differs from conf/ composed: run `make params`")


def test_profiles_compose_with_the_papers_numbers():
    paper = compose(["profile=paper"], REPO)
    demo = compose([], REPO)
    assert paper.profile_name == "paper" and demo.profile_name == "demo"
    assert list(paper.prepare.grid) == [96, 96, 50] and paper.prepare.spacing_mm == 2.0
    assert paper.splits.num_folds == 5 and paper.data.slices_per_volume == 1
    assert list(demo.prepare.grid) != [96, 96, 50]
    assert {k: v.modality for k, v in paper.datasets.items()} == {
        "Brats21": "t2", "MSLUB": "t2", "ATLAS_v2": "t1", "WMH": "t1"}


def test_overrides_may_follow_options_deletions_included(monkeypatch):
    from mhd_uad import cli

    seen = {}
    monkeypatch.setattr(cli, "cmd_score", lambda args: seen.update(overrides=args.overrides))
    argv = ["score", "scan.nii.gz", "--mask", "mask.nii.gz", "--out", "map.nii.gz", "profile=paper",
            "~datasets.WMH", "+extra=1"]
    assert cli.main(argv) == 0
    assert seen["overrides"] == ["profile=paper", "~datasets.WMH", "+extra=1"]
    with pytest.raises(SystemExit):
        cli.main([*argv, "stray"])


def test_unknown_override_and_profile_are_config_errors():
    with pytest.raises(ConfigError, match="prepare.gird"):
        compose(["prepare.gird=3"], REPO)
    with pytest.raises(ConfigError):
        compose(["profile=nonexistent"], REPO)


def test_params_file_with_unknown_key_is_rejected(tmp_path):
    (tmp_path / "conf").symlink_to(REPO / "conf")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["prepare"]["grdi"] = [1, 2, 3]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match=r"params.yaml: unknown params keys: prepare.grdi"):
        load_params([], tmp_path)
    del params["prepare"]["grdi"]
    del params["splits"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match="missing params keys: splits"):
        load_params([], tmp_path)


def test_validate_keys_names_whole_unknown_blocks_once():
    with pytest.raises(ConfigError, match=r"unknown params keys: extra \(") as err:
        validate_keys({"a": 1, "extra": {"b": {"c": 1}}}, {"a": 1}, "params.yaml")
    assert "extra.b" not in str(err.value)
