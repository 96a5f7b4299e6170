"""Zero-parameter detectors: the floor every result is read against. Nothing here is trained.

Per-image methods look at one image alone:

- median_colour: each pixel's RGB distance from the image's median colour.
- darkness / brightness: 1 - luminance / luminance.
- local_median: each pixel's RGB distance from the median of its k x k neighbourhood (k = S/8, odd;
  taken on a downsampled copy for large images).
- self_similarity: each p x p patch (p = 8 px, stride 4) scored by its mean distance to its 3 nearest
  patches of the same image outside its neighbourhood (centres >= 2p apart), on raw pixels.
- self_similarity_randconv: the same on the feature grid of an untrained, seeded random conv net.

Transductive methods see the whole test set of a class at once (MuSc, ICLR 2024, in its simplest
form; the full MuSc is `--method musc`, kanoclip/musc.py): each patch is scored by its distance to the
nearest patch of every OTHER test image of the class, averaged over the closest 30 % of those images
(so that other images' defects do not hide it); no labels are used, but the score of an image depends on the others.

- mutual: on the frozen backbone's patch tokens (any backbone spec: tiny, micro, a real CLIP).
- musc_randconv: on the random conv net's features.

Every map is blurred with sigma = 4 px (as the model's maps) and the image score is its maximum.
Maps are in [0, 1] through FIXED scalings (never per image), so pixel metrics pooled over the images
of a class rank the same values the method produced.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from kano.core.errors import KanoError
from kano.kanoclip.model import InferenceBatch
from kano.kanoclip.protocol import MethodDefaults, PixelPreprocessing
from kano.kanoclip.registry import METHODS as REGISTRY, methods_with

METHODS = tuple(n for n, s in REGISTRY.items() if s.build == "kano.evaluator.baselines:load_baseline")  # built here
PER_IMAGE = tuple(m for m in METHODS if REGISTRY[m].kind == "zero-parameter")
TRANSDUCTIVE = tuple(m for m in METHODS if REGISTRY[m].kind == "transductive")
SIGMA = 4.0
RANDCONV_SEED = 1234
_SQRT3 = math.sqrt(3.0)


def _blur(x: torch.Tensor, sigma: float = SIGMA) -> torch.Tensor:
    from kano.kanoclip.model import gaussian_blur

    return gaussian_blur(x, sigma) if sigma > 0 else x


def luminance(images: torch.Tensor) -> torch.Tensor:
    """images (N, 3, H, W) RGB in [0, 1] -> (N, H, W) Rec. 601 luma."""
    return images[:, 0] * 0.299 + images[:, 1] * 0.587 + images[:, 2] * 0.114


def median_colour_map(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] -> (N, H, W): ||x - median colour of the image|| / sqrt(3), unblurred."""
    med = images.flatten(2).median(dim=2).values                      # (N, 3), per channel, lower median
    return (images - med[:, :, None, None]).norm(dim=1) / _SQRT3


def local_median_map(images: torch.Tensor, k: int, work: int = 48) -> torch.Tensor:
    """(N, 3, H, W) -> (N, H, W): ||x - median of its k x k window (reflect-padded)|| / sqrt(3).

    Images larger than `work` px take the median on an area-downsampled copy (window scaled alike) and
    upsample it bilinearly: the local background at a fraction of the cost (a k*k window per pixel)."""
    n, c, h, w = images.shape
    f = max(1, h // work)
    small = F.avg_pool2d(images, f) if f > 1 else images
    kk = max(3, (k // f) | 1)
    r = kk // 2
    meds = []
    for img in small:  # one image at a time: the window tensor is k*k times the image
        pad = F.pad(img[None], (r, r, r, r), mode="reflect")
        meds.append(F.unfold(pad, kk).view(c, kk * kk, *img.shape[-2:]).median(dim=1).values)
    med = torch.stack(meds)
    if f > 1:
        med = F.interpolate(med, size=(h, w), mode="bilinear", align_corners=False)
    return (images - med).norm(dim=1) / _SQRT3


def patch_grid(images: torch.Tensor, p: int, stride: int) -> tuple[torch.Tensor, int, int]:
    """(N, C, H, W) -> (N, L, C*p*p) raw patches on a (gh, gw) grid, L = gh*gw."""
    cols = F.unfold(images, p, stride=stride)                          # (N, C*p*p, L)
    gh = (images.shape[-2] - p) // stride + 1
    gw = (images.shape[-1] - p) // stride + 1
    return cols.transpose(1, 2), gh, gw


def self_similarity_scores(feats: torch.Tensor, gh: int, gw: int, exclude: float, k: int = 3) -> torch.Tensor:
    """feats (N, L, D) on a (gh, gw) grid -> (N, L): mean distance to the k nearest cells whose grid
    distance (Chebyshev) is >= `exclude` (at most half the grid); distances are RMS over D (raw pixels in [0, 1] stay in [0, 1])."""
    exclude = min(exclude, max(gh, gw) // 2)  # small grids: the centre cell must keep candidates
    yy, xx = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    pos = torch.stack([yy.flatten(), xx.flatten()], 1).float()
    near = torch.cdist(pos, pos, p=float("inf")) < exclude             # (L, L) the neighbourhood, itself included
    d = torch.cdist(feats, feats) / math.sqrt(feats.shape[-1])         # (N, L, L)
    d = d.masked_fill(near[None], float("inf"))
    kk = min(k, int((~near).sum(1).min()))
    if kk < 1:
        raise KanoError(f"image size must leave patches outside each patch's neighbourhood, got a {gh}x{gw} grid")
    return d.topk(kk, dim=-1, largest=False).values.mean(-1)


def patches_to_map(scores: torch.Tensor, gh: int, gw: int, p: int, stride: int, size: tuple[int, int]) -> torch.Tensor:
    """(N, L) per-patch scores -> (N, H, W): each pixel the mean score of the patches covering it
    (pixels no patch covers take their nearest patch's value)."""
    n = scores.shape[0]
    h, w = size
    cols = scores[:, None, :].expand(n, p * p, gh * gw)
    covered_h, covered_w = (gh - 1) * stride + p, (gw - 1) * stride + p
    num = F.fold(cols, (covered_h, covered_w), p, stride=stride)
    den = F.fold(torch.ones_like(cols), (covered_h, covered_w), p, stride=stride)
    m = (num / den)[:, 0]
    if (covered_h, covered_w) != (h, w):
        m = F.pad(m[:, None], (0, w - covered_w, 0, h - covered_h), mode="replicate")[:, 0]
    return m


class RandomConvNet(nn.Module):
    """An untrained conv net with fixed seeded weights: 3 -> 32 -> 64 -> 64 channels, 3x3 kernels,
    strides 1, 2, 2, ReLU between. (N, 3, H, W) -> (N, 64, H/4, W/4) unit-norm features."""

    def __init__(self, seed: int = RANDCONV_SEED):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = nn.Sequential(nn.Conv2d(3, 32, 3, 1, 1), nn.ReLU(), nn.Conv2d(32, 64, 3, 2, 1), nn.ReLU(),
                                     nn.Conv2d(64, 64, 3, 2, 1))
        for q in self.parameters():
            q.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(images * 2 - 1), dim=1)


def mutual_scores(tokens: torch.Tensor, fraction: float = 0.3) -> torch.Tensor:
    """MuSc-style mutual scoring. tokens (N, L, D), unit-normalised, one class's whole test set ->
    (N, L): for each patch, min cosine distance / 2 to each other image's patches, averaged over the
    ceil(fraction * (N - 1)) closest images."""
    n = tokens.shape[0]
    if n < 2:
        raise KanoError(f"transductive methods need at least 2 test images per class, got {n}")
    keep = max(1, math.ceil(fraction * (n - 1)))
    out = torch.empty(tokens.shape[:2])
    flat = tokens.reshape(-1, tokens.shape[-1])
    for i in range(n):
        sim = tokens[i] @ flat.T                                       # (L, N*L)
        dmin = (1 - sim.view(-1, n, tokens.shape[1]).amax(-1)) / 2     # (L, N): per other image
        dmin[:, i] = float("inf")
        out[i] = dmin.topk(keep, dim=1, largest=False).values.mean(1)
    return out


class ZeroParameterDetector(nn.Module, MethodDefaults):
    """A baseline behind the model interface `evaluator.run_inference` expects.

    `backbone` (kanoclip.protocol.Preprocessing) sets how images are prepared: pixel methods see RGB in [0, 1]
    (mean 0, std 1) at `image_size` (PixelPreprocessing); mutual sees the backbone's own normalisation and size. A
    transductive method must receive one class's whole test set as one batch (`transductive` is True;
    `evaluate_method` arranges it).
    """

    def __init__(self, method: str, image_size: int = 128, backbone=None, device: torch.device | str = "cpu"):
        super().__init__()
        if method not in METHODS:
            raise KanoError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
        if method == "mutual" and backbone is None:
            raise KanoError("--method mutual needs --backbone SPEC (tiny, micro or MODEL:PRETRAINED): it scores that backbone's patch tokens")
        self.method, self.transductive = method, method in TRANSDUCTIVE
        self.feature_net = backbone if method == "mutual" else None
        if method == "mutual":  # the backbone's preparation, but not the backbone: --mutual needs a per-image method
            self.backbone = PixelPreprocessing(backbone.image_size, backbone.device, backbone.mean, backbone.std, backbone.spec)
        else:
            if image_size < 32 or image_size % 4:
                raise KanoError(f"--image-size for pixel baselines must be a multiple of 4 and >= 32, got {image_size}")
            self.backbone = PixelPreprocessing(image_size, torch.device(device))
        self.randconv = RandomConvNet() if method.endswith("randconv") else None

    def raw_map(self, images: torch.Tensor) -> torch.Tensor:
        """images (N, 3, S, S) as prepared for this method -> (N, S, S) in [0, 1], before the blur."""
        images = images.float()
        n, _, h, w = images.shape
        m = self.method
        if m == "median_colour":
            return median_colour_map(images)
        if m == "darkness":
            return 1 - luminance(images)
        if m == "brightness":
            return luminance(images)
        if m == "local_median":
            return local_median_map(images, (h // 8) | 1)
        if m == "self_similarity":
            p, s = 8, 4
            feats, gh, gw = patch_grid(images, p, s)
            return patches_to_map(self_similarity_scores(feats, gh, gw, exclude=2 * p / s), gh, gw, p, s, (h, w))
        if m in ("self_similarity_randconv", "musc_randconv"):
            f = self.randconv(images)                                  # (N, 64, h/4, w/4)
            gh, gw = f.shape[-2:]
            tokens = f.flatten(2).transpose(1, 2)
            if m == "musc_randconv":
                sc = mutual_scores(tokens)
            else:  # RMS of unit vectors is ||a-b|| / sqrt(D); rescale to a cosine distance / 2 in [0, 1]
                sc = self_similarity_scores(tokens, gh, gw, exclude=4) * math.sqrt(tokens.shape[-1]) / 2
            return F.interpolate(sc.view(n, 1, gh, gw), size=(h, w), mode="bilinear", align_corners=False)[:, 0]
        # mutual on the frozen backbone: mean over its stages of the mutual scores of the Q-K patch tokens
        feats = self.feature_net(images, vv=False)
        maps = []
        for t in feats.patch_tokens:
            gh = gw = int(math.isqrt(t.shape[1]))
            sc = mutual_scores(F.normalize(t.float(), dim=-1))
            maps.append(F.interpolate(sc.view(n, 1, gh, gw), size=(h, w), mode="bilinear", align_corners=False)[:, 0])
        return torch.stack(maps).mean(0)

    def forward(self, images: torch.Tensor, class_names: list[str]) -> InferenceBatch:
        """-> image score = the map's maximum, the map, and the map again as the one stage map."""
        amap = _blur(self.raw_map(images)).clamp(0, 1)
        return InferenceBatch(amap.flatten(1).amax(1), amap, amap[:, None])


def method_info(method: str, backbone: str | None, image_size: int) -> dict:
    """What metrics.json records under "method"."""
    from kano.evaluator.report import baseline_method

    spec = REGISTRY[method]
    return baseline_method(method, spec.kind, backbone if "backbone" in spec.needs else None,
                           setting="transductive" if spec.transductive else "per-image",
                           parameters="frozen backbone, no training" if "backbone" in spec.needs else "none (zero-parameter)",
                           image_size=image_size)


def load_baseline(method: str, run, backbone: str | None, image_size: int | None, device: torch.device, **_):
    """-> (ZeroParameterDetector, info) for `kano eval --method`; the same info keys as `load_model` (load_method has
    checked the sources: a backbone exactly for the entries that need one)."""
    if method not in METHODS:
        raise KanoError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    bb = None
    if backbone:
        from kano.kanoclip import build_backbone

        bb = build_backbone(backbone, image_size=image_size, device=device)
    model = ZeroParameterDetector(method, image_size or 128, bb, device).eval()
    return model, {"run": None, "backbone": backbone, "threshold": None, "prompt_names": {},
                   "method": method_info(method, backbone, model.backbone.image_size)}
