"""Tissue and sequence models (demo-data.md §4.1.2-3, §4.2).

Relaxation times and proton densities of the healthy tissues, the lesion tissues and the healthy
distractors, the lesion-size anchors tuned together with the lesion contrasts, and the signal equations of
the T1-weighted (spoiled gradient echo) and T2-weighted (spin echo) sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TissueProperties:
    """Relaxation times (ms) and proton density of one tissue class."""

    t1: float
    t2: float
    pd: float

    def scaled(self, t1: float = 1.0, t2: float = 1.0, pd: float = 1.0) -> TissueProperties:
        return TissueProperties(self.t1 * t1, self.t2 * t2, min(self.pd * pd, 1.0))


# 3 T-like healthy values, demo-data.md §4.1.2.
HEALTHY_TISSUES = {
    "gm": TissueProperties(1400.0, 95.0, 0.80),
    "wm": TissueProperties(850.0, 70.0, 0.69),
    "csf": TissueProperties(4200.0, 1800.0, 1.00),
}
# Lesion tissues, demo-data.md §4.2. MS plaque T2 raised from 140 ms (MS was far too hard, §4.3); WMH T1
# lowered from 1150 ms so that WMH are about iso-intense to WM on T1w (0.99), as many are.
LESION_TISSUES = {
    "ms_plaque": TissueProperties(1400.0, 180.0, 0.82),
    "ms_black_hole": TissueProperties(2200.0, 250.0, 0.85),
    "wmh": TissueProperties(1000.0, 115.0, 0.76),
    "oedema": TissueProperties(1450.0, 190.0, 0.87),
    "enhancing": TissueProperties(1550.0, 125.0, 0.85),
    "necrosis": TissueProperties(3000.0, 700.0, 0.95),
    "stroke_core": TissueProperties(3500.0, 1200.0, 0.97),
    "gliosis": TissueProperties(1350.0, 160.0, 0.84),
}
# Sizes and contrasts tuned so that a plain intensity threshold lands within a factor of two of the paper's
# Thresh AUPRC on every test set (demo-data.md §4.3, benchmarks/demo_threshold_baseline.py).
MS_LESION_MEDIAN_MM3 = 250.0  # §4.2 says 100 mm^3; raised for a 5-15 mL median load, as §4.3 asks
WMH_MEDIAN_ML = 15.0  # top of the 10-15 mL anchor (§3); WMH on T1 is a prevalence game
STROKE_MEDIAN_ML, STROKE_SIGMA = 8.0, 1.8  # within §4.2's 5-8 mL median, sigma 1.4-1.8
STROKE_RIM_MM = 4.0  # gliotic rim inside the infarct edge (§4.2 says 2 voxels at 1 mm)
STROKE_CAVITATION = (0.5, 1.0)  # share of the infarct core that is CSF-like; the rest is gliotic
OEDEMA_FLOOR = 0.3  # water excess of oedema far from the tumour core, relative to next to it

# Healthy distractors, demo-data.md §4.1.4: normal periventricular caps and choroid plexus [approximate].
DISTRACTOR_TISSUES = {
    "pvs": HEALTHY_TISSUES["csf"],
    "cap": TissueProperties(1000.0, 95.0, 0.74),
    "choroid": TissueProperties(1300.0, 90.0, 0.80),
}


@dataclass(frozen=True)
class T1wSequence:
    """Spoiled gradient echo (demo-data.md §4.1.3: TR 20 ms, flip 25 deg, TE 4 ms)."""

    tr: float = 20.0
    te: float = 4.0
    flip_deg: float = 25.0

    def signal(self, tissue: TissueProperties) -> float:
        e1 = np.exp(-self.tr / tissue.t1)
        flip = np.deg2rad(self.flip_deg)
        return float(
            tissue.pd * np.sin(flip) * (1 - e1) / (1 - np.cos(flip) * e1) * np.exp(-self.te / tissue.t2)
        )


@dataclass(frozen=True)
class T2wSequence:
    """Spin echo (demo-data.md §4.1.3: TR 5000 ms, TE 100 ms)."""

    tr: float = 5000.0
    te: float = 100.0

    def signal(self, tissue: TissueProperties) -> float:
        return float(tissue.pd * (1 - np.exp(-self.tr / tissue.t1)) * np.exp(-self.te / tissue.t2))
