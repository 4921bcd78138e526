"""Offline demo dataset: realistic synthetic brain MRI with lesions, made from a real template anatomy.

Recipe: design/demo-data.md §4. Per subject, the template T1 and its GM/WM/CSF probability
maps are warped (affine + smooth elastic + atrophy, one backward map), tissue and sequence parameters are
jittered, healthy distractors are added, lesions (if any) edit the tissue model inside soft fraction maps,
T1 is the real template T1 times the model ratio and T2 is rendered from the tissue model with the
template's texture, then the acquisition (bias, blur, Rician noise) is applied to lesion and healthy tissue
alike. Volumes are skull-stripped and cropped to their own brain-mask bounding box (method.md §2.2 step 4).

Determinism: every subject draws from its own `numpy.random.SeedSequence(seed, spawn_key=(set, index))`,
so a subject is the same whatever the subject counts or the worker count; image values are rounded to
1e-5 so last-bit differences between CPUs' vectorised math cannot change the bytes written.

Modules:
- `datasets`: the five demo sets (spawn-key id, directory, name prefix, contrasts, lesion type).
- `tissue`: tissue relaxation properties, lesion-size anchors, and the T1w/T2w sequence signal equations.
- `anatomy`: the template loaded onto the working grid (`BaseAnatomy`, its channels) and `SubjectAnatomy`.
- `warps`: smooth noise fields, the healthy backward map, trilinear warping and map composition.
- `lesions`: soft painting helpers, healthy distractors, and the per-type lesion planners (`plan_*`).
- `acquisition`: signal mixing, bias/blur/Rician acquisition, and `simulate_subject` (one subject, no I/O).
- `writer`: cropping, file names, the worker pool, the manifest and notice, and `generate_demo_dataset`.
"""

from mhd_uad.data.demo.acquisition import SyntheticScan, simulate_subject
from mhd_uad.data.demo.anatomy import (
    CSF,
    D_VENT,
    DEPTH,
    GM,
    MASK,
    T1,
    TEXTURE,
    VENT,
    WM,
    BaseAnatomy,
    SubjectAnatomy,
    load_base_anatomy,
)
from mhd_uad.data.demo.datasets import DATASETS, TEST_SETS
from mhd_uad.data.demo.writer import MANIFEST_NAME, NOTICE_NAME, generate_demo_dataset

__all__ = [
    "CSF",
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
]
