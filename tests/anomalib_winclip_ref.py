"""Reference outputs of anomalib's WinClipModel, run in the side venv that has anomalib (never imports Kano).

    python tests/anomalib_winclip_ref.py CONFIG.json WEIGHTS.safetensors IMAGES.safetensors CLASS OUT.safetensors [REFS.safetensors]

CONFIG.json is an open_clip model config (its file stem is the model name), WEIGHTS its state dict. anomalib
builds its CLIP by name from module constants: they are pointed at this model and file (its public knobs for
choosing a backbone). One call is adapted: anomalib 2.7.0 hands the window batch to open_clip's transformer
sequence-first (LND) while open_clip 3.x's transformer is batch-first, so the transformer is wrapped to
accept that layout for the window pass only (the full-image pass is untouched). OUT holds pred_score (N,),
anomaly_map (N, S, S) with that adaptation, and anomaly_map_unadapted (anomalib exactly as released).
With REFS (a tensor "images" of k normal reference images) the model is WinCLIP+, few-shot: `setup` is called
after the adaptation, so the references' windows are encoded the same way as the test images'.
"""

import sys
from pathlib import Path

import open_clip
import torch
from safetensors.torch import load_file, save_file


class SequenceFirstWindows(torch.nn.Module):
    """Runs the batch-first transformer on anomalib's window batch, which arrives sequence-first."""

    def __init__(self, inner, full_len):
        super().__init__()
        self.inner, self.full_len = inner, full_len

    def forward(self, x, attn_mask=None):
        if x.shape[1] == self.full_len:           # the full image, (N, 1 + L, W): as released
            return self.inner(x, attn_mask=attn_mask)
        assert x.shape[0] != self.full_len, "ambiguous layout: choose a batch size that keeps the passes apart"
        return self.inner(x.transpose(0, 1), attn_mask=attn_mask).transpose(0, 1)


def main():
    config, weights, images_file, class_name, out = sys.argv[1:6]
    import anomalib.models.image.winclip.torch_model as tm

    open_clip.add_model_config(config)
    tm.BACKBONE, tm.PRETRAINED = Path(config).stem, weights
    images = load_file(images_file)["images"]
    refs = load_file(sys.argv[6])["images"] if len(sys.argv) > 6 else None
    res = {}
    for adapted in (False, True):
        model = tm.WinClipModel(class_name=class_name).eval()
        if adapted:
            v = model.clip.visual
            v.transformer = SequenceFirstWindows(v.transformer, v.grid_size[0] * v.grid_size[1] + 1)
        if refs is not None:
            model.setup(reference_images=refs)
        with torch.no_grad():
            pred = model(images)
        key = "" if adapted else "_unadapted"
        res["pred_score" + key] = pred.pred_score.contiguous()
        res["anomaly_map" + key] = pred.anomaly_map.contiguous()
    save_file(res, out)


if __name__ == "__main__":
    main()
