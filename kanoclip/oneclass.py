"""Kano's own one-class detector (`kano train --method oneclass`): what normal looks like, learnt from a person's own
good photos at their native resolution. A pure nn.Module; the fit (`OneClass.fit`) reads batches the trainer gives.

Parts (each default below names its source; "Kano's own" where it has none):

1. Feature banks that need no pretraining, per cell of `cell` x `cell` working pixels with stride cell / 2 (the
   photo is scored at its own side S, so a defect of 1 % of a 1024-px photo's side still fills most of a 16-px cell):
   mean R, G, B; log local contrast (the standard deviation of the luminance); log gradient energy (Sobel) at
   scales 1, 2, 4 (2x2 and 4x4 averaged luminance); the gradient's orientation (the structure tensor's two
   anisotropy terms over its trace); log high-frequency energy (luminance minus its 3x3 mean, squared) at scales 1,
   2, 4. Twelve numbers per cell. The logs make a contrast, blur or noise change, which multiplies energies,
   shift them additively, as a Gaussian expects. These are the issue's probe statistics (mean, contrast, gradient
   energy per photo and per 12-pixel patch) widened to colour, orientation and three scales.
2. With a backbone (`--backbone micro`, or a CLIP), its patch tokens too: the photo cut into tiles of the
   encoder's own input side (no resize: native resolution), tokens of two middle stages (PatchCore's choice of
   mid-level features, Roth et al. CVPR 2022), a seeded orthonormal projection to `encoder_dim` numbers, resampled
   to the cell grid. `--backbone none`: the pixel bank alone.
3. The patch model ("layout"): a mixture of up to `components` Gaussians over the cells of every normal photo
   ("mixture", the default: an object photo's cells are of several sorts, background, surface, edges, and one
   Gaussian makes its rare normal cells score like defects; components from k-means++ on a sample of cells
   whitened by the shared Gaussian), one Gaussian over all cells ("shared", plain textures), or one mean per cell
   position with a shared covariance of the residuals ("per-position", PaDiM's idea for aligned objects, Defard et
   al. ICPR 2020, with one covariance instead of one per position to keep memory at D x D). The map is the squared
   Mahalanobis distance per cell (the mixture's: the smallest d2 + log det - 2 log weight); the photo's patch score
   is log(1 + its maximum) (the probe's "image score = the worst patch").
4. The whole-image models: one Gaussian over the mean and the standard deviation over cells of every cell feature
   ("image"), and one over the photo's own twelve statistics (`photo_vector`: colour, contrast, gradient and
   high-frequency energy at three scales: brightness, colour cast, contrast loss, blur, noise, texture scale), both
   Ledoit-Wolf shrunk on the standardised vectors (kanoclip/one_class.py `ledoit_wolf`), score log(1 + squared Mahalanobis distance).
5. Standardisation without peeking: the normal photos are split into `folds` folds; each photo is scored by the
   models fitted on the other folds (out-of-fold), and each part's score is standardised by the mean and standard
   deviation of those out-of-fold scores. The photo's score is the largest standardised part, squashed into (0, 1)
   (one_class.squash); the map is the patch part's standardised map, squashed and bilinearly upsampled to S x S.
6. Choosing without peeking: the variants (cell 8 / 16 / 32 px, mixture / shared / per-position, pixel bank alone /
   with the backbone) are scored on the synthetic defects `kano data synth --from` wrote (each defect scored by the
   fold models that did not see the photo it was drawn on) against the out-of-fold normal photos; the best mean
   per-kind image AUROC replaces the default variant only when it wins by more than one defect's worth (1 / the
   number of synthetic defects, at least MARGIN). The table goes into the run.

Fitting keeps per-fold sums (moments for the shared Gaussian, per-position sums for the per-position one, the
whole-image vectors) and a bounded sample of cells for the mixture: memory K x (cells x D + D x D) + `reservoir` x D
per variant whatever the number of photos.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .one_class import FitData, Moments, OneClassModel, gaussian, ledoit_wolf, location_scale, mahalanobis_sq, shrunk_precision, squash
from .model import InferenceBatch

LAYOUTS = ("shared", "mixture", "per-position")
BANKS = ("pixels", "pixels+backbone")
PIXEL_DIM = 12
SCALES = (1, 2, 4)
MARGIN = 0.01                         # the least mean per-kind AUROC gain over the default that chooses another variant
PARTS = ("patch", "image", "photo")   # the standardised parts whose maximum is the photo's score
CACHE_BYTES = 1 << 30                 # features kept between the two fitting passes (else computed again)
EPS = 1e-4  # energy floor inside the logs: luminance is in [0, 1], Sobel / 8 is a per-pixel slope


@dataclass
class OneClassConfig:
    """Kano's oneclass defaults (Kano's own unless named): cell 16 working px (the issue's probe used 12; 16 keeps the
    three scales' pooling exact), stride cell / 2; 5 folds for the out-of-fold standardisation (the usual k of
    k-fold cross-validation); 16 projected backbone numbers; every variant tried when synthetic defects exist."""

    cell: int | None = None                   # None: 8 px below a 512-px working side, else 16
    layout: str = "mixture"
    banks: str = "auto"                       # auto: pixels+backbone with a backbone, else pixels
    choose: bool = True                       # choose among `cells` x LAYOUTS x banks on synthetic defects
    cells: tuple[int, ...] = (8, 16, 32)
    folds: int = 5
    encoder_dim: int = 16
    components: int = 8                       # the mixture layout's Gaussians (fewer when the sample is small)
    reservoir: int = 50000                    # cells sampled (evenly over the photos) for the mixture's k-means
    encoder_stages: tuple[int, ...] | None = None   # None: two middle blocks (depth/2, 3 depth/4)
    seed: int = 0

    def __post_init__(self):
        self.cells = tuple(int(c) for c in self.cells)
        if self.encoder_stages is not None:
            self.encoder_stages = tuple(int(s) for s in self.encoder_stages)
        for c in ((self.cell,) if self.cell is not None else ()) + self.cells:
            if isinstance(c, bool) or not isinstance(c, int) or c < 8 or c % 8:
                raise ValueError(f"cell sizes must be multiples of 8 px (>= 8: three scales pool evenly), got {c!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if self.banks not in ("auto", *BANKS):
            raise ValueError(f"banks must be one of auto, {', '.join(BANKS)}, got {self.banks!r}")
        if not isinstance(self.folds, int) or self.folds < 2:
            raise ValueError(f"folds must be an integer >= 2, got {self.folds!r}")
        if not isinstance(self.components, int) or self.components < 1:
            raise ValueError(f"components must be an integer >= 1, got {self.components!r}")
        if not isinstance(self.reservoir, int) or self.reservoir < 1000:
            raise ValueError(f"reservoir must be an integer >= 1000 (cells sampled for the mixture), got {self.reservoir!r}")
        if not isinstance(self.encoder_dim, int) or self.encoder_dim < 1:
            raise ValueError(f"encoder_dim must be an integer >= 1, got {self.encoder_dim!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["cells"] = list(self.cells)
        d["encoder_stages"] = list(self.encoder_stages) if self.encoder_stages is not None else None
        return d


# ------------------------------------------------------------------------------------------ feature banks
_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8.0


def _grad(lum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """lum (N, 1, H, W) -> Sobel slopes gx, gy (N, 1, H, W) (replicated border)."""
    k = torch.stack([_SOBEL_X, _SOBEL_X.T]).unsqueeze(1).to(lum)
    g = F.conv2d(F.pad(lum, (1, 1, 1, 1), mode="replicate"), k)
    return g[:, :1], g[:, 1:]


def _highpass(lum: torch.Tensor) -> torch.Tensor:
    """(lum - its 3x3 mean)^2, (N, 1, H, W)."""
    return (lum - F.avg_pool2d(F.pad(lum, (1, 1, 1, 1), mode="replicate"), 3, 1)) ** 2


def pixel_maps(x: torch.Tensor) -> dict[int, torch.Tensor]:
    """x (N, 3, S, S) RGB in [0, 1] -> per scale s (1, 2, 4) the per-pixel maps that the cells average:
    s=1: (N, 9, S, S) = R, G, B, L, L^2, gradient energy, gx^2 - gy^2, 2 gx gy, high-frequency energy;
    s=2, 4: (N, 2, S/s, S/s) = gradient energy, high-frequency energy of the s x s averaged luminance."""
    lum = (0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    out = {}
    gx, gy = _grad(lum)
    out[1] = torch.cat([x, lum, lum * lum, gx * gx + gy * gy, gx * gx - gy * gy, 2 * gx * gy, _highpass(lum)], 1)
    for s in SCALES[1:]:
        ls = F.avg_pool2d(lum, s)
        gx, gy = _grad(ls)
        out[s] = torch.cat([gx * gx + gy * gy, _highpass(ls)], 1)
    return out


def photo_vector(x: torch.Tensor, maps: dict[int, torch.Tensor]) -> torch.Tensor:
    """The whole photo's own statistics (N, 12): mean R, G, B; log standard deviation of R, G, B (contrast); log mean
    gradient energy and log mean high-frequency energy at scales 1, 2, 4 (blur, noise, texture scale). Means over the
    photo before the log, so that flat regions (whose log-energies are sensor noise) do not drown the textured ones."""
    m = [maps[s].mean((2, 3)) for s in SCALES]
    logstd = torch.log(x.flatten(2).std(2) + EPS)
    energy = torch.stack([m[0][:, 5], m[1][:, 0], m[2][:, 0]], 1)
    hf = torch.stack([m[0][:, 8], m[1][:, 1], m[2][:, 1]], 1)
    return torch.cat([m[0][:, 0:3], logstd, torch.log(energy + EPS), torch.log(hf + EPS)], 1)


def pixel_cells(maps: dict[int, torch.Tensor], cell: int) -> torch.Tensor:
    """The twelve cell features (module docstring, part 1) on the grid of `cell`-px cells, stride cell/2:
    (N, 12, G, G), G = (S - cell) / (cell / 2) + 1."""
    m1 = F.avg_pool2d(maps[1], cell, cell // 2)
    rgb, mu, mu2, energy, aniso = m1[:, 0:3], m1[:, 3:4], m1[:, 4:5], m1[:, 5:6], m1[:, 6:8]
    contrast = torch.log((mu2 - mu * mu).clamp_min(0.0) + EPS) * 0.5
    feats = [rgb, contrast, torch.log(energy + EPS)]
    hf = [torch.log(m1[:, 8:9] + EPS)]
    for s in SCALES[1:]:
        ms = F.avg_pool2d(maps[s], cell // s, cell // (2 * s))
        feats.append(torch.log(ms[:, 0:1] + EPS))
        hf.append(torch.log(ms[:, 1:2] + EPS))
    feats.append(aniso / (energy + EPS))
    return torch.cat(feats + hf, 1)


class OneClass(OneClassModel):
    """Kano's oneclass (module docstring). images (N, 3, S, S), RGB in [0, 1] -> InferenceBatch (image_score (N,),
    anomaly_map (N, S, S), stage_maps (N, 1, G, G): the patch part's squashed standardised map)."""

    method = "oneclass"
    default_image_size = 256
    input_mean = (0.0, 0.0, 0.0)   # raw RGB in [0, 1]; the backbone's own normalisation is applied inside
    input_std = (1.0, 1.0, 1.0)

    def __init__(self, encoder, cfg: OneClassConfig | None = None, image_size: int = 256):
        super().__init__(encoder, cfg or OneClassConfig(), image_size)
        if image_size % 8:
            raise ValueError(f"image_size must be a multiple of 8 (the three scales and the cells pool evenly), got {image_size}")
        if encoder is not None:
            depth = encoder.depth
            stages = list(self.cfg.encoder_stages or sorted({max(1, depth // 2), max(1, (3 * depth) // 4)}))
            encoder.set_layers(stages, encoder.vv_start)
            self.register_buffer("enc_mean", torch.tensor(encoder.mean).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("enc_std", torch.tensor(encoder.std).view(1, 3, 1, 1), persistent=False)
        # the variant in use; `fit` may change it, a run's config.json restores it (cfg.cell / cfg.layout / cfg.banks)
        self.cell = self.cfg.cell or (8 if image_size < 512 else 16)
        self.layout = self.cfg.layout
        self.banks = self.cfg.banks if self.cfg.banks != "auto" else ("pixels+backbone" if encoder is not None else "pixels")
        if self.banks == "pixels+backbone" and encoder is None:
            raise ValueError("banks pixels+backbone needs a backbone, got --backbone none")
        if self.cell > image_size:
            raise ValueError(f"cell must be at most the image size {image_size}, got {self.cell}")

    @staticmethod
    def choose_image_size(sides: list[int], max_side: int = 1024) -> int:
        """The working side: the photos' median long side, rounded to a multiple of 8, in [64, max_side]."""
        med = sorted(sides)[len(sides) // 2]
        return int(min(max_side, max(64, 8 * round(med / 8))))

    def fitted_names(self) -> tuple[str, ...]:
        names = ["patch_mean", "patch_precision", "patch_offset", "image_mean", "image_precision", "photo_mean", "photo_precision", "standardise"]
        return tuple(names + (["enc_proj"] if self.banks == "pixels+backbone" else []))

    # -------------------------------------------------------------------------------------- features
    def grid(self, cell: int | None = None) -> int:
        c = cell or self.cell
        return (self.image_size - c) // (c // 2) + 1

    def encoder_map(self, x: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
        """x (N, 3, S, S) in [0, 1] -> the backbone's projected tokens (N, k, S/4, S/4): tiles of the encoder's side T
        (the photo padded by replication to a multiple of T), the chosen stages' raw tokens concatenated, times
        `proj` (stages x width, k), resampled bilinearly to S/4."""
        enc = self.encoder
        t, p, n, s = enc.image_size, enc.patch_size, x.shape[0], self.image_size
        nt = -(-s // t)
        xp = F.pad((x - self.enc_mean) / self.enc_std, (0, nt * t - s, 0, nt * t - s), mode="replicate")
        tiles = xp.reshape(n, 3, nt, t, nt, t).permute(0, 2, 4, 1, 3, 5).reshape(n * nt * nt, 3, t, t)
        feats = enc(tiles, vv=False, raw=True).patch_tokens                       # each (n nt nt, g g, width)
        tok = torch.cat([f.float() for f in feats], -1) @ proj                   # (n nt nt, g g, k)
        g = t // p
        k = tok.shape[-1]
        tok = tok.reshape(n, nt, nt, g, g, k).permute(0, 5, 1, 3, 2, 4).reshape(n, k, nt * g, nt * g)
        tok = tok[:, :, : s // p, : s // p]
        return F.interpolate(tok, size=(s // 4, s // 4), mode="bilinear", align_corners=False)

    def cell_features(self, x: torch.Tensor, cells: tuple[int, ...], banks: str, proj: torch.Tensor | None = None,
                      maps: dict | None = None, enc: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
        """x (N, 3, S, S) -> {cell: (N, G, G, D)} the cell features of `banks` (D = 12, or 12 + k with the backbone)."""
        maps = maps if maps is not None else pixel_maps(x)
        if banks == "pixels+backbone" and enc is None:
            enc = self.encoder_map(x, proj)
        out = {}
        for c in cells:
            f = pixel_cells(maps, c)
            if banks == "pixels+backbone":
                f = torch.cat([f, F.avg_pool2d(enc, c // 4, c // 8)], 1)
            out[c] = f.permute(0, 2, 3, 1)
        return out

    @staticmethod
    def image_vector(f: torch.Tensor) -> torch.Tensor:
        """(N, G, G, D) cell features -> (N, 2D): their mean and standard deviation over the cells."""
        flat = f.flatten(1, 2)
        return torch.cat([flat.mean(1), flat.std(1)], 1)

    # -------------------------------------------------------------------------------------- scoring
    def forward(self, images: torch.Tensor, class_names: list[str] | None = None) -> InferenceBatch:
        x = images.float()
        proj = self.enc_proj if self.banks == "pixels+backbone" else None
        maps = pixel_maps(x)
        f = self.cell_features(x, (self.cell,), self.banks, proj, maps=maps)[self.cell]   # (N, G, G, D)
        d2 = patch_distance(f, self.patch_mean, self.patch_precision, self.patch_offset, self.layout)   # (N, G, G)
        r_img = torch.log1p(mahalanobis_sq(self.image_vector(f), self.image_mean, self.image_precision).clamp_min(0.0))
        r_photo = torch.log1p(mahalanobis_sq(photo_vector(x, maps), self.photo_mean, self.photo_precision).clamp_min(0.0))
        st = self.standardise                                       # (6,): location, scale of patch, image, photo
        zmap = (torch.log1p(d2.clamp_min(0.0)) - st[0]) / st[1]
        z = torch.stack([zmap.flatten(1).amax(1), (r_img - st[2]) / st[3], (r_photo - st[4]) / st[5]], 1)
        score = squash(z.amax(1))
        grid = squash(zmap).unsqueeze(1)
        amap = F.interpolate(grid, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)[:, 0]
        return InferenceBatch(score, amap, grid)

    def describe(self) -> dict:
        return {**super().describe(), "cell": self.cell, "stride": self.cell // 2, "layout": self.layout, "banks": self.banks,
                "grid": self.grid(), "parts": list(PARTS),
                "feature_dim": int(self.patch_precision.shape[0]) if hasattr(self, "patch_precision") else None}

    # -------------------------------------------------------------------------------------- fitting
    def fit(self, data: FitData) -> dict:
        """Fit every candidate variant in two passes over the normal photos (sums per fold, then out-of-fold scores),
        score the synthetic defects when there are some, keep the best variant (module docstring, parts 5-6)."""
        cfg = self.cfg
        n = data.n_good
        k = min(cfg.folds, n)
        fold = torch.arange(n) % k                                   # photo i is in fold i mod k
        has_enc = self.encoder is not None
        has_val = cfg.choose and data.validation() is not None
        banks = list(BANKS) if (has_val and cfg.banks == "auto" and has_enc) else [self.banks]
        cells = tuple(dict.fromkeys((self.cell, *(c for c in cfg.cells if c <= self.image_size)))) if has_val else (self.cell,)
        layouts = LAYOUTS if has_val else (self.layout,)
        proj = None
        if has_enc:
            width = self.encoder.width * len(self.encoder.stages)
            gen = torch.Generator().manual_seed(cfg.seed)
            q, _ = torch.linalg.qr(torch.randn(width, cfg.encoder_dim, generator=gen, dtype=torch.float64))
            proj = q.float().to(self.backbone.device)
        variants = [(c, b) for b in banks for c in cells]
        # pass 1: per fold, per (cell, banks): shared moments, per-position sums; each photo's image and photo vectors.
        # The features are kept for pass 2 while they fit in CACHE_BYTES (else computed again).
        sums: dict = {}
        reservoir: dict = {v: [] for v in variants}
        per_photo = max(16, cfg.reservoir // n)
        rgen = torch.Generator().manual_seed(cfg.seed)
        gvec: dict = {v: [None] * n for v in variants}
        pvec: list = [None] * n
        cache, cached_bytes = [], 0
        for x, idx in data.good():
            x = x.to(self.backbone.device).float()
            feats, photo = self._features(x, cells, banks, proj)
            nbytes = sum(f.numel() * 4 for f in feats.values())
            if cache is not None and cached_bytes + nbytes <= CACHE_BYTES:
                cache.append((feats, photo, idx))
                cached_bytes += nbytes
            else:
                cache = None
            for j, i in enumerate(idx.tolist()):
                pvec[i] = photo[j].double().cpu()
            for (c, b), f in feats.items():
                f64 = f.double().cpu()
                for j, i in enumerate(idx.tolist()):
                    key = ((c, b), int(fold[i]))
                    if key not in sums:
                        sums[key] = [Moments(f.shape[-1]), torch.zeros(f.shape[1:], dtype=torch.float64), 0]
                    sums[key][0].add(f64[j])
                    sums[key][1] += f64[j]
                    sums[key][2] += 1
                    gvec[(c, b)][i] = self.image_vector(f[j:j + 1]).double().cpu()[0]
                    if "mixture" in layouts:
                        cells_j = f64[j].reshape(-1, f.shape[-1])
                        pick = torch.randperm(cells_j.shape[0], generator=rgen)[:per_photo]
                        reservoir[(c, b)].append((cells_j[pick], i))
        complete = cache is not None and sum(len(c[2]) for c in cache) == n
        models = {}
        for v in variants:
            clusters = self._clusters(reservoir[v], sums, v, k) if "mixture" in layouts else None
            for layout in layouts:
                models[(v, layout)] = [self._fit_parts(v, layout, sums, gvec, pvec, k, fold, held, clusters)
                                       for held in [*range(k), None]]
        # pass 2: out-of-fold scores of the normal photos; then the synthetic defects, by the folds that did not see
        # the photo each was drawn on
        oof = {key: torch.zeros(n, len(PARTS), dtype=torch.float64) for key in models}
        second = cache if complete else ((*self._features(x.to(self.backbone.device).float(), cells, banks, proj), idx)
                                         for x, idx in data.good())
        for feats, photo, idx in second:
            for (v, layout), fits in models.items():
                for j, i in enumerate(idx.tolist()):
                    oof[(v, layout)][i] = self._raw(feats[v][j:j + 1], photo[j:j + 1], fits[int(fold[i])])[0]
        del cache, second
        val_scores = {key: [] for key in models}
        kinds: list[str] = []
        if has_val:
            for x, labels, kind, src in data.validation():
                feats, photo = self._features(x.to(self.backbone.device).float(), cells, banks, proj)
                kinds += list(kind)
                for (v, layout), fits in models.items():
                    for j, s in enumerate(src.tolist()):
                        fit = fits[int(fold[s])] if s >= 0 else fits[k]
                        val_scores[(v, layout)].append(self._raw(feats[v][j:j + 1], photo[j:j + 1], fit)[0])
        rows, best, default = [], None, ((self.cell, self.banks), self.layout)
        keys = {}
        for (v, layout) in models:
            st = self._standardisation(oof[(v, layout)])
            z_good = self._combine(oof[(v, layout)], st)
            row = {"cell": v[0], "layout": layout, "banks": v[1]}
            if has_val and val_scores[(v, layout)]:
                z_bad = self._combine(torch.stack(val_scores[(v, layout)]), st)
                per_kind = {kd: auroc(z_good, z_bad[[i for i, q in enumerate(kinds) if q == kd]]) for kd in dict.fromkeys(kinds)}
                row.update({"image_auroc": round(auroc(z_good, z_bad), 4),
                            "mean_kind_auroc": round(sum(per_kind.values()) / len(per_kind), 4),
                            "worst_kind": min(per_kind, key=per_kind.get), "worst_kind_auroc": round(min(per_kind.values()), 4)})
                row["_z_bad"] = z_bad
                key = keys[(v, layout)] = (row["mean_kind_auroc"], row["image_auroc"])
                if best is None or key > best[0]:
                    best = (key, (v, layout))
            row["_z_good"] = z_good
            rows.append(row)
        # another variant replaces the default only when it wins by more than one defect's worth: one defect moving
        # from the bottom to the top of its kind's ranking changes the mean per-kind AUROC by 1 / (number of defects)
        margin = max(MARGIN, 1.0 / max(len(kinds), 1))
        chosen = best[1] if best and best[0][0] > keys[default][0] + margin else default
        (self.cell, self.banks), self.layout = chosen
        self.cfg.cell, self.cfg.layout, self.cfg.banks = self.cell, self.layout, self.banks
        full = models[chosen][k]
        st = self._standardisation(oof[chosen])
        for name in ("patch_mean", "patch_precision", "patch_offset", "image_mean", "image_precision", "photo_mean", "photo_precision"):
            self.register_fitted(name, full[name].float())
        self.register_fitted("standardise", torch.tensor(st, dtype=torch.float32))
        if self.banks == "pixels+backbone":
            self.register_fitted("enc_proj", proj.float())
        info = {"variant": {"cell": self.cell, "layout": self.layout, "banks": self.banks}, "folds": k,
                "chosen_on": "synthetic defects (data synth --from), out-of-fold" if has_val else
                             "no synthetic defects: the configured variant",
                "standardisation": {p: {"location": st[2 * i], "scale": st[2 * i + 1]} for i, p in enumerate(PARTS)},
                "features_cached": bool(complete), "default": {"cell": default[0][0], "layout": default[1],
                                                               "banks": default[0][1]},
                "margin": max(MARGIN, 1.0 / max(len(kinds), 1)) if has_val else None}
        if has_val:
            info["variants"] = [{**{k2: v2 for k2, v2 in r.items() if not k2.startswith("_")},
                                 "chosen": ((r["cell"], r["banks"]), r["layout"]) == chosen} for r in rows]
            crow = next(r for r in rows if ((r["cell"], r["banks"]), r["layout"]) == chosen)
            scores = torch.cat([squash(crow["_z_good"]), squash(crow["_z_bad"])])
            info["validation_scores"] = {"labels": [0] * n + [1] * len(kinds), "scores": [round(float(s), 7) for s in scores],
                                         "kinds": ["good"] * n + kinds}
            data.log(f"chose cell {self.cell} px, {self.layout}, {self.banks}: image AUROC {crow['image_auroc']:.4f} on "
                     f"{len(kinds)} synthetic defects (mean per kind {crow['mean_kind_auroc']:.4f}, worst {crow['worst_kind']} "
                     f"{crow['worst_kind_auroc']:.4f})")
        return info

    def _features(self, x, cells, banks, proj) -> tuple[dict, torch.Tensor]:
        """-> ({(cell, banks): (N, G, G, D)}, photo vectors (N, 12)): one feature pass serves every variant."""
        maps = pixel_maps(x)
        enc = self.encoder_map(x, proj) if "pixels+backbone" in banks else None
        out = {}
        for b in banks:
            for c, f in self.cell_features(x, cells, b, proj, maps=maps, enc=enc).items():
                out[(c, b)] = f
        return out, photo_vector(x, maps)

    def _clusters(self, samples: list, sums: dict, v, k: int):
        """k-means of the sampled cells in the whitened space of the shared Gaussian (all photos) -> (cells (M, D),
        their photo (M,), their component (M,), K). K = components, fewer when under 20 D cells per component."""
        x = torch.cat([c for c, _ in samples])
        owner = torch.cat([torch.full((len(c),), i, dtype=torch.long) for c, i in samples])
        d = x.shape[1]
        kk = max(1, min(self.cfg.components, x.shape[0] // (20 * d)))
        total = sums[(v, 0)][0]
        for q in range(1, k):
            total = total + sums[(v, q)][0]
        mean, prec = gaussian(total, shrinkage=0.0)
        y = (x - mean) @ torch.linalg.cholesky(prec)
        return x, owner, kmeans(y, kk, self.cfg.seed), kk

    def _fit_parts(self, v, layout, sums, gvec, pvec, k, fold, held, clusters=None) -> dict:
        """The patch, image and photo Gaussians of variant v from every fold but `held` (None: all folds)."""
        keep = [q for q in range(k) if q != held]
        mom = sums[(v, keep[0])][0]
        pos, cnt = sums[(v, keep[0])][1].clone(), sums[(v, keep[0])][2]
        for q in keep[1:]:
            mom = mom + sums[(v, q)][0]
            pos += sums[(v, q)][1]
            cnt += sums[(v, q)][2]
        offset = torch.zeros(1, dtype=torch.float64)
        if layout == "shared":
            mean, prec = gaussian(mom, shrinkage=0.0)
            mean, prec = mean[None], prec[None]
        elif layout == "mixture":
            x, owner, label, kk = clusters
            keep_rows = torch.ones(len(owner), dtype=torch.bool) if held is None else (fold[owner] != held)
            means, precs, costs = [], [], []
            for c in range(kk):
                rows = keep_rows & (label == c)
                if int(rows.sum()) < x.shape[1] + 2:            # too few cells of this component in this fold
                    continue
                mc, pc = gaussian(Moments.of(x[rows]))
                means.append(mc)
                precs.append(pc)
                # negative log-likelihood up to a constant: d2 + log det(cov) - 2 log(weight)
                costs.append(-torch.linalg.slogdet(pc)[1] - 2.0 * math.log(float(rows.sum()) / float(keep_rows.sum())))
            mean, prec = torch.stack(means), torch.stack(precs)
            costs = torch.stack(costs)
            offset = costs - costs.min()
        else:
            mean = pos / cnt                                                   # (G, G, D) per-position mean
            flat = mean.reshape(-1, mean.shape[-1])
            # residual scatter: sum over photos and positions of (f - mu_pos)(f - mu_pos)^T = S2 - n sum_pos mu mu^T
            scatter = mom.s2 - cnt * flat.T @ flat
            prec = shrunk_precision(scatter / max(mom.n - flat.shape[0], 1.0), 0.0)  # dof: samples - position means
        rows = [i for i in range(len(fold)) if held is None or int(fold[i]) != held]
        gm, gp, _ = ledoit_wolf(torch.stack([gvec[v][i] for i in rows]))
        pm, pp, _ = ledoit_wolf(torch.stack([pvec[i] for i in rows]))
        return {"patch_mean": mean, "patch_precision": prec, "patch_offset": offset, "image_mean": gm, "image_precision": gp,
                "photo_mean": pm, "photo_precision": pp}

    @staticmethod
    def _raw(f: torch.Tensor, photo: torch.Tensor, fits: dict) -> torch.Tensor:
        """(1, G, G, D), (1, 12) -> (1, 3) raw part scores, float64: log(1 + the worst cell's d2), log(1 + d2) of the
        image vector and of the photo vector."""
        f = f.double().cpu()
        d2 = patch_distance(f, fits["patch_mean"], fits["patch_precision"], fits["patch_offset"],
                            "per-position" if fits["patch_precision"].dim() == 2 else "shared")
        gi = mahalanobis_sq(OneClass.image_vector(f), fits["image_mean"], fits["image_precision"])
        ph = mahalanobis_sq(photo.double().cpu(), fits["photo_mean"], fits["photo_precision"])
        return torch.stack([torch.log1p(d2.flatten(1).amax(1).clamp_min(0)), torch.log1p(gi.clamp_min(0)),
                            torch.log1p(ph.clamp_min(0))], 1)

    @staticmethod
    def _standardisation(raw: torch.Tensor) -> list[float]:
        """(n, 3) out-of-fold raw scores -> [location, scale] of each part, flattened (6,)."""
        return [v for p in range(raw.shape[1]) for v in location_scale(raw[:, p].tolist())]

    @staticmethod
    def _combine(raw: torch.Tensor, st: list[float]) -> torch.Tensor:
        """(M, 3) raw part scores -> (M,) the largest standardised part."""
        loc = torch.tensor(st[0::2], dtype=raw.dtype)
        scale = torch.tensor(st[1::2], dtype=raw.dtype)
        return ((raw - loc) / scale).amax(1)


def patch_distance(f: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor, offset: torch.Tensor, layout: str) -> torch.Tensor:
    """Cell features f (N, G, G, D) -> (N, G, G): per-position, the squared Mahalanobis distance to the cell's own mean
    (mean (G, G, D), precision (D, D)); shared and mixture, the smallest over the K Gaussians (mean (K, D), precision
    (K, D, D)) of d2 + offset_k (offset: log det(cov_k) - 2 log(weight_k) less its minimum; 0 for one Gaussian)."""
    if layout == "per-position":
        return mahalanobis_sq(f, mean, precision)
    best = None
    for c in range(mean.shape[0]):
        d = mahalanobis_sq(f, mean[c], precision[c]) + offset[c]
        best = d if best is None else torch.minimum(best, d)
    return best


def kmeans(y: torch.Tensor, k: int, seed: int, iters: int = 20) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding (Arthur and Vassilvitskii, 2007), seeded: y (M, D) -> labels (M,)."""
    g = torch.Generator().manual_seed(seed)
    centres = y[torch.randint(len(y), (1,), generator=g)]
    for _ in range(1, k):
        d = torch.cdist(y, centres).amin(1) ** 2
        centres = torch.cat([centres, y[torch.multinomial(d / d.sum(), 1, generator=g)]])
    for _ in range(iters):
        label = torch.cdist(y, centres).argmin(1)
        for c in range(k):
            if bool((label == c).any()):
                centres[c] = y[label == c].mean(0)
    return torch.cdist(y, centres).argmin(1)


def auroc(neg: torch.Tensor, pos: torch.Tensor) -> float:
    """Mann-Whitney image AUROC of positives over negatives, ties counted half (nan when either side is empty)."""
    if len(neg) == 0 or len(pos) == 0:
        return math.nan
    neg, pos = neg.double().reshape(1, -1), pos.double().reshape(-1, 1)
    return float(((pos > neg).double() + 0.5 * (pos == neg).double()).mean())
