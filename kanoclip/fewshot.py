"""A K-shot mode for any per-image model with a CLIP backbone (KAnoCLIP, April-GAN, AnomalyCLIP runs, the
untrained model): a memory of K normal reference images' patch features, as April-GAN publishes its
few-shot mode (Chen et al., "A Zero-/Few-Shot Anomaly Classification and Segmentation Method for CVPR 2023
VAND Workshop Challenge", github.com/ByChelsea/VAND-APRIL-GAN, test.py with few_shot.py).

From April-GAN:
- the memory holds, per stage, every patch token of every reference image, as the block wrote it (no
  `ln_post`, no projection; the original attention path, not a V-V stream); the stages are the model's own
  map stages;
- a test patch's distance is 1 - its largest cosine similarity to the memory of that stage; the (g, g)
  distance grid is upsampled bilinearly (align_corners=True) to the image size;
- the few-shot map is added to the model's map.
Departures, each so that one image is scored on its own and the map stays on the [0, 1] scale:
- April-GAN sums the stages' distance maps and the two maps; here the stages are averaged and the sum of the
  two maps is halved, (M + D) / 2, which ranks every pixel exactly as the sum does;
- April-GAN's image score is 0.5 (text probability + the map maximum min-max normalised over the class's
  whole test set), which needs the test set; here it is 0.5 (model image score + the fused map's maximum).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .model import InferenceBatch, backbone_autocast

FEWSHOT_SOURCE = ("Chen et al., April-GAN (CVPR 2023 VAND workshop), few-shot mode of github.com/ByChelsea/VAND-APRIL-GAN: "
                  "per-stage memory of the references' patch tokens, 1 - max cosine similarity, added to the map; departures "
                  "in kanoclip/fewshot.py (stages averaged, the fused map halved, image score without test-set normalisation)")


class PatchMemory(nn.Module):
    """`model` with a memory of normal reference patches per class word.

    Per class, `set_reference(word, images)` with images (k, 3, S, S) normalised stores one (k * L, W) unit
    tensor per stage (L = g * g patches). forward(images (N, 3, S, S), class words) -> InferenceBatch with
    anomaly_map (N, S, S) = (M + D) / 2, D the stage-averaged distance map, and image_score (N,) =
    (model score + max of that map) / 2."""

    transductive = False

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.backbone = model.backbone
        self._memory: dict[str, list[torch.Tensor]] = {}
        self._reference_images: dict[str, torch.Tensor] = {}

    def rename_references(self, names: dict[str, str]) -> None:
        """The references' classes renamed (old -> new; others kept), e.g. a folder to the class it holds."""
        if self._reference_images:
            self.set_references({names.get(c, c): v for c, v in self._reference_images.items()})

    def set_references(self, references: dict[str, torch.Tensor] | None) -> None:
        """Folder class -> its k normal reference images (k, 3, S, S), normalised as test images; each class's memory
        is built when that class begins (begin_class)."""
        self._reference_images = dict(references or {})
        self._memory = {}

    def _patches(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images (N, 3, S, S) -> per stage (N, L, W) float32 unit patch tokens, the original path's (a model with
        its own tokens for the memory, MVFA-AD's adapted ones, gives them by `query_tokens`)."""
        if hasattr(self.model, "query_tokens"):
            return self.model.query_tokens(images)
        with backbone_autocast(images.device):
            feats = self.backbone(images, vv=False, raw=True)
        return [F.normalize(t.float(), dim=-1) for t in feats.patch_tokens]

    @torch.no_grad()
    def set_reference(self, class_word: str, images: torch.Tensor) -> None:
        if hasattr(self.model, "reference_tokens"):  # the model's own memory rule (MVFA-AD: augmented views, class token)
            self._memory[class_word] = self.model.reference_tokens(images)
            return
        self._memory[class_word] = [t.flatten(0, 1) for t in self._patches(images)]

    def begin_class(self, folder_class: str, prompt_class: str) -> None:
        """The evaluator's per-class hook: that class's references (set_references)."""
        refs = self._reference_images
        if folder_class not in refs:
            raise ValueError(f"the K-shot mode needs reference images for class {folder_class}, got them for "
                             f"{', '.join(sorted(refs or {})) or 'none'}")
        self._memory = {}
        self.set_reference(prompt_class, refs[folder_class].to(self.backbone.device))
        if hasattr(self.model, "begin_class"):
            self.model.begin_class(folder_class, prompt_class)

    @torch.no_grad()
    def distance(self, images: torch.Tensor, class_names: list[str]) -> torch.Tensor:
        """(N, S, S): per stage 1 - max cosine similarity to the class's memory, upsampled, averaged over stages."""
        missing = sorted(set(class_names) - set(self._memory))
        if missing:
            raise ValueError(f"the K-shot mode needs reference images for every class, got none for {', '.join(missing)}")
        size = images.shape[-2:]
        stages = self._patches(images)
        out = torch.zeros(images.shape[0], *size, device=images.device)
        for c in sorted(set(class_names)):
            i = torch.tensor([j for j, name in enumerate(class_names) if name == c], device=images.device)
            maps = []
            for t, mem in zip(stages, self._memory[c]):
                d = 1 - (t[i] @ mem.T).amax(-1)                                         # (n, L)
                g = int(round(d.shape[1] ** 0.5))
                maps.append(F.interpolate(d.view(-1, 1, g, g), size=size, mode="bilinear", align_corners=True)[:, 0])
            out[i] = torch.stack(maps).mean(0)
        return out

    @torch.no_grad()
    def forward(self, images: torch.Tensor, class_names: list[str]) -> InferenceBatch:
        res = self.model(images, class_names).inference()
        fused = (res.anomaly_map.float() + self.distance(images, class_names)) / 2
        score = (res.image_score.float() + fused.flatten(1).amax(1)) / 2
        return InferenceBatch(score, fused, res.stage_maps)
