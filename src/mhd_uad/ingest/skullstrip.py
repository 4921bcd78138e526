"""Skull stripping: the brain mask given with the scan, or HD-BET (the original's tool, method.md §2.2 step 2).

HD-BET is used only when it is installed *with* its weights (`hd-bet` >= 2 keeps them under
~/hd-bet_params); nothing is downloaded at run time. With neither a mask nor HD-BET, the scan fails with an
error naming it and both ways out.
"""

from __future__ import annotations

import tempfile
from functools import cache
from pathlib import Path

import numpy as np

from mhd_uad.errors import InputFileError
from mhd_uad.ingest.spatial import from_sitk, to_sitk
from mhd_uad.io import save_nifti


def hdbet_status() -> tuple[bool, str]:
    """(usable, why not): HD-BET >= 2 importable and its weights present."""
    import importlib.util

    if importlib.util.find_spec("HD_BET") is None:
        return False, "HD-BET is not installed"
    try:
        from HD_BET.paths import folder_with_parameter_files
    except ImportError as exc:
        return False, f"HD-BET is installed but not version 2 ({exc})"
    weights = Path(folder_with_parameter_files) / "fold_all" / "checkpoint_final.pth"
    if not weights.is_file():
        return False, f"HD-BET is installed but its weights are not at {weights} (they are never downloaded here)"
    return True, ""


def no_mask_error(image: Path, why: str) -> InputFileError:
    return InputFileError(f"no brain mask given and {why}: give the scan's brain mask (manifest column `mask`, "
                          "`NAME_mask.nii.gz` beside it, or `--mask`) or install HD-BET with its weights", image)


def choose_backend(mode: str, has_mask: bool, image: Path) -> str:
    """'mask' or 'hdbet' for one scan under ingest.skull_strip = auto | mask | hdbet."""
    if mode == "mask" or (mode == "auto" and has_mask):
        if not has_mask:
            raise no_mask_error(image, "ingest.skull_strip is `mask`")
        return "mask"
    usable, why = hdbet_status()
    if not usable:
        raise no_mask_error(image, why)
    return "hdbet"


@cache
def _hdbet_predictor():
    import torch
    from HD_BET.hd_bet_prediction import get_hdbet_predictor

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return get_hdbet_predictor(use_tta=False, device=device, verbose=False)


def hdbet_mask(image_1mm, source: Path):
    """HD-BET's brain mask of a resampled scan, on that scan's grid (a SimpleITK image, 0/1)."""
    from HD_BET.hd_bet_prediction import hdbet_predict

    array, affine = from_sitk(image_1mm)
    with tempfile.TemporaryDirectory(prefix="mhd-uad-hdbet-") as tmp:
        src, out = Path(tmp) / "scan.nii.gz", Path(tmp) / "out" / "scan.nii.gz"
        out.parent.mkdir()
        save_nifti(src, array, affine, dtype=np.float32)
        try:
            hdbet_predict(str(src), str(out), _hdbet_predictor(), keep_brain_mask=True,
                          compute_brain_extracted_image=False)
        except Exception as exc:  # HD-BET's own failures name no file
            raise InputFileError(f"HD-BET failed on this scan ({type(exc).__name__}: {exc})", source) from None
        import nibabel as nib

        bet = out.parent / "scan_bet.nii.gz"
        if not bet.is_file():
            raise InputFileError("HD-BET wrote no brain mask for this scan", source)
        mask = np.asarray(nib.load(str(bet)).dataobj) > 0
    if mask.shape != array.shape:
        raise InputFileError(f"HD-BET's mask has shape {mask.shape}, not the scan's {array.shape}", source)
    return to_sitk(mask.astype(np.float32), affine)
