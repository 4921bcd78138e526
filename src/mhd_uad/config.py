"""Params: read params.yaml as DVC composed it, or compose conf/ with Hydra-style overrides.

With no overrides a command reads `params.yaml` (that is how DVC stages run). With overrides
(`mhd-uad train profile=paper trainer.max_epochs=1`) it composes conf/ through Hydra's compose API, which
gives exactly what `dvc exp run -S ...` would have written. Either way the keys are checked against conf/.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from mhd_uad.errors import ConfigError

CONF_DIR = "conf"
CONFIG_NAME = "config"
PARAMS_FILE = "params.yaml"


def compose(overrides: Sequence[str] = (), root: str | Path = ".") -> DictConfig:
    """Compose conf/ with Hydra overrides, resolved, as DVC's Hydra integration does."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    conf_dir = (Path(root) / CONF_DIR).resolve()
    if not (conf_dir / f"{CONFIG_NAME}.yaml").is_file():
        raise ConfigError("Hydra config tree not found (expected conf/config.yaml)", conf_dir)
    try:
        with initialize_config_dir(str(conf_dir), version_base=None):
            cfg = hydra_compose(config_name=CONFIG_NAME, overrides=list(overrides))
        OmegaConf.resolve(cfg)
        require(cfg.get("recipe") != "gpu" or cfg.get("profile_name") == "demo",
                f"recipe=gpu is the demo profile's (conf/recipe/gpu.yaml), not {cfg.get('profile_name')!r}'s",
                conf_dir)
    except (HydraException, OmegaConfBaseException) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"cannot compose params with overrides {list(overrides)}: {msg}", conf_dir) from None
    return cfg


def composed_yaml(overrides: Sequence[str] = (), root: str | Path = ".") -> str:
    """The exact text DVC writes to params.yaml for these overrides."""
    return OmegaConf.to_yaml(compose(overrides, root))


def _flat_keys(tree: Any, prefix: str = "") -> set[str]:
    if isinstance(tree, Mapping):
        keys: set[str] = set()
        for key, value in tree.items():
            name = f"{prefix}{key}"
            keys.add(name)
            keys |= _flat_keys(value, f"{name}.")
        return keys
    return set()


def _top_level(keys: set[str]) -> set[str]:
    """Drop keys whose parent is in the set too, so a whole unknown block is named once."""
    return {k for k in keys if "." not in k or k.rsplit(".", 1)[0] not in keys}


def validate_keys(params: Mapping, reference: Mapping, source: str | Path) -> None:
    """Unknown or missing keys relative to conf/ are errors that name the file and the dotted keys."""
    given, known = _flat_keys(params), _flat_keys(reference)
    unknown = sorted(_top_level(given - known))
    missing = sorted(_top_level(known - given))
    if unknown:
        raise ConfigError(f"unknown params keys: {', '.join(unknown)} (not defined in conf/)", source)
    if missing:
        raise ConfigError(f"missing params keys: {', '.join(missing)} (defined in conf/)", source)


def load_params(overrides: Sequence[str] = (), root: str | Path = ".") -> DictConfig:
    """Params for a command: params.yaml when no overrides are given, else conf/ composed with them."""
    root = Path(root)
    if overrides:
        return compose(overrides, root)
    path = root / PARAMS_FILE
    if not path.is_file():
        raise ConfigError("params file not found (run from the repository root, or `make params`)", path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {exc}", path) from None
    if not isinstance(raw, dict):
        raise ConfigError("must hold a mapping of params", path)
    profile = raw.get("profile_name")
    if not isinstance(profile, str):
        raise ConfigError("missing the string key `profile_name`", path)
    reference = OmegaConf.to_container(compose([f"profile={profile}"], root))
    validate_keys(raw, reference, path)
    return OmegaConf.create(raw)


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists become strings (MLflow params and diffs compare scalars)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value) if isinstance(value, list | tuple) else value
    return out


def to_plain(cfg: DictConfig | Mapping) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def require(condition: bool, message: str, source: str | Path = PARAMS_FILE) -> None:
    if not condition:
        raise ConfigError(message, source)


def auto_switch(value, key: str) -> bool | None:
    """A switch of the params that may be left to the device: true, false, or auto (None)."""
    if value == "auto":
        return None
    require(isinstance(value, bool), f"{key} must be true, false or auto, got {value!r}")
    return value


def auto_count(value, key: str, minimum: int) -> int | None:
    """A count of the params that may be left to the machine: a whole number >= minimum, or auto (None)."""
    if value == "auto":
        return None
    require(isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
            f"{key} must be auto or a whole number >= {minimum}, got {value!r}")
    return value


def as_int_list(values: Iterable, name: str, length: int | None = None) -> list[int]:
    try:
        out = [int(v) for v in values]
    except (TypeError, ValueError):
        raise ConfigError(f"`{name}` must be a list of integers, got {values!r}", PARAMS_FILE) from None
    require(length is None or len(out) == length, f"`{name}` must have {length} entries, got {out}")
    return out
