"""The demo sets: spawn-key id, output directory, name prefix, written contrasts and lesion type of each."""

from __future__ import annotations

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
