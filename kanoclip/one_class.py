"""One-class methods: detectors fitted on normal images only (the `train/good` of a dataset), as pure nn.Modules.

The interface every one-class method meets (Kano's `oneclass`, PatchCore, PaDiM):

- The class is named in the method table (core/registry.py) with kind "one-class", its nn.Module ("model") and its
  config dataclass ("config", with `to_dict()`); `kano train --method NAME` fits it and writes a run like every
  other method (weights.safetensors + config.json), and `kanoclip.runs.load_run` rebuilds it through
  `kanoclip.registry.build_one_class`, so `eval`, `predict`, `calibrate`, `export`, `serve` and `kano.Detector`
  take it as they take a trained run.
- `__init__(encoder, cfg, image_size)`: `encoder` is a frozen `Backbone` (kanoclip/backbone.py) or None (a method
  that reads pixels only, `--backbone none`); `image_size` S is the side the photos are squash-resized to before
  the model sees them (the working resolution). The class method `encoder_image_size(cfg)` says at which size
  the factory builds the encoder (None: the backbone's own).
- `self.backbone` is the evaluator's `Preprocessing` (kanoclip/protocol.py): `image_size` S, the per-channel
  `mean`/`std` the images arrive normalised with (the class attributes `input_mean`/`input_std`; default the
  encoder's own, or (0, 0, 0)/(1, 1, 1) = RGB in [0, 1] without one), `device`, `spec`.
- `fit(data: FitData) -> dict`: set the fitted state from the normal images `data.good()` yields, batches of
  (images (N, 3, S, S) normalised as above, indices (N,) into `data.files`); `data.good()` may be iterated
  several times. A method may read `data.validation()` (synthetic defects, never the user's real test photos;
  None when there are none) to choose among its own variants. Returns what the run records about the fit
  (JSON-able). Fitting runs under torch.no_grad().
- `forward(images (N, 3, S, S), class_names) -> InferenceBatch` (kanoclip/model.py): image_score (N,) and
  anomaly_map (N, S, S), both in [0, 1] (calibration and the export's decisions assume that range), stage_maps
  (N, P, h, w) per part on its own grid. Class names are ignored (one run per product).
- The fitted state is the module's buffers registered with `register_fitted(name, tensor)` (not parameters: nothing
  is trained by gradient); `trainable_state_dict()` returns exactly them and `load_trainable_state_dict()` restores
  them at the shapes stored (a memory bank's size is known only after the fit). The export takes them as graph
  constants.

Numerics shared by the methods (float64 where sums are long): `Moments` (streaming count, sum and sum of outer
products: memory D x D whatever the number of samples), `gaussian` (mean and shrunk covariance -> precision),
`mahalanobis_sq`, `standardise`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Protocol, runtime_checkable

import torch
import torch.nn as nn

from .model import InferenceBatch
from .protocol import MethodDefaults


@dataclass(frozen=True)
class OneClassInput:
    """The `Preprocessing` of a one-class model: the working side S, the normalisation, where it runs, the encoder's
    spec ("none" without one)."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    spec: str | None = "none"


@dataclass
class FitData:
    """What `fit` reads. files: the normal photos (paths) in index order; good(): an iterator over batches
    (images (N, 3, S, S), indices (N,) int64), every normal photo once per call; validation(): None, or an iterator
    over (images (N, 3, S, S), labels (N,) 0/1, kinds [N] (the defect folder, "good" for normal), sources (N,) int64
    = the index in `files` of the normal photo a synthetic defect was drawn on, -1 when unknown)."""

    files: list[str]
    good: Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]]
    validation: Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor, list[str], torch.Tensor]] | None] = lambda: None
    log: Callable[[str], None] = lambda s: None
    progress: Callable[[str, int], Callable[[int], None]] | None = None
    seed: int = 0

    @property
    def n_good(self) -> int:
        return len(self.files)


@runtime_checkable
class OneClassMethod(Protocol):
    method: str
    one_class: bool

    def fit(self, data: FitData) -> dict: ...

    def forward(self, images: torch.Tensor, class_names: list[str] | None = None) -> InferenceBatch: ...


class OneClassModel(nn.Module, MethodDefaults):
    """Base of the one-class methods: preprocessing, fitted buffers and their state dict, eval mode always."""

    method = ""
    one_class = True
    input_mean: tuple[float, float, float] | None = None   # None: the encoder's own (or 0 without one)
    input_std: tuple[float, float, float] | None = None

    def __init__(self, encoder: nn.Module | None, cfg, image_size: int):
        super().__init__()
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
            raise ValueError(f"image_size must be an integer >= 8 (the working side in px), got {image_size!r}")
        self.encoder, self.cfg, self.image_size = encoder, cfg, image_size
        self._fitted: list[str] = []
        if encoder is not None:
            for p in encoder.parameters():
                p.requires_grad_(False)

    @classmethod
    def encoder_image_size(cls, cfg) -> int | None:
        """The side the factory builds the encoder at (None: the backbone's own)."""
        return None

    @property
    def backbone(self) -> OneClassInput:
        enc = self.encoder
        mean = self.input_mean or (tuple(enc.mean) if enc is not None else (0.0, 0.0, 0.0))
        std = self.input_std or (tuple(enc.std) if enc is not None else (1.0, 1.0, 1.0))
        dev = enc.device if enc is not None else next(iter(self.buffers()), torch.zeros(0)).device
        return OneClassInput(self.image_size, mean, std, dev, enc.spec if enc is not None else "none")

    def register_fitted(self, name: str, tensor: torch.Tensor) -> None:
        """A fitted tensor (a buffer saved in the run); registering again replaces it, whatever its shape."""
        if name in self._fitted:
            delattr(self, name)
        else:
            self._fitted.append(name)
        self.register_buffer(name, tensor.detach().clone())

    @property
    def fitted(self) -> bool:
        return bool(self._fitted)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The fitted buffers, by name (what weights.safetensors holds)."""
        return {k: getattr(self, k).detach() for k in self._fitted}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.fitted_names())
        if expected and set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ValueError(f"the run's weights must hold exactly {self.method}'s fitted tensors; missing {missing[:5]}, "
                             f"unexpected {extra[:5]}")
        dev = self.backbone.device
        for k, v in state.items():
            self.register_fitted(k, v.to(dev))

    def fitted_names(self) -> tuple[str, ...]:
        """The names of the fitted tensors this configuration expects (empty: not checked)."""
        return ()

    def text_bank(self, words: list[str]) -> torch.Tensor:
        """No text side (kano export's graph signature): a (C, 2, 1) placeholder; class_index selects nothing."""
        return torch.zeros(len(words), 2, 1)

    def score_bank(self, images: torch.Tensor, text: torch.Tensor) -> InferenceBatch:
        """The exported graph's call: the photo's score and map, whatever the class row."""
        return self(images)

    def train(self, mode: bool = True):  # nothing is trained by gradient: always eval
        return super().train(False)

    def fit(self, data: FitData) -> dict:  # pragma: no cover - each method implements it
        raise NotImplementedError

    def describe(self) -> dict:
        return {"method": self.method, "image_size": self.image_size, "encoder": self.backbone.spec}


# ------------------------------------------------------------------------------------------ numerics
class Moments:
    """Streaming count, sum (D,) and sum of outer products (D, D) in float64: the mean and covariance of any number of
    D-dimensional samples in O(D^2) memory. Moments add (`+`) and subtract (`-`), so that the moments of a fold are
    the total minus those of the held-out images."""

    def __init__(self, dim: int, n: float = 0.0, s1: torch.Tensor | None = None, s2: torch.Tensor | None = None):
        self.dim, self.n = dim, float(n)
        self.s1 = s1 if s1 is not None else torch.zeros(dim, dtype=torch.float64)
        self.s2 = s2 if s2 is not None else torch.zeros(dim, dim, dtype=torch.float64)

    @classmethod
    def of(cls, x: torch.Tensor) -> "Moments":
        """x (M, D) -> its moments."""
        x = x.reshape(-1, x.shape[-1]).double()
        return cls(x.shape[1], x.shape[0], x.sum(0), x.T @ x)

    def add(self, x: torch.Tensor) -> "Moments":
        x = x.reshape(-1, self.dim).double()
        self.n += x.shape[0]
        self.s1 += x.sum(0)
        self.s2 += x.T @ x
        return self

    def __add__(self, other: "Moments") -> "Moments":
        return Moments(self.dim, self.n + other.n, self.s1 + other.s1, self.s2 + other.s2)

    def __sub__(self, other: "Moments") -> "Moments":
        return Moments(self.dim, self.n - other.n, self.s1 - other.s1, self.s2 - other.s2)

    def mean(self) -> torch.Tensor:
        return self.s1 / max(self.n, 1.0)

    def covariance(self) -> torch.Tensor:
        """The unbiased sample covariance (divided by n - 1)."""
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 samples, got {self.n:g}")
        m = self.mean()
        return (self.s2 - self.n * torch.outer(m, m)) / (self.n - 1.0)


def shrinkage_weight(n: float, dim: int) -> float:
    """lambda = D / (n + D): the weight of the scaled identity in the shrunk covariance. Kano's rule: 1/2 when there are
    as many samples as dimensions, about D / n when samples abound (a plain, data-size-only stand-in for Ledoit-Wolf,
    which would need fourth moments that streaming does not keep)."""
    return dim / (n + dim)


def gaussian(m: Moments, shrinkage: float | None = None, floor: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (mean (D,), precision (D, D)) float64 of the Gaussian with the sample covariance of `m` shrunk
    (`shrunk_precision`; shrinkage None: shrinkage_weight(n, D))."""
    lam = shrinkage_weight(m.n, m.dim) if shrinkage is None else float(shrinkage)
    return m.mean(), shrunk_precision(m.covariance(), lam, floor)


def shrunk_precision(cov: torch.Tensor, shrinkage: float, floor: float = 1e-6) -> torch.Tensor:
    """The inverse of (1 - l) S + (l + floor) (tr S / D) I, S = cov (D, D), l = shrinkage in [0, 1]; the floor keeps
    the inverse finite when a feature is constant. Symmetrised, float64."""
    lam = float(shrinkage)
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"shrinkage must be in [0, 1], got {lam}")
    cov = cov.double()
    scale = float(torch.diagonal(cov).mean().clamp_min(1e-12))
    shrunk = (1.0 - lam) * cov + (lam + floor) * scale * torch.eye(cov.shape[0], dtype=cov.dtype)
    prec = torch.linalg.inv(shrunk)
    return (prec + prec.T) / 2.0


def ledoit_wolf(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """x (n, D) samples -> (mean (D,), precision (D, D), shrinkage) of the Gaussian whose covariance is Ledoit and Wolf's
    ("A well-conditioned estimator for large-dimensional covariance matrices", J. Multivariate Anal. 2004) on the
    standardised samples (each dimension divided by its standard deviation, so that a scaled identity is a fair
    target whatever the units), scaled back: cov = Dg ((1 - l) R + l mu I) Dg, R the standardised samples' covariance
    (divided by n), mu its mean variance, l the estimated optimal shrinkage. A dimension constant over the samples
    keeps a floor of 1e-6 of the mean variance."""
    x = x.double()
    n, d = x.shape
    mean = x.mean(0)
    xc = x - mean
    sd = xc.pow(2).mean(0).sqrt()
    sd = torch.where(sd > 0, sd, torch.full_like(sd, 1.0)).clamp_min(1e-6 * float(sd.mean().clamp_min(1e-12)))
    z = xc / sd
    emp = z.T @ z / n
    mu = float(torch.diagonal(emp).mean())
    # the shrinkage intensity, as Ledoit and Wolf's Lemma 3.2-3.4 estimate it (b2 / d2, b2 <= d2)
    d2 = float(((emp - mu * torch.eye(d, dtype=emp.dtype)) ** 2).sum())
    b2 = float(sum(((torch.outer(zi, zi) - emp) ** 2).sum() for zi in z)) / n ** 2
    lam = 0.0 if d2 == 0.0 else min(b2, d2) / d2
    cov_z = (1.0 - lam) * emp + lam * mu * torch.eye(d, dtype=emp.dtype) + 1e-6 * mu * torch.eye(d, dtype=emp.dtype)
    prec_z = torch.linalg.inv(cov_z)
    prec = prec_z / sd[:, None] / sd[None, :]
    return mean, (prec + prec.T) / 2.0, lam


def mahalanobis_sq(x: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """x (..., D), mean (D,) or broadcastable (..., D), precision (D, D) -> (x - mean)^T P (x - mean), shape (...)."""
    d = x - mean
    return ((d @ precision) * d).sum(-1)


def standardise(scores: torch.Tensor, location: torch.Tensor | float, scale: torch.Tensor | float) -> torch.Tensor:
    """(scores - location) / scale: a part's score in units of its spread on normal images it was not fitted on."""
    return (scores - location) / scale


def location_scale(scores: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1) of a part's scores on held-out normal images; the scale is floored at
    1e-6 of the mean's size (a part that scores every normal image alike)."""
    s = torch.as_tensor(list(scores), dtype=torch.float64)
    if s.numel() < 2:
        raise ValueError(f"standardising needs the scores of at least 2 held-out normal images, got {s.numel()}")
    loc = float(s.mean())
    return loc, max(float(s.std(unbiased=True)), 1e-6 * max(abs(loc), 1.0))


def squash(z: torch.Tensor) -> torch.Tensor:
    """A standardised score z in (-inf, inf) -> (0, 1), increasing: 0.5 + 0.5 z / (1 + |z|). No saturation in float32
    up to |z| ~ 1e6, so that ranks survive; z = 0 (a typical normal image) is 0.5."""
    return 0.5 + 0.5 * z / (1.0 + z.abs())
