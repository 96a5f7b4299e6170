"""`kano eval --method NAME`: a method of the registry (kanoclip/registry.py) built by the loader its entry names.

- zero-parameter and transductive floors (`evaluator/baselines.py`), the untrained KAnoCLIP
  (`evaluator/loading.py`), the zero-shot CLIP methods (`kanoclip/winclip.py`), full MuSc (`kanoclip/musc.py`)
  and the retrieval memory (`kanoclip/retrieval.py`); trained methods come from a run (`--run`);
- `with_mutual`: `kano eval --mutual`, any per-image method with a backbone fused with MuSc on that backbone.

`load_method(method, run, backbone, image_size, device)` -> (model, info), the same info keys as
`evaluator.loading.load_model`; info["method"] is what metrics.json records as provenance "method".
"""

from __future__ import annotations

import torch

from kano.core.errors import KanoError
from kano.kanoclip.registry import METHODS, method_spec, methods_with

ALL_METHODS = tuple(METHODS)  # every name --method accepts (trained ones point to --run)
BACKBONE_METHODS = methods_with(needs="backbone")  # the ones --backbone feeds
MEMORY_METHODS = methods_with(needs="aux")
ZERO_SHOT_METHODS = methods_with(kind="zero-shot")
REFERENCE_METHODS = methods_with(references=True)  # the methods that take normal reference images (--reference, --k-shot)


def zero_shot_info(model, method: str, backbone: str) -> dict:
    """The provenance "method" of a built zero-shot model (CLIPZeroShot or WinCLIP)."""
    from kano.kanoclip import winclip as W

    info = {"kind": "zero-shot", "name": method, "backbone": backbone, "setting": "per-image",
            "parameters": "frozen backbone, no training", "source": METHODS[method].source,
            "image_size": model.backbone.image_size}
    if method == "clip":
        info["prompts"] = {"normal": W.CLIP_PROMPTS[0][0].format("[class]"), "anomalous": W.CLIP_PROMPTS[1][0].format("[class]")}
    elif method == "clip-ac":
        info["prompts"] = {"normal": "normal [class]", "anomalous": "anomalous [class]",
                           "templates": len(W.WINCLIP_TEMPLATES), "ensemble": "text features averaged per state"}
    else:
        info["prompts"] = {"normal_states": len(W.WINCLIP_NORMAL_STATES), "anomalous_states": len(W.WINCLIP_ANOMALOUS_STATES),
                           "templates": len(W.WINCLIP_TEMPLATES), "ensemble": "states x templates, text features averaged per state"}
        info.update(window_scales=list(model.cfg.scales), window_stride=model.cfg.stride, temperature=model.cfg.temperature)
    if method in ("clip", "clip-ac"):
        info["logit_scale"] = round(model.scale, 4)
        info["map"] = "last block's patch tokens (ln_post, proj) scored like the image, bilinear upsampling"
    else:
        info["map"] = "harmonic mean of the window scales' harmonic window aggregates and the image score, bilinear upsampling"
    return info


def load_zero_shot(method: str, run, backbone: str | None, image_size: int | None, device: torch.device | str = "cpu",
                   k_shot: int = 0, data: str | None = None, classes: list[str] | None = None, references=None, **_):
    """-> (CLIPZeroShot | WinCLIP in eval mode, info) for `kano eval --method clip|clip-ac|winclip`; k_shot > 0
    (winclip only): WinCLIP+ with k normal reference images per class from the train split of `data`, or, with
    `references` (a folder), its first k images for every class."""
    if references and not k_shot:
        raise KanoError(f"--reference {references} needs --k-shot K >= 1 (how many of its images to use), got --k-shot 0")
    if k_shot < 0:
        raise KanoError(f"--k-shot must be an integer >= 0 (0: zero-shot), got {k_shot}")
    if method not in ("clip", "clip-ac", "winclip"):
        raise KanoError(f"zero-shot CLIP --method must be one of clip, clip-ac, winclip, got {method!r}")
    if run:
        raise KanoError(f"--method {method} evaluates a zero-shot method on a frozen backbone: give --backbone SPEC, not --run, got --run {run}")
    if not backbone:
        raise KanoError(f"--method {method} needs --backbone SPEC (tiny, micro or MODEL:PRETRAINED)")
    from kano.anomaly_data import load_dataset
    from kano.kanoclip import build_backbone
    from kano.kanoclip.winclip import WinCLIPConfig, build_zero_shot

    bb = build_backbone(backbone, image_size=image_size, device=device)
    if method == "winclip":
        largest = max(WinCLIPConfig().scales)
        if bb.grid < largest:
            raise KanoError(f"--image-size for --method winclip must give a patch grid of at least {largest} x {largest} "
                            f"(its largest window), i.e. >= {largest * bb.patch_size} px with {bb.patch_size} px patches; "
                            f"got {bb.image_size} px -> {bb.grid} x {bb.grid}")
    model = build_zero_shot(method, bb)
    info = zero_shot_info(model, method, backbone)
    if k_shot and references:  # one folder of normal images serves every class
        refs, ref_files = reference_folder(references, k_shot, bb)
        names = classes or (list(load_dataset(data).classes) if data else [])
        model.reference_images, files = {c: refs for c in names}, {c: ref_files for c in names}
        model.reference_folder = refs
    elif k_shot:
        model.reference_images, files = reference_images(data, k_shot, bb, classes)
    if k_shot:
        where = str(references) if references else "each class's train split"
        info.update(name="winclip+", kind="few-shot", setting="few-shot", k_shot=k_shot, references=files,
                    source="Jeong et al., WinCLIP (CVPR 2023): WinCLIP+ with k normal reference images per class (the first "
                           f"k of {where}, sorted by path); memory rules as anomalib 2.7.0 WinClipModel",
                    parameters="frozen backbone, no training; a memory of k normal images per class")
    return model, {"run": None, "backbone": backbone, "threshold": None, "prompt_names": {}, "method": info}


def reference_images(data: str | None, k: int, bb, classes: list[str] | None = None) -> tuple[dict, dict]:
    """WinCLIP+'s references: the first k normal images (sorted by path) of each class's TRAIN split of `data`
    (never its test images). -> ({class: (k, 3, S, S) normalised}, {class: [file names]})."""
    from kano.anomaly_data import load_dataset

    if not data:
        raise KanoError("--k-shot needs --data KIND:PATH with a train split of normal images per class")
    ds = load_dataset(data)
    images, files = {}, {}
    for cls in classes or ds.classes:
        train = sorted((s for s in ds.samples("train", [cls]) if s.label == 0), key=lambda s: s.image_path)
        if len(train) < k:
            raise KanoError(f"--k-shot {k} needs {k} normal train images of class {cls} in {data}, got {len(train)}")
        images[cls] = _reference_tensor(train[:k], bb)
        files[cls] = [s.image_path for s in train[:k]]
    return images, files


def _reference_tensor(samples: list, bb) -> torch.Tensor:
    """Reference images as the model sees them: (k, 3, S, S), squash-resized and normalised like test images."""
    from kano.anomaly_data import SampleDataset, raise_batch_errors

    batch = [SampleDataset(samples, bb.image_size, bb.mean, bb.std)[i] for i in range(len(samples))]
    raise_batch_errors({"error": [b["error"] for b in batch]})
    return torch.stack([b["image"] for b in batch])


def reference_folder(folder, k: int, bb) -> tuple[torch.Tensor, list[str]]:
    """Reference normal images from a plain folder (`--reference DIR`): its first k images sorted by path.
    -> ((k, 3, S, S) normalised, [absolute paths])."""
    from pathlib import Path

    from kano.anomaly_data import Sample, list_images

    if k < 1:
        raise KanoError(f"--reference {folder} needs --k-shot K >= 1 (how many of its images to use), got --k-shot {k}")
    files = list_images(Path(folder))
    if len(files) < k:
        raise KanoError(f"--k-shot {k} needs {k} reference images in {folder}, got {len(files)}")
    samples = [Sample(str(f.resolve()), None, "reference", "good", 0, split="train") for f in files[:k]]
    return _reference_tensor(samples, bb), [s.image_path for s in samples]


def with_patch_memory(model, described: dict, k_shot: int, data: str | None = None, references=None,
                      classes: list[str] | None = None):
    """K-shot mode for a per-image model with a CLIP backbone (a trained run, the untrained model): April-GAN's
    memory of normal patches (kanoclip/fewshot.py). References: the first k images of `references` (a folder)
    for every class, else of each class's train split of `data`. -> (PatchMemory, its provenance)."""
    from kano.kanoclip.backbone import Backbone
    from kano.kanoclip.fewshot import FEWSHOT_SOURCE, PatchMemory

    if k_shot < 1:
        raise KanoError(f"--k-shot must be an integer >= 1 for the K-shot mode, got {k_shot}")
    if getattr(model, "transductive", False) or not isinstance(getattr(model, "backbone", None), Backbone):
        raise KanoError(f"--k-shot must go with a per-image model on a CLIP backbone (--run, --backbone, or --method winclip), "
                        f"got {described.get('name')}")
    bb = model.backbone
    wrapped = PatchMemory(model).eval()
    if references:
        refs, ref_files = reference_folder(references, k_shot, bb)
        from kano.anomaly_data import load_dataset

        names = classes or (list(load_dataset(data).classes) if data else [])
        wrapped.reference_images, files = {c: refs for c in names}, {c: ref_files for c in names}
    else:
        wrapped.reference_images, files = reference_images(data, k_shot, bb, classes)
    where = str(references) if references else "each class's train split"
    info = {**described, "setting": "few-shot", "k_shot": k_shot, "references": files,
            "few_shot": {"rule": f"April-GAN memory of the first {k_shot} images of {where}, sorted by path",
                         "source": FEWSHOT_SOURCE, "stages": list(bb.stages)}}
    return wrapped, info


def load_retrieval(method: str, run, backbone: str | None, image_size: int | None, device: torch.device | str,
                   aux: str | None = None, batch_size: int = 16, allow_missing_masks: bool = False, **_):
    """-> (PatchRetrieval, info) for `kano eval --method retrieval --backbone SPEC --aux KIND:PATH`: the memory
    is the auxiliary dataset's labelled patch and image features (its test split, masks required)."""
    if run:
        raise KanoError(f"--method retrieval builds its memory from --aux on a frozen --backbone: give no --run, got --run {run}")
    if not backbone:
        raise KanoError("--method retrieval needs --backbone SPEC (tiny, micro or MODEL:PRETRAINED)")
    if not aux:
        raise KanoError("--method retrieval needs --aux KIND:PATH: the labelled auxiliary data its memory is made of")
    from torch.utils.data import DataLoader

    from kano.anomaly_data import SampleDataset, load_dataset, raise_batch_errors
    from kano.kanoclip import build_backbone
    from kano.kanoclip.retrieval import PatchRetrieval, RetrievalConfig, build_memory

    ds = load_dataset(aux, missing_masks="warn" if allow_missing_masks else "error")
    samples = ds.samples("test")
    labels = {s.label for s in samples}
    if labels != {0, 1}:
        raise KanoError(f"--aux {aux} must hold normal and anomalous test images (with masks), got "
                        f"{'only normal' if labels == {0} else 'only anomalous' if labels == {1} else 'no'} images")
    bb = build_backbone(backbone, image_size=image_size, device=device)
    cfg = RetrievalConfig()
    loader = DataLoader(SampleDataset(samples, bb.image_size, bb.mean, bb.std), batch_size=batch_size, shuffle=False)

    def checked():
        for batch in loader:
            raise_batch_errors(batch)
            yield batch

    memory = build_memory(bb, checked(), cfg)
    if any(a.shape[0] == 0 for a in memory["abnormal_patches"]):
        raise KanoError(f"--aux {aux} must hold defect masks covering at least {cfg.defect_share:.0%} of some patch, got none")
    model = PatchRetrieval(bb, cfg=cfg, **memory).eval()
    info = {"kind": "memory", "name": "retrieval", "backbone": backbone, "setting": "per-image",
            "parameters": "frozen backbone, no training; a memory of labelled auxiliary features",
            "source": METHODS["retrieval"].source,
            "aux": aux, "image_size": bb.image_size, "k": cfg.k, "temperature": cfg.temperature, "sigma": cfg.sigma,
            "memory": {"normal_patches_per_stage": int(memory["normal_patches"][0].shape[0]),
                       "abnormal_patches_per_stage": [int(a.shape[0]) for a in memory["abnormal_patches"]],
                       "normal_images": int(memory["normal_images"].shape[0]),
                       "abnormal_images": int(memory["abnormal_images"].shape[0])}}
    return model, {"run": None, "backbone": backbone, "threshold": None, "prompt_names": {}, "method": info}


def musc_info(model, backbone: str) -> dict:
    """The provenance "method" of a built MuSc model."""
    return {"kind": "zero-shot", "name": "musc", "backbone": backbone, "setting": "transductive",
            "parameters": "frozen backbone, no training", "source": METHODS["musc"].source, "image_size": model.backbone.image_size,
            "constants": model.constants()}


def musc_windows(data: str | None, windows: list[int] | None) -> dict:
    """MuSc's RsCIN windows for `--data KIND:PATH`: the published ones for its kind, or `windows` (--rscin-windows)."""
    from kano.anomaly_data.readers import parse_data_spec
    from kano.kanoclip.musc import rscin_windows

    if windows:
        return {"k_list": tuple(windows), "k_source": "--rscin-windows"}
    k, source = rscin_windows(parse_data_spec(data)[0] if data else None)
    return {"k_list": k, "k_source": source}


def load_musc(method: str, run, backbone: str | None, image_size: int | None, device: torch.device | str = "cpu",
              data: str | None = None, rscin_windows: list[int] | None = None, **_):
    """-> (MuSc, info) for `kano eval --method musc --backbone SPEC` on `data` (KIND:PATH: its kind picks the RsCIN
    windows unless `rscin_windows` is given)."""
    if run:
        raise KanoError(f"--method musc scores the test set on a frozen backbone: give --backbone SPEC, not --run, got --run {run}")
    if not backbone:
        raise KanoError("--method musc needs --backbone SPEC (tiny, micro or MODEL:PRETRAINED)")
    from kano.kanoclip import build_backbone
    from kano.kanoclip.musc import MuSc

    # position embeddings resampled as MuSc's vendored open_clip does (kanoclip/pos_embed.py)
    bb = build_backbone(backbone, image_size=image_size, device=device, pos_resize="bicubic")
    model = MuSc(bb, **musc_windows(data, rscin_windows)).eval()
    return model, {"run": None, "backbone": backbone, "threshold": None, "prompt_names": {}, "method": musc_info(model, backbone)}


def with_mutual(model, described: dict, what: str, data: str | None = None, rscin_windows: list[int] | None = None):
    """`kano eval --mutual`: -> (MutualFusion of `model` and MuSc on model's own frozen backbone, its provenance).
    `what` names the method in errors (e.g. "--method median_colour", "--run runs/x"). MuSc's map enters at half
    its published scale, so that both halves of the fused mean are in [0, 1] (the fusion is Kano's own)."""
    from kano.kanoclip.backbone import Backbone
    from kano.kanoclip.musc import FUSION_RULE, MuSc, MutualFusion

    fits = ", ".join(m for m in BACKBONE_METHODS if METHODS[m].kind != "transductive")
    if model.transductive:
        raise KanoError(f"--mutual must go with a per-image method (--run, or --method {fits}), got {what}, "
                        "which is already transductive")
    if not isinstance(model.backbone, Backbone):
        raise KanoError(f"--mutual must go with a method that has a frozen backbone (--run, or --method {fits}), "
                        f"got {what}, which has none")
    musc = MuSc(model.backbone, map_scale=0.5, **musc_windows(data, rscin_windows)).eval()
    spec = described.get("backbone") or model.backbone.spec
    info = {**described, "setting": "transductive", "mutual": True, "fusion": FUSION_RULE,
            "musc": musc_info(musc, spec)}
    return MutualFusion(model, musc).eval(), info


def load_method(method: str, run, backbone: str | None, image_size: int | None, device: torch.device | str = "cpu",
                aux: str | None = None, allow_missing_masks: bool = False, k_shot: int = 0, data: str | None = None,
                classes: list[str] | None = None, references=None, rscin_windows: list[int] | None = None):
    """-> (model, info) for `kano eval --method NAME`: the loader the registry names for NAME."""
    spec = method_spec(method)
    if spec.kind in ("trained", "one-class"):
        raise KanoError(f"--method {method} is a {spec.kind} method: {'fit' if spec.kind == 'one-class' else 'train'} it with "
                        f"`kano train --method {method}` and evaluate the run with --run RUN_DIR (without --method)")
    if aux and "aux" not in spec.needs:
        raise KanoError(f"--aux is used by --method {', '.join(MEMORY_METHODS)} only, got --method {method} with --aux {aux}")
    if k_shot and not spec.references:
        with_refs = methods_with(references=True)
        raise KanoError(f"--k-shot is used by --method {', '.join(with_refs)} only (few-shot), got --method {method} "
                        f"with --k-shot {k_shot}")
    if references and not spec.references:
        raise KanoError(f"--reference is used by the methods that take reference images ({', '.join(REFERENCE_METHODS)}), "
                        f"got --method {method} with --reference {references}")
    return spec.loader()(method, run, backbone, image_size, device, aux=aux, allow_missing_masks=allow_missing_masks,
                         k_shot=k_shot, data=data, classes=classes, references=references, rscin_windows=rscin_windows)
