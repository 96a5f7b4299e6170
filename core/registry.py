"""Every method Kano runs, in one table: `METHODS[name]` -> `MethodSpec`. Torch-free, so that `kano --help`
stays fast; the factory of the trained methods (nn.Module and config by name) is kanoclip/registry.py.

The CLI's help and errors, `kano eval --method`, the demo, the benchmarks and docs/methods.md read this
table; adding a method means its module plus one entry here (see docs/methods.md). Each entry is the method's
whole description: its kind (one vocabulary, `KINDS`, from this table to the provenance of every result), what it
needs (a trained `run`, a frozen `backbone`, labelled `aux` data, a knowledge base `kb` to train), its capabilities
(takes normal reference images: `references`; scores with prompts naming the class: `prompts`; has a graph for
`kano export`: `exportable`; learns from normal images of the class itself: `one_class`; transductive: its kind),
the method-specific options it takes (`options`), its source, its display label and the function that builds it
(`build`, "module:function", imported only when used: loaders read datasets and files, which this package's
modules do not). `check_given` refuses, by name, whatever a method cannot take; every place that loads a method
calls it once. Trained methods also name their nn.Module and their trainable config dataclass ("module:Class"),
which `kano train --method` and `kanoclip.runs.load_run` build through kanoclip/registry.py.

A method's name appears in the code only here and in the modules its entry names (`build`, `model`, `config`,
`modules`); tests/test_registry.py greps for it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable


KINDS = ("trained", "one-class", "zero-shot", "zero-parameter", "transductive", "memory")
NEEDS = ("run", "backbone", "aux", "kb")
# How a caller names an option in its messages: the command line's flags, or the Python API's arguments.
CLI = "cli"
API = "api"


def option_name(option: str, style: str = CLI) -> str:
    """An option by its API argument name ("k_shot") as `style` spells it: "--k-shot" (CLI) or "k_shot" (API)."""
    if style == API:
        return option
    return {"class_word": "--class-word", "references": "--reference"}.get(option, "--" + option.replace("_", "-"))


@dataclass(frozen=True)
class MethodSpec:
    name: str
    kind: str                        # one of KINDS; also the "kind" of every result's provenance
    label: str                       # display name in tables
    source: str                      # where the method comes from (paper, code, or Kano's own)
    build: str                       # "module:function" -> (model, info); see evaluator/methods.py load_method
    needs: tuple[str, ...] = ()      # of NEEDS: "run" (kano eval --run), "backbone", "aux" (labelled data), "kb" (to train)
    references: bool = False         # takes k normal reference images per class (--reference, --k-shot): few-shot
    prompts: bool = False            # scores with text prompts naming the class: takes a class word, warns on an unknown one
    exportable: bool = False         # `kano export` writes its graph (its module has text_bank and score_bank)
    one_class: bool = False          # learns from normal images of the class itself before scoring it
    options: tuple[str, ...] = ()    # method-specific options it takes, by API argument name (e.g. "rscin_windows")
    demo: bool = False               # a row of `kano demo`'s table
    demo_row: tuple[str, str] | None = None  # (row name, kind column) in the demo's table, when not the rule's
    model: str | None = None         # "module:Class" of the nn.Module (trained and one-class methods: what `kano train` builds)
    config: str | None = None        # trained and one-class methods: "module:Class" of the config (its published defaults)
    modules: tuple[str, ...] = ()    # other modules written for this method alone (they may name it)

    @property
    def transductive(self) -> bool:
        """Each image's score depends on the other test images: scored on a test set only (`kano eval`)."""
        return self.kind == "transductive"

    @property
    def trained(self) -> bool:
        return self.kind == "trained"

    @property
    def per_image(self) -> bool:
        """Scores one image on its own with nothing but its sources given: `kano predict --method`, the API."""
        return not self.trained and not self.transductive and "aux" not in self.needs and not self.one_class

    def loader(self) -> Callable:
        return resolve(self.build)

    def own_modules(self) -> tuple[str, ...]:
        """The modules that may name this method: those its entry names."""
        refs = (self.build, self.model, self.config, *self.modules)
        return tuple(dict.fromkeys(r.partition(":")[0] for r in refs if r))


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
               "(kanoclip/model.py; the departures in docs/deviations.md)", _RUN, ("run", "kb"), prompts=True, exportable=True, demo=True,
               model="kano.kanoclip.model:KAnoCLIP", config="kano.kanoclip.model:ModelConfig"),
    MethodSpec("aprilgan", "trained", "April-GAN", "Chen et al., April-GAN (CVPR 2023 VAND workshop): linear heads on "
               "four stages, the authors' published recipe (kanoclip/aprilgan.py)", _RUN, ("run",), prompts=True, exportable=True,
               model="kano.kanoclip.aprilgan:AprilGAN", config="kano.kanoclip.aprilgan:AprilGANConfig"),
    MethodSpec("anomalyclip", "trained", "AnomalyCLIP", "Zhou et al., AnomalyCLIP (ICLR 2024): object-agnostic "
               "prompts, V-V from block 6, the authors' published recipe (kanoclip/anomalyclip.py)", _RUN, ("run",), exportable=True,
               model="kano.kanoclip.anomalyclip:AnomalyCLIP",
               config="kano.kanoclip.anomalyclip:AnomalyCLIPConfig"),
    MethodSpec("mvfa", "trained", "MVFA-AD", "Huang et al., MVFA-AD (CVPR 2024): residual seg/det adapters at four "
               "stages of the image tower, the authors' published recipe (kanoclip/mvfa.py)", _RUN, ("run",), prompts=True,
               exportable=True, model="kano.kanoclip.mvfa:MVFA", config="kano.kanoclip.mvfa:MVFAConfig"),
    # one-class: fitted on normal images only (a dataset's train/good) by `kano train --method NAME`, saved as a run;
    # the interface is kanoclip/one_class.py's
    MethodSpec("oneclass", "one-class", "oneclass (Kano's own)", "Kano's own one-class detector (kanoclip/oneclass.py): "
               "hand-crafted feature banks (colour, contrast, gradient energy and orientation, high-frequency energy at "
               "three scales) plus the backbone's stages when given, scored at the photo's native resolution; a Gaussian "
               "over patch features (a mixture, shared or per position) and two over whole-image statistics, each standardised on "
               "normal photos it was not fitted on, combined by their maximum; variants chosen on synthetic defects only",
               _RUN, ("run",), exportable=True, one_class=True, model="kano.kanoclip.oneclass:OneClass",
               config="kano.kanoclip.oneclass:OneClassConfig"),
    MethodSpec("patchcore", "one-class", "PatchCore", "Roth et al., PatchCore (CVPR 2022), the authors' recipe "
               "(github.com/amazon-science/patchcore-inspection): locally aware features of two middle stages (3x3 "
               "neighbourhoods, adaptive average pooling to 1024), greedy k-center coreset of 10 % after a random "
               "projection, nearest-neighbour distance, the paper's image-score reweighting; equal to anomalib 2.7.0's "
               "PatchcoreModel on identical features (kanoclip/patchcore.py; docs/peers.md)", _RUN, ("run",), exportable=True,
               one_class=True, model="kano.kanoclip.patchcore:PatchCore", config="kano.kanoclip.patchcore:PatchCoreConfig"),
    MethodSpec("padim", "one-class", "PaDiM", "Defard et al., PaDiM (ICPR 2020): a Gaussian per position over three "
               "stages' concatenated features (a random subset of 100 channels), Mahalanobis distance, anomalib's "
               "regulariser; equal to anomalib 2.7.0's PadimModel on identical features (kanoclip/padim.py; "
               "docs/peers.md)", _RUN, ("run",), exportable=True, one_class=True, model="kano.kanoclip.padim:Padim",
               config="kano.kanoclip.padim:PadimConfig"),
    MethodSpec("kanoclip-untrained", "zero-shot", "KAnoCLIP untrained (fixed prompts)",
               "KAnoCLIP's model with KnPL, Bi-CMCI and Conv-Adapter off: fixed 'a photo of a normal/abnormal [class]' "
               "prompts on CLIP-VV patch tokens, no training (kanoclip/model.py)", "kano.evaluator.loading:load_untrained",
               ("backbone",), prompts=True, exportable=True, demo=True, demo_row=("KAnoCLIP untrained (fixed prompts)", "untrained"),
               model="kano.kanoclip.model:KAnoCLIP"),
    MethodSpec("clip", "zero-shot", "CLIP", "Radford et al., ICML 2021: CLIP's zero-shot two-class classifier; prompts "
               "as kanoclip/winclip.py defines them (the KAnoCLIP paper quotes CLIP from AnomalyCLIP's Table 1 without "
               "defining it)", _ZERO_SHOT, ("backbone",), prompts=True, model="kano.kanoclip.winclip:CLIPZeroShot"),
    MethodSpec("clip-ac", "zero-shot", "CLIP-AC", "Jeong et al., WinCLIP (CVPR 2023) Sec. 3: the CLIP-AC baseline, states "
               "'normal/anomalous [class]' in WinCLIP's 21 templates, averaged per state", _ZERO_SHOT, ("backbone",),
               prompts=True, demo=True, model="kano.kanoclip.winclip:CLIPZeroShot"),
    MethodSpec("winclip", "zero-shot", "WinCLIP", "Jeong et al., WinCLIP (CVPR 2023), zero-shot (no WinCLIP+ reference "
               "images); constants as anomalib 2.7.0 WinClipModel, windows encoded on their own as the paper says",
               _ZERO_SHOT, ("backbone",), references=True, prompts=True, exportable=True, demo=True,
               model="kano.kanoclip.winclip:WinCLIP"),
    MethodSpec("retrieval", "memory", "retrieval (aux memory)", "Kano's retrieval floor (MRAD-TF-style): a memory of "
               "labelled auxiliary patch and image features, Kano's aggregation (kanoclip/retrieval.py)",
               "kano.evaluator.methods:load_retrieval", ("backbone", "aux"), model="kano.kanoclip.retrieval:PatchRetrieval"),
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
               ("backbone",), options=("rscin_windows",), model="kano.kanoclip.musc:MuSc"),
    MethodSpec("musc_randconv", "transductive", "musc_randconv", _PIXELS.replace("zero-parameter", "transductive") +
               "mutual scoring on an untrained seeded random conv net's features", _BASELINE, demo=True),
)}


def methods_with(kind: str | None = None, needs: str | None = None, **capabilities) -> tuple[str, ...]:
    """Names of the methods matching every given filter, in table order; capabilities are any entry field or
    property compared for equality, e.g. methods_with(references=True), methods_with(kind="zero-parameter"),
    methods_with(needs="backbone"), methods_with(per_image=True), methods_with(exportable=True)."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if needs is not None and needs not in NEEDS:
        raise ValueError(f"needs must be one of {', '.join(NEEDS)}, got {needs!r}")
    for k in capabilities:
        if not hasattr(MethodSpec, k) and k not in MethodSpec.__dataclass_fields__:
            raise ValueError(f"a capability must be a MethodSpec field or property, got {k!r}")
    return tuple(n for n, s in METHODS.items()
                 if (kind is None or s.kind == kind) and (needs is None or needs in s.needs)
                 and all(getattr(s, k) == v for k, v in capabilities.items()))


def method_spec(name: str, flag: str = "--method") -> MethodSpec:
    """The registry entry of `name`, or a KanoError listing every method."""
    from kano.core.errors import KanoError

    if name not in METHODS:
        raise KanoError(f"{flag} must be one of {', '.join(METHODS)}, got {name!r}")
    return METHODS[name]


_SOURCE_HINT = {"run": "RUN_DIR (a `kano train` run)", "backbone": "SPEC (tiny, micro or MODEL:PRETRAINED)",
                "aux": "KIND:PATH (the labelled auxiliary data its memory is made of)"}


def check_given(name: str, given: dict, style: str = CLI) -> MethodSpec:
    """The entry of `name`, after refusing by name, with the reason, every source or option in `given` that the
    method cannot take and every source it needs that `given` lacks. given: API argument name -> value (None,
    False, 0 or "" means not given): the sources run, backbone, aux; references, k_shot, class_word; and any
    entry's `options`. style: CLI or API, how the messages name options. Every place that loads a method calls
    this once (evaluator.methods.load_method, evaluator.loading.load_model, deploy.export)."""
    from kano.core.errors import KanoError

    def f(option: str) -> str:
        return option_name(option, style)

    spec = method_spec(name, f("method"))
    m = f"{f('method')} {name}" if style == CLI else f"method {name!r}"
    if spec.kind in ("trained", "one-class") and not given.get("run"):
        how = ("evaluate the run with --run RUN_DIR (without --method)" if style == CLI
               else "load its run with Detector.load(RUN_DIR)")
        verb = "fit" if spec.kind == "one-class" else "train"
        raise KanoError(f"{m} is a {spec.kind} method: {verb} it with `kano train --method {name}` and {how}")
    for src in ("run", "backbone", "aux"):
        value = given.get(src)
        if src in spec.needs and not value:
            raise KanoError(f"{m} needs {f(src)} {_SOURCE_HINT[src]}")
        if value and src not in spec.needs:
            if src == "run":
                raise KanoError(f"{m} needs no trained run: " + (f"give {f('backbone')} SPEC, not {f('run')}"
                                if "backbone" in spec.needs else f"give no {f('run')}") + f", got {f('run')} {value}")
            users = methods_with(needs=src)
            raise KanoError(f"{f(src)} is used by {f('method')} {', '.join(users)} only, got {m} with {f(src)} {value}")
    if given.get("references") or given.get("k_shot"):
        opt = "references" if given.get("references") else "k_shot"
        if not spec.references:
            users = ", ".join(methods_with(references=True))
            raise KanoError(f"{f(opt)} is used by {f('method')} {users} only (few-shot), got {m} with {f(opt)} {given[opt]}")
    if given.get("class_word") and not spec.prompts:
        raise KanoError(f"{f('class_word')} is used by the methods that score with prompts naming the class "
                        f"({', '.join(methods_with(prompts=True))}), got {m}, which uses none")
    for opt in dict.fromkeys(o for s in METHODS.values() for o in s.options):
        if given.get(opt) and opt not in spec.options:
            raise KanoError(f"{f(opt)} is used by {f('method')} {', '.join(methods_with_option(opt))} only, "
                            f"got {m} with {f(opt)} {given[opt]}")
    return spec


def methods_with_option(option: str) -> tuple[str, ...]:
    """The methods whose entry lists `option` among its own options."""
    return tuple(n for n, s in METHODS.items() if option in s.options)


def not_exportable_reason(name: str) -> str:
    """Why `kano export` has no graph for a method, from its capabilities ("" when it has one)."""
    spec = METHODS[name]
    if spec.exportable:
        return ""
    if spec.transductive:
        return "it is transductive: it scores each image against the other test images, so it has no fixed per-image graph"
    if "aux" in spec.needs or spec.one_class:
        return "it scores against a memory of images built when it is loaded, not a fixed graph"
    return f"its module has no graph to export (exportable: {', '.join(methods_with(exportable=True))})"


TRAINED_METHODS = methods_with(kind="trained")
ONE_CLASS_METHODS = methods_with(kind="one-class")
RUN_METHODS = TRAINED_METHODS + ONE_CLASS_METHODS  # what `kano train --method` makes and `--run` loads
DEFAULT_METHOD = TRAINED_METHODS[0]  # what `kano train` trains without --method, and what a run without "method" is
UNTRAINED_METHOD = "kanoclip-untrained"  # what --backbone alone runs (kano eval, predict, export): the untrained model
DISPLAY_NAMES = {n: s.label for n, s in METHODS.items()}


def capabilities(spec: MethodSpec) -> str:
    """The capabilities column of docs/methods.md: what the method takes and gives besides its sources."""
    caps = [c for c, on in (("references", spec.references), ("prompts", spec.prompts), ("export", spec.exportable),
                            ("one-class", spec.one_class)) if on] + [option_name(o) for o in spec.options]
    return ", ".join(caps) or "-"


def markdown_table() -> str:
    """The table of docs/methods.md: one row per method (name, kind, needs, capabilities, source)."""
    rows = ["| name | kind | needs | takes | source |", "|---|---|---|---|---|"]
    rows += [f"| `{n}` | {s.kind} | {', '.join(s.needs) or '-'} | {capabilities(s)} | {s.source} |"
             for n, s in METHODS.items()]
    return "\n".join(rows) + "\n"


def markdown_list(names: tuple[str, ...]) -> str:
    """Names as docs write them: `a`, `b`, `c`."""
    return ", ".join(f"`{n}`" for n in names)
