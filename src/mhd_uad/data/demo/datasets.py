"""The demo sets: spawn-key id, output directory, name prefix, written contrasts and lesion type of each."""

from __future__ import annotations

import numpy as np

# Set name -> (spawn-key id, directory under out_dir, name prefix, written contrasts, lesion type).
# The ids are fixed forever: they key each subject's random stream.
DATASETS: dict[str, tuple[int, str, str, tuple[str, ...], str]] = {
    "ixi": (0, "Train/ixi", "IXI-demo", ("t1", "t2"), "none"),
    "Brats21": (1, "Test/Brats21", "Brats21-demo", ("t2",), "tumour"),
    "MSLUB": (2, "Test/MSLUB", "MSLUB-demo", ("t2",), "ms"),
    "ATLAS_v2": (3, "Test/ATLAS_v2", "ATLAS-demo", ("t1",), "stroke"),
    "WMH": (4, "Test/WMH", "WMH-demo", ("t1",), "wmh"),
}
TEST_SETS = ("Brats21", "MSLUB", "ATLAS_v2", "WMH")

# Age of the subjects (years) per set: (mean, sd) of a normal clipped to [20, 88], or None for IXI's uniform
# 20-86 (the IXI age range). Test cohorts as the data sets describe them [approximate]: glioma patients about
# 60, MS about 40, chronic stroke about 62, the WMH challenge's elderly about 70. Atrophy follows age in
# train and test alike, so age is not the anomaly signal.
AGES: dict[str, tuple[float, float] | None] = {
    "ixi": None,
    "Brats21": (60.0, 12.0),
    "MSLUB": (40.0, 10.0),
    "ATLAS_v2": (62.0, 12.0),
    "WMH": (70.0, 8.0),
}


def sample_age(rng, dataset: str) -> float:
    spec = AGES[dataset]
    if spec is None:
        return float(rng.uniform(20.0, 86.0))
    return float(np.clip(rng.normal(*spec), 20.0, 88.0))
