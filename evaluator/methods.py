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
from kano.kanoclip.registry import METHODS, check_given, methods_with



def zero_shot_info(model, method: str, backbone: str) -> dict:
    """The provenance "method" of a built zero-shot CLIP model (its module describes its prompts and map)."""
    return {"kind": METHODS[method].kind, "name": method, "method": method, "backbone": backbone, "setting": "per-image",
            "parameters": "frozen backbone, no training", "source": METHODS[method].source,
            "image_size": model.backbone.image_size, **model.describe()}


def load_zero_shot(method: str, run, backbone: str | None, image_size: int | None, device: torch.device | str = "cpu",
                   k_shot: int = 0, data: str | None = None, classes: list[str] | None = None, references=None,
                   sampling: str | None = None, **_):
    """-> (the zero-shot CLIP model of kanoclip/winclip.py in eval mode, info) for `kano eval --method NAME
    --backbone SPEC` (load_method has checked the sources); k_shot > 0 (the methods that take references):
    k normal reference images per class from the train split of `data`, or, with `references` (a folder), its
    first k images for every class, given to the model through `set_references`."""
    if references and not k_shot:
        raise KanoError(f"--reference {references} needs --k-shot K >= 1 (how many of its images to use), got --k-shot 0")
    if k_shot < 0:
        raise KanoError(f"--k-shot must be an integer >= 0 (0: zero-shot), got {k_shot}")
    from kano.anomaly_data import load_dataset
    from kano.kanoclip import build_backbone
    from kano.kanoclip.winclip import build_zero_shot

    bb = build_backbone(backbone, image_size=image_size, device=device)
    try:
        model = build_zero_shot(method, bb)
    except ValueError as exc:  # a window larger than the patch grid
        raise KanoError(f"--image-size for --method {method} {exc}") from None
    info = zero_shot_info(model, method, backbone)
    if k_shot and references:  # one folder of normal images serves every class
        refs, ref_files = reference_folder(references, k_shot, bb)
        names = classes or (list(load_dataset(data).classes) if data else [])
        model.set_references({c: refs for c in names})
        files = {c: ref_files for c in names}
    elif k_shot:
        images, files = reference_images(data, k_shot, bb, classes, sampling)
        model.set_references(images)
    if k_shot:
        where = str(references) if references else "each class's train split"
        info.update(model.describe_references(k_shot, where), setting="few-shot", k_shot=k_shot, references=files)
        if not references and sampling:  # the references were not the first k: say how they were drawn
            info.update(sampling=parse_sampling(sampling)[0], sampling_rule=sampling_rule(sampling))
    return model, {"run": None, "backbone": backbone, "threshold": None, "prompt_names": {}, "method": info}


REFERENCE_SAMPLING = ("first", "seeded")
# April-GAN's test.py:313-317 (--seed 10) and dataset.py:83 (torch.randint: k draws with replacement)
APRILGAN_REFERENCE_SEED = 10


def parse_sampling(raw: str | None) -> tuple[str, int | None]:
    """'first' | 'seeded' | 'seeded:N' (`--reference-sampling`) -> (rule, seed)."""
    rule, _, seed = (raw or "first").partition(":")
    if rule not in REFERENCE_SAMPLING or (rule == "first" and seed) or (seed and not seed.lstrip("-").isdigit()):
        raise KanoError(f"--reference-sampling must be first, seeded or seeded:SEED (an integer), got {raw!r}")
    return rule, (int(seed) if seed else APRILGAN_REFERENCE_SEED) if rule == "seeded" else None


def sampling_rule(raw: str | None) -> str:
    """The rule in words, for the records."""
    rule, seed = parse_sampling(raw)
    if rule == "first":
        return "the first k, sorted by path"
    return (f"k drawn with replacement (duplicates possible) by a torch generator seeded {seed}, as April-GAN's "
            "dataset.py:83 draws them (its test.py seeds 10)")


def reference_images(data: str | None, k: int, bb, classes: list[str] | None = None,
                     sampling: str | None = None) -> tuple[dict, dict]:
    """WinCLIP+'s references: k normal images of each class's TRAIN split of `data` (never its test images): the
    first k sorted by path, or (sampling "seeded[:N]") k drawn with replacement from them by a generator seeded N
    (April-GAN's rule; default seed 10). -> ({class: (k, 3, S, S) normalised}, {class: [file names]})."""
    from kano.anomaly_data import load_dataset

    if not data:
        raise KanoError("--k-shot needs --data KIND:PATH with a train split of normal images per class")
    ds = load_dataset(data)
    images, files = {}, {}
    for cls in classes or ds.classes:
        train = sorted((s for s in ds.samples("train", [cls]) if s.label == 0), key=lambda s: s.image_path)
        rule, seed = parse_sampling(sampling)
        if len(train) < (k if rule == "first" else 1):  # drawn with replacement, one image is enough
            raise KanoError(f"--k-shot {k} needs {k if rule == 'first' else 1} normal train images of class {cls} in "
                            f"{data}, got {len(train)}")
        if rule == "seeded":  # one generator per class, so a class's draws do not depend on the others
            g = torch.Generator().manual_seed(seed)
            chosen = [train[int(i)] for i in torch.randint(0, len(train), (k,), generator=g)]
        else:
            chosen = train[:k]
        images[cls] = _reference_tensor(chosen, bb)
        files[cls] = [s.image_path for s in chosen]
    return images, files


def _reference_tensor(samples: list, bb) -> torch.Tensor:
    """Reference images as the model sees them: (k, 3, S, S), squash-resized and normalised like test images."""
    from kano.anomaly_data import SampleDataset, raise_batch_errors

    batch = [SampleDataset(samples, bb.image_size, bb.mean, bb.std)[i] for i in range(len(samples))]
    raise_batch_errors({"error": [b["error"] for b in batch]})
    return torch.stack([b["image"] for b in batch])


def reference_folder(folder, k: int, bb, style: str = "cli") -> tuple[torch.Tensor, list[str]]:
    """Reference normal images from a plain folder (`--reference DIR`): its first k images sorted by path.
    style: how errors name the options ("cli": --reference, --k-shot; "api": references, k_shot).
    -> ((k, 3, S, S) normalised, [absolute paths])."""
    from pathlib import Path

    from kano.anomaly_data import Sample, list_images
    from kano.core.registry import option_name

    ref, ks = option_name("references", style), option_name("k_shot", style)
    if k < 1:
        raise KanoError(f"{ref} {folder} needs {ks} K >= 1 (how many of its images to use), got {ks} {k}")
    files = list_images(Path(folder))
    if len(files) < k:
        raise KanoError(f"{ks} {k} needs {k} reference images in {folder}, got {len(files)}")
    samples = [Sample(str(f.resolve()), None, "reference", "good", 0, split="train") for f in files[:k]]
    return _reference_tensor(samples, bb), [s.image_path for s in samples]


def with_patch_memory(model, described: dict, k_shot: int, data: str | None = None, references=None,
                      classes: list[str] | None = None, sampling: str | None = None):
    """K-shot mode for a per-image model with a CLIP backbone (a trained run, the untrained model): April-GAN's
    memory of normal patches (kanoclip/fewshot.py). References: the first k images of `references` (a folder)
    for every class, else of each class's train split of `data`. -> (PatchMemory, its provenance)."""
    from kano.kanoclip.backbone import Backbone
    from kano.kanoclip.fewshot import FEWSHOT_SOURCE, PatchMemory

    if k_shot < 1:
        raise KanoError(f"--k-shot must be an integer >= 1 for the K-shot mode, got {k_shot}")
    if getattr(model, "transductive", False) or not isinstance(getattr(model, "backbone", None), Backbone):
        raise KanoError(f"--k-shot must go with a per-image model on a CLIP backbone (--run, --backbone, or --method "
                        f"{', '.join(methods_with(references=True))}), "
                        f"got {described.get('name')}")
    bb = model.backbone
    wrapped = PatchMemory(model).eval()
    if references:
        refs, ref_files = reference_folder(references, k_shot, bb)
        from kano.anomaly_data import load_dataset

        names = classes or (list(load_dataset(data).classes) if data else [])
        wrapped.set_references({c: refs for c in names})
        files = {c: ref_files for c in names}
    else:
        images, files = reference_images(data, k_shot, bb, classes, sampling)
        wrapped.set_references(images)
    where = str(references) if references else "each class's train split"
    picked = sampling_rule(None if references else sampling).replace("the first k", f"the first {k_shot}").replace("k drawn", f"{k_shot} drawn")
    memory = "MVFA-AD's memory of adapted tokens" if hasattr(model, "reference_tokens") else "April-GAN memory"
    info = {**described, "setting": "few-shot", "k_shot": k_shot, "references": files,
            "few_shot": {"rule": f"{memory} of {where}: {picked}", "sampling": "first" if references else parse_sampling(sampling)[0],
                         "source": FEWSHOT_SOURCE, "stages": list(bb.stages)}}
    return wrapped, info


def load_retrieval(method: str, run, backbone: str | None, image_size: int | None, device: torch.device | str,
                   aux: str | None = None, batch_size: int = 16, allow_missing_masks: bool = False, **_):
    """-> (PatchRetrieval, info) for `kano eval --method retrieval --backbone SPEC --aux KIND:PATH`: the memory
    is the auxiliary dataset's labelled patch and image features (its test split, masks required; load_method has
    checked the sources)."""
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
    info = {"kind": METHODS[method].kind, "name": method, "method": method, "backbone": backbone, "setting": "per-image",
            "parameters": "frozen backbone, no training; a memory of labelled auxiliary features",
            "source": METHODS[method].source,
            "aux": aux, "image_size": bb.image_size, "k": cfg.k, "temperature": cfg.temperature, "sigma": cfg.sigma,
            "memory": {"normal_patches_per_stage": int(memory["normal_patches"][0].shape[0]),
                       "abnormal_patches_per_stage": [int(a.shape[0]) for a in memory["abnormal_patches"]],
                       "normal_images": int(memory["normal_images"].shape[0]),
                       "abnormal_images": int(memory["abnormal_images"].shape[0])}}
    return model, {"run": None, "backbone": backbone, "threshold": None, "prompt_names": {}, "method": info}


def musc_info(model, backbone: str) -> dict:
    """The provenance "method" of a built MuSc model (MuSc's own module names it: model.method)."""
    return {"kind": METHODS[model.method].kind, "name": model.method, "method": model.method, "backbone": backbone,
            "setting": "transductive", "parameters": "frozen backbone, no training", "source": METHODS[model.method].source,
            "image_size": model.backbone.image_size, "constants": model.constants()}


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
    windows unless `rscin_windows` is given; load_method has checked the sources)."""
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

    fits = ", ".join(methods_with(needs="backbone", transductive=False))
    if model.transductive:
        raise KanoError(f"--mutual must go with a per-image method (--run, or --method {fits}), got {what}, "
                        "which is already transductive")
    if not isinstance(model.backbone, Backbone):
        raise KanoError(f"--mutual must go with a method that has a frozen backbone (--run, or --method {fits}), "
                        f"got {what}, which has none")
    musc = MuSc(model.backbone, map_scale=0.5, **musc_windows(data, rscin_windows)).eval()
    spec = described.get("backbone") or model.backbone.spec
    info = {**described, "setting": "transductive", "mutual": True, "fusion": FUSION_RULE,
            musc.method: musc_info(musc, spec)}
    return MutualFusion(model, musc).eval(), info


def load_method(method: str, run, backbone: str | None, image_size: int | None, device: torch.device | str = "cpu",
                aux: str | None = None, allow_missing_masks: bool = False, k_shot: int = 0, data: str | None = None,
                classes: list[str] | None = None, references=None, rscin_windows: list[int] | None = None,
                class_word: str | None = None, style: str = "cli", sampling: str | None = None):
    """-> (model, info) for `kano eval --method NAME`: the loader the registry names for NAME, after its entry has
    refused what NAME cannot take (kano.core.registry.check_given; style "cli" or "api": how errors name options)."""
    check_given(method, {"run": run, "backbone": backbone, "aux": aux, "k_shot": k_shot, "references": references,
                         "class_word": class_word, "rscin_windows": rscin_windows}, style)
    return METHODS[method].loader()(method, run, backbone, image_size, device, aux=aux, allow_missing_masks=allow_missing_masks,
                                    k_shot=k_shot, data=data, classes=classes, references=references,
                                    rscin_windows=rscin_windows, **({"sampling": sampling} if sampling else {}))
