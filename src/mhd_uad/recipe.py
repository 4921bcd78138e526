"""Which recipe `make demo` runs: the demo profile as it is (base) or its GPU recipe (conf/recipe/gpu.yaml).

A recipe changes how long and on what the demo trains, never its data or networks, so checkpoints of either
recipe load under the other's params. `make demo` asks `mhd-uad demo-recipe` (auto: gpu when torch sees a CUDA
device) and, when params.yaml is the composed demo of the other recipe, recomposes it for this one; a params.yaml
with changes of its own (`make params seed=5`, an applied experiment) is left alone with a note, so `make demo`
never throws away a user's settings. The report stage then writes the README's block of the recipe that ran.
"""

from __future__ import annotations

import logging
from pathlib import Path

import yaml

from mhd_uad.config import PARAMS_FILE, composed_yaml
from mhd_uad.errors import ConfigError
from mhd_uad.io import atomic_write_text

log = logging.getLogger(__name__)

RECIPES = ("base", "gpu")
DEMO = "demo"


def choose(requested: str, cuda_available: bool | None = None) -> str:
    """The recipe for `requested` (auto, base or gpu); auto: gpu when a CUDA device is visible."""
    if requested == "auto":
        if cuda_available is None:
            import torch

            cuda_available = torch.cuda.is_available()
        return "gpu" if cuda_available else "base"
    if requested not in RECIPES:
        raise ConfigError(f"recipe must be auto, {' or '.join(RECIPES)}, got {requested!r}")
    return requested


def overrides(recipe: str) -> list[str]:
    """The composition overrides of a recipe (base: none, so its params.yaml is the committed one)."""
    return [] if recipe == "base" else [f"recipe={recipe}"]


def switch(recipe: str, root: str | Path = ".") -> str:
    """Recompose params.yaml for `recipe` when it is the untouched demo of another recipe; the recipe in force."""
    path = Path(root) / PARAMS_FILE
    if not path.is_file():
        raise ConfigError("params file not found (run from the repository root, or `make params`)", path)
    text = path.read_text(encoding="utf-8")
    raw = yaml.safe_load(text)
    current = raw.get("recipe", "base") if isinstance(raw, dict) else None
    if not isinstance(raw, dict) or raw.get("profile_name") != DEMO or current not in RECIPES:
        log.info("%s is not the demo profile's: keeping it as it is", path)
        return str(current)
    if current == recipe:
        return recipe
    if text != composed_yaml(overrides(current), root):
        log.warning("%s has changes of its own: keeping recipe %s (`make params recipe=%s` switches)",
                    path, current, recipe)
        return current
    atomic_write_text(path, composed_yaml(overrides(recipe), root))
    log.info("%s recomposed for recipe %s", path, recipe)
    return recipe
