"""The `ingest` params (conf/config.yaml), checked before any scan is read."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from mhd_uad.config import require, to_plain
from mhd_uad.errors import ConfigError

DEFAULT_TEMPLATE = "sri24"
SKULL_STRIP_MODES = ("auto", "mask", "hdbet")
_AXES = ({"L", "R"}, {"A", "P"}, {"S", "I"})


@dataclass(frozen=True)
class RegistrationSettings:
    """Affine registration; defaults follow ANTsPy's type_of_transform='Affine' (method.md §2.2 step 3)."""

    shrink_factors: tuple[int, ...] = (4, 2, 2)  # ANTs' 4x2x2x1 with 0 iterations at the last level
    smoothing_sigmas: tuple[float, ...] = (3.0, 2.0, 1.0)  # voxels
    max_iterations: int = 200  # per level; ANTs allows 2100x1200x1200 but stops on convergence first
    min_step: float = 1e-4  # regular-step gradient descent stops when its step (halved at each turn) gets here
    sampling_fraction: float = 0.2  # ANTs: mattes[...,32,regular,0.2]
    histogram_bins: int = 32
    seed: int = 3141


@dataclass(frozen=True)
class N4Settings:
    """N4 bias correction as the original's n4filter.py (method.md §2.2 step 5)."""

    enabled: bool = True
    iterations: tuple[int, ...] = (200, 200, 200, 200)
    tolerance: float = 5e-4
    mask_sigma_mm: float = 1.0  # the weight is the brain mask smoothed with this sigma
    shrink_factor: int = 4  # ANTsPy's default
    spline_distance_mm: float = 200.0  # ANTsPy's default B-spline mesh spacing


@dataclass(frozen=True)
class IngestSettings:
    template: str = DEFAULT_TEMPLATE  # "sri24" (bundled) or a NIfTI path
    orientation: str = "LPS"  # voxel axes of the outputs (nibabel codes; ANTs calls it "RAI")
    spacing_mm: float = 1.0
    skull_strip: str = "auto"
    registration: RegistrationSettings = RegistrationSettings()
    n4: N4Settings = N4Settings()

    @classmethod
    def from_params(cls, params) -> IngestSettings:
        if "ingest" not in params:
            raise ConfigError("params have no `ingest` section (recompose params.yaml: `make params`)", "params.yaml")
        return cls.from_dict(to_plain(params.ingest))

    @classmethod
    def from_dict(cls, d: dict) -> IngestSettings:
        try:
            reg = RegistrationSettings(**_tuples(d.get("registration", {})))
            n4 = N4Settings(**_tuples(d.get("n4", {})))
            rest = {k: v for k, v in d.items() if k not in ("registration", "n4")}
            settings = cls(registration=reg, n4=n4, **rest)
        except TypeError as exc:
            raise ConfigError(f"unknown or malformed `ingest` key ({exc})", "params.yaml") from None
        settings.check()
        return settings

    def check(self) -> None:
        require(isinstance(self.template, str) and self.template.strip() != "",
                "ingest.template must be `sri24` or a NIfTI path")
        code = str(self.orientation).upper()
        require(len(code) == 3 and all(sum(c in axis for c in code) == 1 for axis in _AXES),
                f"ingest.orientation must be 3 axis codes such as LPS or RAS, got {self.orientation!r}")
        require(_number(self.spacing_mm) and 0.2 <= float(self.spacing_mm) <= 5.0,
                f"ingest.spacing_mm must be a number of mm in [0.2, 5], got {self.spacing_mm!r}")
        require(self.skull_strip in SKULL_STRIP_MODES,
                f"ingest.skull_strip must be one of {', '.join(SKULL_STRIP_MODES)}, got {self.skull_strip!r}")
        r = self.registration
        require(len(r.shrink_factors) >= 1 and all(_int(s) and s >= 1 for s in r.shrink_factors),
                f"ingest.registration.shrink_factors must be positive integers, got {list(r.shrink_factors)}")
        require(len(r.smoothing_sigmas) == len(r.shrink_factors)
                and all(_number(s) and s >= 0 for s in r.smoothing_sigmas),
                "ingest.registration.smoothing_sigmas must be one non-negative number per shrink factor")
        require(_int(r.max_iterations) and r.max_iterations >= 1, "ingest.registration.max_iterations must be >= 1")
        require(_number(r.min_step) and 0 < r.min_step < 1, "ingest.registration.min_step must lie in (0, 1)")
        require(_number(r.sampling_fraction) and 0 < r.sampling_fraction <= 1,
                f"ingest.registration.sampling_fraction must lie in (0, 1], got {r.sampling_fraction!r}")
        require(_int(r.histogram_bins) and 8 <= r.histogram_bins <= 256,
                "ingest.registration.histogram_bins must be an integer in [8, 256]")
        require(_int(r.seed) and r.seed >= 0, "ingest.registration.seed must be a non-negative integer")
        n = self.n4
        require(isinstance(n.enabled, bool), "ingest.n4.enabled must be true or false")
        require(len(n.iterations) >= 1 and all(_int(i) and i >= 1 for i in n.iterations),
                f"ingest.n4.iterations must be positive integers (one per level), got {list(n.iterations)}")
        require(_number(n.tolerance) and n.tolerance > 0, "ingest.n4.tolerance must be > 0")
        require(_number(n.mask_sigma_mm) and n.mask_sigma_mm >= 0, "ingest.n4.mask_sigma_mm must be >= 0")
        require(_int(n.shrink_factor) and n.shrink_factor >= 1, "ingest.n4.shrink_factor must be an integer >= 1")
        require(_number(n.spline_distance_mm) and n.spline_distance_mm > 0, "ingest.n4.spline_distance_mm must be > 0")

    def with_template(self, template: str | None) -> IngestSettings:
        if template is None:
            return self
        out = IngestSettings(str(template), self.orientation, self.spacing_mm, self.skull_strip, self.registration,
                             self.n4)
        out.check()
        return out

    def as_dict(self) -> dict:
        return asdict(self)


def _tuples(d: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list | tuple) else v for k, v in dict(d).items()}


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)
