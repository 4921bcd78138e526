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


# Healthy tissues at 1.5 T (IXI's main field strength): relaxation times rounded from the 1.5 T literature
# (Stanisz et al., MRM 54:507, 2005: WM T1 884 / T2 72 ms, GM 1124 / 95 ms; deep GM between the two; CSF
# T1 about 4.3 s, T2 about 2 s; WM T2 taken at 80 ms, within the 72-90 ms the 1.5 T literature spans, so that
# T2w GM/WM is 1.36, as in SPM's avg152T2 (1.31-1.36)) and water contents as proton density (WM 0.71, GM 0.80, CSF 1.0)
# [approximate]. The realism report (data.demo.realism) checks the rendered ratios against real templates.
HEALTHY_TISSUES = {
    "gm": TissueProperties(1130.0, 95.0, 0.80),
    "wm": TissueProperties(880.0, 80.0, 0.71),
    "csf": TissueProperties(4300.0, 2000.0, 1.00),
    "dgm": TissueProperties(1000.0, 85.0, 0.78),
}
# Lesion tissues, demo-data.md §4.2 (given there at 3 T): T1 scaled to 1.5 T by 0.83 (the WM ratio
# 880/1060) except the fluid-like ones, T2 and PD kept. MS plaque T2 raised from 140 ms (MS was far too hard,
# §4.3); WMH T1 975 ms, a little above WM's, so that WMH are mildly hypo-intense on T1w (0.88 of WM), as
# most are (1050 ms put the intensity-threshold AP at 0.4x the paper's, see benchmarks/demo_threshold_baseline.py).
LESION_TISSUES = {
    "ms_plaque": TissueProperties(1160.0, 180.0, 0.82),
    "ms_black_hole": TissueProperties(1830.0, 250.0, 0.85),
    "wmh": TissueProperties(975.0, 115.0, 0.76),
    "oedema": TissueProperties(1200.0, 190.0, 0.87),
    "enhancing": TissueProperties(1290.0, 125.0, 0.85),
    "necrosis": TissueProperties(2500.0, 700.0, 0.95),
    "stroke_core": TissueProperties(3200.0, 1200.0, 0.97),
    "gliosis": TissueProperties(1120.0, 160.0, 0.84),
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
    "cap": TissueProperties(950.0, 95.0, 0.74),
    "choroid": TissueProperties(1080.0, 90.0, 0.80),
}


@dataclass(frozen=True)
class T1wSequence:
    """IXI's T1-weighted 3D turbo field echo (Philips, 1.5 T): TR 9.81 ms, TE 4.60 ms, flip 8 deg (the IXI
    scan parameters). Modelled as an inversion-prepared gradient-echo train (MP-RAGE signal equation, the
    echo at the centre of a linearly ordered train): the IXI parameters do not give the prepulse, so the
    train length (128 echoes), shot interval (3 s) and inversion time (760 ms) are set so that the healthy
    WM:GM:CSF ratios (1 : 0.66 : 0.32) fall among the real T1 templates' (MNI152 2009a 1 : 0.75 : 0.32,
    SRI24 1 : 0.68 : 0.35, OASIS-30 1 : 0.62 : 0.31)."""

    tr: float = 9.81
    te: float = 4.60
    flip_deg: float = 8.0
    echoes: int = 128
    ti: float = 760.0
    shot_interval: float = 3000.0

    def signal(self, tissue: TissueProperties) -> float:
        flip = np.deg2rad(self.flip_deg)
        t1, m0 = tissue.t1, tissue.pd
        # During the train the magnetisation relaxes with T1* towards M0*.
        t1_star = 1.0 / (1.0 / t1 - np.log(np.cos(flip)) / self.tr)
        e1 = np.exp(-self.tr / t1)
        m0_star = m0 * (1.0 - e1) / (1.0 - np.cos(flip) * e1)
        train = self.echoes * self.tr
        before = max(self.ti - train / 2.0, 0.0)  # inversion -> first echo
        after = max(self.shot_interval - self.ti - train / 2.0, 0.0)  # last echo -> next inversion
        e_a, e_t, e_d = np.exp(-before / t1), np.exp(-train / t1_star), np.exp(-after / t1)
        # Steady state: longitudinal magnetisation just before each inversion.
        m_pre = (m0 + e_d * (m0_star * (1.0 - e_t) + m0 * e_t - m0 * e_a * e_t - m0)) / (
            1.0 + e_d * e_a * e_t
        )
        m_first = m0 - (m0 + m_pre) * e_a
        m_centre = m0_star + (m_first - m0_star) * np.exp(-train / 2.0 / t1_star)
        return float(abs(m_centre) * np.sin(flip) * np.exp(-self.te / tissue.t2))


@dataclass(frozen=True)
class T2wSequence:
    """IXI's T2-weighted turbo spin echo (Philips, 1.5 T): TR 5725.8 ms, TE 100 ms (the IXI scan
    parameters); spin-echo signal equation."""

    tr: float = 5725.8
    te: float = 100.0

    def signal(self, tissue: TissueProperties) -> float:
        return float(tissue.pd * (1 - np.exp(-self.tr / tissue.t1)) * np.exp(-self.te / tissue.t2))


def tissue_ratios(sequence) -> dict[str, float]:
    """Healthy tissue signals of a sequence relative to WM (what the realism report compares)."""
    wm = sequence.signal(HEALTHY_TISSUES["wm"])
    return {k: round(sequence.signal(t) / wm, 3) for k, t in HEALTHY_TISSUES.items()}
