"""Training configuration, validated, saved with every run.

Defaults and their source: the backbone (ViT-L/14@336) is the paper's; image size 518, stages 6/12/18/24,
Adam 1e-3 with betas (0.5, 0.999), batch 8 and 15 epochs are AnomalyCLIP's published settings, which the
KAnoCLIP paper does not state. `model` is the chosen method's own config dataclass (core/registry.py names it:
KAnoCLIP's ModelConfig, AprilGANConfig, AnomalyCLIPConfig), with that method's published defaults.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

from kano.core.errors import KanoError
from kano.kanoclip import ModelConfig, model_config
from kano.kanoclip.registry import DEFAULT_METHOD, METHODS as _REGISTRY, methods_with as _methods_with

CACHE_MODES = ("auto", "memory", "disk", "off")
CLASS_WORD_RULES = ("kano", "folder")
ACTIVATIONS = ("gelu", "quickgelu")


@dataclass
class TrainConfig:
    method: str = DEFAULT_METHOD                      # a trained or one-class method of core/registry.py; default: the first trained
    kb: str = "kb.duckdb"
    data: str = ""                                    # KIND:PATH of the auxiliary dataset
    backbone: str = "ViT-L-14-336-quickgelu:openai"  # the paper's ViT-L/14@336
    out: str = "runs/kano"
    classes: list[str] | None = None                  # default: every class of the auxiliary data
    split: str = "test"                               # the protocol trains on the auxiliary TEST split
    image_size: int | None = None                     # default 518 for ViT-L-14-336 (AnomalyCLIP's), else the model's own
    # stages, vv_start, pos_resize: None = the method's published value, set with its source on the method's class
    # (kanoclip and aprilgan: stages 6/12/18/24, spread on other depths; anomalyclip: the last block only; V-V from
    # block 6 of 24; position-embedding resize kanoclip/anomalyclip bilinear, aprilgan bicubic-antialias)
    stages: list[int] | None = None
    vv_start: int | None = None
    pos_resize: str | None = None                     # bicubic-antialias | bilinear | bicubic (kanoclip/pos_embed.py)
    # epochs, batch, lr, betas: None = the method's published recipe (`train_recipe` on its class, with its source;
    # kanoclip and anomalyclip: AnomalyCLIP's 15 epochs, batch 8, Adam 1e-3, betas (0.5, 0.999), not in the paper)
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    betas: tuple[float, float] | None = None
    # share of the samples that become a 2 x 2 mosaic of four images of their class with their masks, drawn anew
    # every epoch (April-GAN's --aug_rate); None = the method's recipe (aprilgan on mvtec data 0.2, else 0)
    aug_rate: float | None = None
    seed: int = 111
    cache: str = "auto"                               # frozen-feature cache: auto | memory | disk | off
    cache_dir: str | None = None                      # default ~/.cache/kano/features
    device: str | None = None
    workers: int = 0
    # which KB descriptions feed w̄ᵏ (eq. 3). None: llm + vqa, and the built-in pack / imports only for a class
    # with neither (training warns). A list (of llm, vqa, builtin, import): exactly those.
    knowledge_sources: list[str] | None = None
    model: Any = None                                 # the method's config dataclass (or a dict of its keys); None: its defaults

    # the [class] word of the prompts: "kano" (anomaly_data/names.py: pcb1 -> "printed circuit board") or "folder"
    # (the folder name as it is, as April-GAN's prompt_ensemble.py:15-18 and MVFA-AD's code use it)
    class_words: str = "kano"
    # the backbone's MLP activation: None = as its spec builds it (what the weights were trained with: QuickGELU
    # for the -quickgelu OpenAI models); "gelu" runs GELU, as April-GAN's 518 px and MVFA-AD's 240 px scripts do
    # on ViT-L-14-336 (their open_clip builds it at another size from a config without quick_gelu)
    activation: str | None = None
    recipe: str | None = None                         # where the unset epochs/batch/lr/betas came from (set here)

    def __post_init__(self):
        if self.method not in _recipe_methods():
            raise ValueError(f"method must be one of {', '.join(_recipe_methods())}, got {self.method!r}")
        given = {k: getattr(self, k) for k in RECIPE_KEYS}
        published = method_recipe(self.method, str(self.data).partition(":")[0])
        for k in RECIPE_KEYS:
            if given[k] is None:
                setattr(self, k, published[k])
        if any(v is None for v in given.values()):
            self.recipe = published["source"]
        if not isinstance(self.betas, (list, tuple)):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        self.betas = tuple(self.betas)
        if not self.data:
            raise ValueError("data must be KIND:PATH of the auxiliary dataset, got nothing")
        from kano.kanoclip.registry import RUN_METHODS

        if self.method not in RUN_METHODS:
            raise ValueError(f"method must be one of {', '.join(RUN_METHODS)}, got {self.method!r}")
        self.model = method_model_config(self.method, self.model)
        if "kb" not in _REGISTRY[self.method].needs:
            if self.knowledge_sources is not None:
                raise ValueError(f"knowledge_sources apply to method {', '.join(_methods_with(needs='kb'))} only ({self.method} "
                                 f"uses no knowledge base), got {self.knowledge_sources} with method {self.method}")
        for name in ("epochs", "batch_size", "seed", "workers"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise ValueError(f"{name} must be an integer, got {v!r}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0 (0: load images in the main process), got {self.workers}")
        if self.image_size is not None and (not isinstance(self.image_size, int) or isinstance(self.image_size, bool)
                                            or self.image_size < 1):
            raise ValueError(f"image_size must be a positive integer (leave it unset for the backbone's default), got {self.image_size!r}")
        if self.stages is not None:
            if (not isinstance(self.stages, list) or not self.stages
                    or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in self.stages)):
                raise ValueError(f"stages must be a list of block numbers >= 1 (e.g. 6,12,18,24), got {self.stages!r}")
        if self.vv_start is not None and (not isinstance(self.vv_start, int) or self.vv_start < 1):
            raise ValueError(f"vv_start must be a block number >= 1, got {self.vv_start!r}")
        if self.pos_resize is not None:
            from kano.kanoclip.pos_embed import MODES

            if self.pos_resize not in MODES:
                raise ValueError(f"pos_resize must be one of {', '.join(MODES)}, got {self.pos_resize!r}")
        if self.classes is not None and (not isinstance(self.classes, list) or not all(isinstance(c, str) and c for c in self.classes)):
            raise ValueError(f"classes must be a list of class names, got {self.classes!r}")
        if self.device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", str(self.device)):
            raise ValueError(f"--device must be cpu, cuda or cuda:N, got {self.device!r}")
        for name in ("kb", "data", "backbone", "out"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string, got {getattr(self, name)!r}")
        if isinstance(self.aug_rate, bool) or not isinstance(self.aug_rate, (int, float)) or not 0 <= self.aug_rate <= 1:
            raise ValueError(f"aug_rate must be a number in [0, 1] (the share of samples made mosaics), got {self.aug_rate!r}")
        self.aug_rate = float(self.aug_rate)
        if self.class_words not in CLASS_WORD_RULES:
            raise ValueError(f"class_words must be one of {', '.join(CLASS_WORD_RULES)}, got {self.class_words!r}")
        if self.activation is not None and self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)} (or unset: as the backbone is built), "
                             f"got {self.activation!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.cache not in CACHE_MODES:
            raise ValueError(f"cache must be one of {', '.join(CACHE_MODES)}, got {self.cache!r}")
        if self.knowledge_sources is not None:
            from .knowledge import check_sources

            self.knowledge_sources = list(check_sources(self.knowledge_sources))
        if self.split not in ("train", "test"):
            raise ValueError(f"split must be train or test, got {self.split!r}")
        if (self.stages is not None and self.vv_start is not None and getattr(self.model, "use_vv", True)
                and self.vv_start > max(self.stages)):
            raise ValueError(f"vv_start must be <= the last stage {max(self.stages)} when CLIP-VV is on, got {self.vv_start}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_sources(cls, file: str | None, overrides: dict) -> "TrainConfig":
        """Defaults, then a JSON config file, then command-line overrides (None = not given)."""
        base: dict = {}
        if file:
            p = Path(file)
            if not p.is_file():
                raise KanoError(f"config file {p} must exist, got no such file")
            try:
                base = json.loads(p.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise KanoError(f"config file {p} must be JSON, got {exc}") from None
            if not isinstance(base, dict):
                raise KanoError(f"config file {p} must hold a JSON object of TrainConfig keys, got a {type(base).__name__}")
            base = base.get("train", base)
            if not isinstance(base, dict):
                raise KanoError(f"config file {p}: \"train\" must be a JSON object, got a {type(base).__name__}")
        base = dict(base)
        model = base.pop("model", {}) or {}
        from kano.kanoclip.registry import METHODS, resolve

        method = overrides.get("method") or base.get("method") or DEFAULT_METHOD
        mcls = resolve(METHODS[method].config) if method in METHODS and METHODS[method].config else ModelConfig
        if not isinstance(model, dict):
            raise KanoError(f"config key \"model\" must be a JSON object of {mcls.__name__} keys "
                            f"({', '.join(f.name for f in fields(mcls))}), got {model!r}")
        model = dict(model)
        # model options come flat among the overrides: KAnoCLIP's from the command line, the chosen method's own
        # from a run's saved config on --resume
        model_keys = {f.name for f in fields(ModelConfig)} | {f.name for f in fields(mcls)}
        for k, v in overrides.items():
            if v is None:
                continue
            if k in model_keys:
                model[k] = v
            else:
                base[k] = v
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(base) - known)
        if unknown:
            raise KanoError(f"config keys must be among {', '.join(sorted(known))}, got {', '.join(unknown)}")
        try:
            return cls(**base, model=model)
        except (TypeError, ValueError) as exc:
            raise KanoError(str(exc)) from None


RECIPE_KEYS = ("epochs", "batch_size", "lr", "betas", "aug_rate")
# AnomalyCLIP's published optimiser settings (code train.py / train.sh), Kano's defaults for kanoclip too
DEFAULT_RECIPE = {"epochs": 15, "batch_size": 8, "lr": 1e-3, "betas": (0.5, 0.999), "aug_rate": 0.0,
                  "source": "AnomalyCLIP's train.sh: 15 epochs, batch 8, Adam lr 1e-3, betas (0.5, 0.999)"}


def _recipe_methods() -> tuple[str, ...]:
    """Every method `kano train` runs: the trained ones and the one-class ones (whose recipe is DEFAULT_RECIPE's,
    unused: they fit in one pass)."""
    from kano.kanoclip.registry import RUN_METHODS

    return RUN_METHODS


def method_recipe(method: str, data_kind: str) -> dict:
    """The training recipe `method`'s authors published for auxiliary data of `data_kind` (mvtec, visa, ...):
    {epochs, batch_size, lr, betas, source}; the method's class names it (`train_recipe`), else DEFAULT_RECIPE."""
    from kano.kanoclip.registry import METHODS, resolve

    fn = getattr(resolve(METHODS[method].model), "train_recipe", None)
    return {**DEFAULT_RECIPE, **(fn(data_kind) if fn else {})}


def method_model_config(method: str, model):
    """`model` as `method`'s config dataclass: None -> its defaults, a dict -> those keys over its defaults.

    A run config written before each method had its own config recorded KAnoCLIP's defaults under "model" for
    every method; for another method those unchanged defaults mean "its own defaults" and are read as such."""
    from kano.kanoclip.registry import METHODS, resolve

    cls = resolve(METHODS[method].config)
    if model is None:
        return cls()
    if is_dataclass(model) and not isinstance(model, type):
        if not isinstance(model, cls):
            raise ValueError(f"model must be {method}'s config {cls.__name__}, got a {type(model).__name__}")
        return model
    if not isinstance(model, dict):
        raise ValueError(f"model must be a dict of {method}'s model config keys, got {model!r}")
    if method != DEFAULT_METHOD and model and json.loads(json.dumps(model)) == json.loads(json.dumps(ModelConfig().to_dict())):
        return cls()
    mknown = [f.name for f in fields(cls)]
    extra = sorted(set(model) - set(mknown))
    if extra:
        if method != DEFAULT_METHOD and set(extra) <= {f.name for f in fields(ModelConfig)}:
            raise ValueError(f"KAnoCLIP's model options ({', '.join(extra)}) apply to method {DEFAULT_METHOD} only; {method}'s "
                             f"model config keys are {', '.join(mknown)}, got them with method {method}")
        raise ValueError(f"model config keys must be among {', '.join(mknown)} ({method}'s), got {', '.join(extra)}")
    try:
        return model_config(method, model)
    except TypeError as exc:
        raise ValueError(f"model config of {method} must hold its keys ({', '.join(mknown)}), got {exc}") from None
