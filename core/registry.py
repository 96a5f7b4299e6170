"""Every method Kano runs, in one table: `METHODS[name]` -> `MethodSpec`. Torch-free, so that `kano --help`
stays fast; the factory of the trained methods (nn.Module and config by name) is kanoclip/registry.py.

The CLI's help and errors, `kano eval --method`, the demo, the benchmarks and docs/methods.md read this
table; adding a method means its module plus one entry here (see docs/methods.md). Each entry names what the
method needs (a trained `run`, a frozen `backbone`, labelled `aux` data), whether it takes normal reference
images (`references`: few-shot), its source, its display label and the function that builds it (`build`,
"module:function", imported only when used: loaders read datasets and files, which this package's modules do
not). Trained methods also name their nn.Module and their trainable config dataclass ("module:Class"), which
`kano train --method` and `kanoclip.runs.load_run` build through kanoclip/registry.py.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable


KINDS = ("trained", "one-class", "zero-shot", "zero-parameter", "transductive", "memory")


@dataclass(frozen=True)
class MethodSpec:
    name: str
    kind: str                        # one of KINDS; a method with `references` is few-shot when given them
    label: str                       # display name in tables
    source: str                      # where the method comes from (paper, code, or Kano's own)
    build: str                       # "module:function" -> (model, info); see evaluator/methods.py load_method
    needs: tuple[str, ...] = ()      # of "run", "backbone", "aux"
    references: bool = False         # takes k normal reference images per class (--k-shot)
    demo: bool = False               # a row of `kano demo`'s table
    model: str | None = None         # trained and one-class methods: "module:Class" of the nn.Module
    config: str | None = None        # trained and one-class methods: "module:Class" of the config (its published defaults)

    def loader(self) -> Callable:
        return resolve(self.build)


def resolve(ref: str):
    """"module:name" -> that object (imported now)."""
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


_RUN = "kano.kanoclip.runs:load_run"  # from a run folder (`kano eval --run`), not by name
_ZERO_SHOT = "kano.evaluator.methods:load_zero_shot"
_BASELINE = "kano.evaluator.baselines:load_baseline"
_PIXELS = "Kano's zero-parameter floor (evaluator/baselines.py): "

METHODS: dict[str, MethodSpec] = {s.name: s for s in (
    MethodSpec("kanoclip", "trained", "KAnoCLIP", "Li et al., KAnoCLIP (the paper Kano implements): CLIP-VV, KnPL, Bi-CMCI, Conv-Adapter "
               "(kanoclip/model.py; the departures in docs/deviations.md)", _RUN, ("run",), demo=True,
               model="kano.kanoclip.model:KAnoCLIP", config="kano.kanoclip.model:ModelConfig"),
    MethodSpec("aprilgan", "trained", "April-GAN", "Chen et al., April-GAN (CVPR 2023 VAND workshop): linear heads on "
               "four stages, the authors' published recipe (kanoclip/aprilgan.py)", _RUN, ("run",),
               model="kano.kanoclip.aprilgan:AprilGAN", config="kano.kanoclip.aprilgan:AprilGANConfig"),
    MethodSpec("anomalyclip", "trained", "AnomalyCLIP", "Zhou et al., AnomalyCLIP (ICLR 2024): object-agnostic "
               "prompts, V-V from block 6, the authors' published recipe (kanoclip/anomalyclip.py)", _RUN, ("run",),
               model="kano.kanoclip.anomalyclip:AnomalyCLIP",
               config="kano.kanoclip.anomalyclip:AnomalyCLIPConfig"),
    # one-class: fitted on normal images only (a dataset's train/good) by `kano train --method NAME`, saved as a run;
    # the interface is kanoclip/one_class.py's
    MethodSpec("oneclass", "one-class", "oneclass (Kano's own)", "Kano's own one-class detector (kanoclip/oneclass.py): "
               "hand-crafted feature banks (colour, contrast, gradient energy and orientation, high-frequency energy at "
               "three scales) plus the backbone's stages when given, scored at the photo's native resolution; a Gaussian "
               "over patch features (shared or per position) and one over whole-image statistics, each standardised on "
               "normal photos it was not fitted on, combined by their maximum; variants chosen on synthetic defects only",
               _RUN, ("run",), model="kano.kanoclip.oneclass:OneClass", config="kano.kanoclip.oneclass:OneClassConfig"),
    MethodSpec("patchcore", "one-class", "PatchCore", "Roth et al., PatchCore (CVPR 2022), the authors' recipe "
               "(github.com/amazon-science/patchcore-inspection): locally aware features of two middle stages (3x3 "
               "neighbourhoods, adaptive average pooling to 1024), greedy k-center coreset of 10 % after a random "
               "projection, nearest-neighbour distance, the paper's image-score reweighting; equal to anomalib 2.7.0's "
               "PatchcoreModel on identical features (kanoclip/patchcore.py; docs/peers.md)", _RUN, ("run",),
               model="kano.kanoclip.patchcore:PatchCore", config="kano.kanoclip.patchcore:PatchCoreConfig"),
    MethodSpec("padim", "one-class", "PaDiM", "Defard et al., PaDiM (ICPR 2020): a Gaussian per position over three "
               "stages' concatenated features (a random subset of 100 channels), Mahalanobis distance, anomalib's "
               "regulariser; equal to anomalib 2.7.0's PadimModel on identical features (kanoclip/padim.py; "
               "docs/peers.md)", _RUN, ("run",), model="kano.kanoclip.padim:Padim", config="kano.kanoclip.padim:PadimConfig"),
    MethodSpec("kanoclip-untrained", "zero-shot", "KAnoCLIP untrained (fixed prompts)",
               "KAnoCLIP's model with KnPL, Bi-CMCI and Conv-Adapter off: fixed 'a photo of a normal/abnormal [class]' "
               "prompts on CLIP-VV patch tokens, no training (kanoclip/model.py)", "kano.evaluator.loading:load_untrained",
               ("backbone",), demo=True),
    MethodSpec("clip", "zero-shot", "CLIP", "Radford et al., ICML 2021: CLIP's zero-shot two-class classifier; prompts "
               "as kanoclip/winclip.py defines them (the KAnoCLIP paper quotes CLIP from AnomalyCLIP's Table 1 without "
               "defining it)", _ZERO_SHOT, ("backbone",)),
    MethodSpec("clip-ac", "zero-shot", "CLIP-AC", "Jeong et al., WinCLIP (CVPR 2023) Sec. 3: the CLIP-AC baseline, states "
               "'normal/anomalous [class]' in WinCLIP's 21 templates, averaged per state", _ZERO_SHOT, ("backbone",),
               demo=True),
    MethodSpec("winclip", "zero-shot", "WinCLIP", "Jeong et al., WinCLIP (CVPR 2023), zero-shot (no WinCLIP+ reference "
               "images); constants as anomalib 2.7.0 WinClipModel, windows encoded on their own as the paper says",
               _ZERO_SHOT, ("backbone",), references=True, demo=True),
    MethodSpec("retrieval", "memory", "retrieval (aux memory)", "Kano's retrieval floor (MRAD-TF-style): a memory of "
               "labelled auxiliary patch and image features, Kano's aggregation (kanoclip/retrieval.py)",
               "kano.evaluator.methods:load_retrieval", ("backbone", "aux")),
    *(MethodSpec(m, "zero-parameter", m, _PIXELS + what, _BASELINE, demo=True) for m, what in (
        ("median_colour", "each pixel's RGB distance from the image's median colour"),
        ("darkness", "1 - luminance"),
        ("brightness", "luminance"),
        ("local_median", "each pixel's RGB distance from the median of its neighbourhood"),
        ("self_similarity", "each patch's distance to its nearest patches of the same image"),
        ("self_similarity_randconv", "self_similarity on an untrained seeded random conv net's features"))),
    MethodSpec("mutual", "transductive", "mutual", _PIXELS.replace("zero-parameter", "transductive") + "MuSc-style mutual "
               "scoring of the frozen backbone's patch tokens against the other test images", _BASELINE, ("backbone",),
               demo=True),
    MethodSpec("musc", "transductive", "MuSc", "Li et al., MuSc (ICLR 2024): LNAMD, MSM and RsCIN with the public code's "
               "defaults (github.com/xrli-U/MuSc); departures in kanoclip/musc.py", "kano.evaluator.methods:load_musc",
               ("backbone",)),
    MethodSpec("musc_randconv", "transductive", "musc_randconv", _PIXELS.replace("zero-parameter", "transductive") +
               "mutual scoring on an untrained seeded random conv net's features", _BASELINE, demo=True),
)}


def methods_with(kind: str | None = None, needs: str | None = None, references: bool | None = None,
                 demo: bool | None = None) -> tuple[str, ...]:
    """Names of the methods matching every given filter, in table order; e.g. methods_with(references=True),
    methods_with(kind="zero-parameter"), methods_with(needs="backbone")."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    return tuple(n for n, s in METHODS.items()
                 if (kind is None or s.kind == kind) and (needs is None or needs in s.needs)
                 and (references is None or s.references == references) and (demo is None or s.demo == demo))


def method_spec(name: str, flag: str = "--method") -> MethodSpec:
    """The registry entry of `name`, or a KanoError listing every method."""
    from kano.core.errors import KanoError

    if name not in METHODS:
        raise KanoError(f"{flag} must be one of {', '.join(METHODS)}, got {name!r}")
    return METHODS[name]


TRAINED_METHODS = methods_with(kind="trained")
ONE_CLASS_METHODS = methods_with(kind="one-class")
RUN_METHODS = TRAINED_METHODS + ONE_CLASS_METHODS  # what `kano train --method` makes and `--run` loads
DISPLAY_NAMES = {n: s.label for n, s in METHODS.items()}


def markdown_table() -> str:
    """The table of docs/methods.md: one row per method (name, kind, needs, few-shot references, source)."""
    rows = ["| name | kind | needs | references | source |", "|---|---|---|---|---|"]
    rows += [f"| `{n}` | {s.kind} | {', '.join(s.needs) or '-'} | {'yes' if s.references else '-'} | {s.source} |"
             for n, s in METHODS.items()]
    return "\n".join(rows) + "\n"
