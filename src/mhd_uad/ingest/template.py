"""The registration template: the bundled SRI24 T1 brain (the original's) or any NIfTI the user names.

The template is reoriented (exact axis permutation) to the settings' orientation, the original's "RAI"
(LPS voxel axes), so ingested arrays have the on-disk orientation of the authors' preprocessed data.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from mhd_uad.errors import ConfigError, InputFileError
from mhd_uad.ingest.settings import DEFAULT_TEMPLATE
from mhd_uad.ingest.spatial import reorient_array, to_sitk
from mhd_uad.io import load_nifti

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
SRI24_T1_BRAIN = TEMPLATE_DIR / "sri24_t1_brain.nii.gz"
SRI24_NOTICE = TEMPLATE_DIR / "NOTICE-SRI24.txt"
NOTICE_NAME = "NOTICE-template.txt"  # written at the root of the ingested layout

CUSTOM_NOTICE = """\
The scans in this folder were registered (affine) to the template {path} (sha256 {sha256}) by
`mhd-uad ingest`. Keep that template's own copyright and licence notice with this data.
"""


def template_path(name: str) -> Path:
    """The file of a template setting: `sri24` is the bundled SRI24 T1 brain, anything else a path."""
    if name == DEFAULT_TEMPLATE:
        if not SRI24_T1_BRAIN.is_file():
            raise ConfigError("the bundled SRI24 template is missing from the installed package", SRI24_T1_BRAIN)
        return SRI24_T1_BRAIN
    path = Path(name).expanduser()
    if not path.is_file():
        raise InputFileError("template file not found (ingest.template / --template)", path)
    return path


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Template:
    path: Path
    sha256: str
    array: np.ndarray  # (X, Y, Z) float32, reoriented
    affine: np.ndarray  # RAS, of the reoriented grid
    is_default: bool

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    def image(self):
        """The template as a SimpleITK image (the fixed image of every registration)."""
        return to_sitk(self.array, self.affine, what="template", path=self.path)

    def notice(self) -> str:
        if self.is_default:
            return SRI24_NOTICE.read_text(encoding="utf-8")
        return CUSTOM_NOTICE.format(path=self.path, sha256=self.sha256)


def load_template(name: str, orientation: str) -> Template:
    path = template_path(name)
    return _load(str(path.resolve()), orientation.upper(), name == DEFAULT_TEMPLATE)


@cache
def _load(path: str, orientation: str, is_default: bool) -> Template:
    array, affine = load_nifti(path, what="template")
    if not (array > 0).any():
        raise InputFileError("template has no voxel above 0", path)
    array, affine = reorient_array(array, affine, orientation)
    return Template(Path(path), file_sha256(path), array.astype(np.float32), affine, is_default)
