"""Offline demo dataset: realistic synthetic brain MRI with lesions, made from a real template anatomy.

Recipe: design/demo-data.md §4. Per subject, one of the real base anatomies (MNI152 2009a or SRI24; the
OASIS-30 template is held out for the generalisation benchmark) is drawn; its T1 and GM/WM/CSF/deep-GM maps
are warped (affine + smooth elastic + age-driven atrophy, one backward map), tissue relaxation and IXI's
sequence parameters are jittered, healthy distractors are added, lesions (if any) edit the tissue model
inside soft fraction maps, T1 is the real template T1 times the signal-equation ratio and T2 is rendered
from the signal equation with the template's texture, then the acquisition (the residual bias of an
N4-corrected scan, Rician noise at 1 mm averaged to the grid) is applied to lesion and healthy tissue
alike. Volumes are skull-stripped and cropped to their own brain-mask bounding box (method.md §2.2 step 4).

Determinism: every subject draws from its own `numpy.random.SeedSequence(seed, spawn_key=(set, index))`,
so a subject is the same whatever the subject counts or the worker count; image values are rounded to
1e-5 so last-bit differences between CPUs' vectorised math cannot change the bytes written.

Modules:
- `datasets`: the five demo sets (spawn-key id, directory, name prefix, contrasts, lesion type).
- `bases`: the real base anatomies (MNI152, SRI24, OASIS-30), their sources and licence notices.
- `tissue`: 1.5 T tissue relaxation properties, lesion-size anchors, and IXI's T1w/T2w signal equations.
- `base_anatomy`: `BaseAnatomy`, a base on the working grid (its channels and landmarks).
- `anatomy`: a base loaded onto the working grid (`load_base_anatomy`, the channels) and `SubjectAnatomy`.
- `warps`: smooth noise fields, the healthy backward map, trilinear warping and map composition.
- `lesions`: soft painting helpers, healthy distractors, and the per-type lesion planners (`plan_*`).
- `acquisition`: signal mixing, bias/Rician acquisition, and `simulate_subject` (one subject, no I/O).
- `writer`: cropping, file names, the worker pool, the manifest and notice, and `generate_demo_dataset`.
"""

from mhd_uad.data.demo.acquisition import SyntheticScan, simulate_subject
from mhd_uad.data.demo.anatomy import (
    CSF,
    D_VENT,
    DEPTH,
    DGM,
    GM,
    MASK,
    T1,
    TEXTURE,
    VENT,
    WM,
    SubjectAnatomy,
    load_base_anatomy,
    tissue_pv,
)
from mhd_uad.data.demo.base_anatomy import BaseAnatomy
from mhd_uad.data.demo.bases import BASE_NAMES, HELD_OUT_BASE, TRAINING_BASES
from mhd_uad.data.demo.datasets import DATASETS, TEST_SETS
from mhd_uad.data.demo.writer import MANIFEST_NAME, NOTICE_NAME, generate_demo_dataset

__all__ = [
    "BASE_NAMES",
    "CSF",
    "DGM",
    "HELD_OUT_BASE",
    "TRAINING_BASES",
    "DATASETS",
    "DEPTH",
    "D_VENT",
    "GM",
    "MANIFEST_NAME",
    "MASK",
    "NOTICE_NAME",
    "T1",
    "TEST_SETS",
    "TEXTURE",
    "VENT",
    "WM",
    "BaseAnatomy",
    "SubjectAnatomy",
    "SyntheticScan",
    "generate_demo_dataset",
    "load_base_anatomy",
    "simulate_subject",
    "tissue_pv",
]
