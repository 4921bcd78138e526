"""The evaluation gallery: input, mean reconstruction, MHD map and ground-truth outline of the best, median
and worst test scans (by the first fold's mhd AUPRC), as one PNG per dataset (reports/gallery/<set>.png)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mhd_uad.io import atomic_path


@dataclass
class GalleryRow:
    label: str  # best, median or worst
    name: str
    auprc: float
    image: np.ndarray  # [S, H, W]
    reconstruction: np.ndarray  # mean of the N reconstructions, [S, H, W]
    mhd_map: np.ndarray
    seg: np.ndarray


def pick_gallery_scans(auprc: list[float]) -> list[tuple[str, int]]:
    """(label, test index) of the best, median and worst scan by AUPRC; scans without a lesion are skipped."""
    ap = np.asarray(auprc, dtype=np.float64)
    order = [int(i) for i in np.argsort(-np.nan_to_num(ap, nan=-1.0)) if np.isfinite(ap[i])]
    if not order:
        return []
    return [("best", order[0]), ("median", order[len(order) // 2]), ("worst", order[-1])]


def _lesion_slice(seg: np.ndarray) -> int:
    areas = seg.reshape(seg.shape[0], -1).sum(axis=1)
    return int(np.argmax(areas))


def write_gallery(path: Path, dataset: str, rows: list[GalleryRow]) -> None:
    """One row of three panels per scan, on the axial slice with the most lesion."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 3, figsize=(7.5, 2.6 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        s = _lesion_slice(row.seg)
        panels = ((row.image[s], "input", "gray"), (row.reconstruction[s], "mean reconstruction", "gray"),
                  (row.mhd_map[s], "MHD map", "hot"))
        for c, (arr, title, cmap) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(np.rot90(arr), cmap=cmap, vmin=0, vmax=max(1e-6, float(arr.max())) if c == 2 else 1)
            ax.contour(np.rot90(row.seg[s]), levels=[0.5], colors="cyan", linewidths=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(title, fontsize=8)
        axes[r, 0].set_ylabel(f"{row.label}\n{row.name}\nAP {100 * row.auprc:.1f}%", fontsize=8)
    fig.suptitle(f"{dataset}: ground truth outlined in cyan", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png", metadata={"Software": None})
    plt.close(fig)
