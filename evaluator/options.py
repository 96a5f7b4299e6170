"""The options of `kano eval` and `kano predict`, carried from the command line to the library as one object each.

`EvalOptions` and `PredictOptions` hold every option by its API argument name; `refuse_unused()` refuses, by name
and with the reason, each option given that the chosen method or model would not use (exit 2 through KanoError),
so that no option is silently dropped. What a method can take is its registry entry's (kano.core.registry:
`check_given`, run where the method is loaded); what these objects check is the rest: options of one source kind
given with another (--image-size with --run, the sources of a torch model beside an exported graph, options of one
method given to a list of them). Option names in messages are the command line's (`flag`), the only caller that
builds these objects.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from kano.core.errors import KanoError
from kano.core.registry import option_name as flag


def _given(value) -> bool:
    return value not in (None, False, 0, "", [], ())


def _flag(name: str) -> str:
    return flag("class_word" if name == "class_words" else name)  # eval's --class-word sets several: class_words


def _refuse_beside_model(opts, why_not: dict[str, str]) -> None:
    """--model with any option named in `why_not` (option -> why a graph cannot use it) given: KanoError naming
    each with its reason."""
    given = [name for name in why_not if _given(getattr(opts, name))]
    if given:
        why = "; ".join(f"{_flag(n)}: {why_not[n]}" for n in given)
        raise KanoError(f"--model scores with the exported graph alone, got {', '.join(_flag(n) for n in given)} "
                        f"beside it (leave them out: {why})")


@dataclass
class EvalOptions:
    """`kano eval`: a run (`run`), the untrained model (`backbone`), a method or a comma-separated list of methods
    (`method`, with `backbone` / `aux` for those that take them). Defaults are the command line's."""

    data: str
    out: Path = Path("results")
    run: Path | None = None
    backbone: str | None = None
    method: str | None = None
    classes: list[str] | None = None
    batch_size: int = 8
    workers: int | None = None
    image_size: int | None = None
    device: str | None = None
    n_overlays: int = 6
    threshold: float | None = None
    force: bool = False
    allow_missing_masks: bool = False
    aux: str | None = None
    k_shot: int = 0
    mutual: bool = False
    reference: Path | None = None
    class_words: str | None = None
    strict: bool = False
    rscin_windows: list[int] | None = None
    calibration: Path | None = None        # a calibration file of the method's scoring mode (kano calibrate)
    class_names: list[str] | None = None   # --class NAME|NAME=FOLDER: which class a folder of --data is
    reference_sampling: str | None = None  # with --k-shot: "first" K by path or "seeded[:SEED]" (April-GAN's rule)
    model: Path | None = None              # an exported graph (kano export): its metrics on the data

    # the options an exported graph cannot use, with why
    NOT_WITH_MODEL = {"run": "the graph is the model", "backbone": "the graph is the model", "method": "the graph is the model",
                      "aux": "the graph is the model", "k_shot": "the graph holds no reference memory",
                      "reference": "the graph holds no reference memory", "reference_sampling": "the graph holds no reference memory",
                      "mutual": "the graph scores each image on its own", "rscin_windows": "the graph scores each image on its own",
                      "class_words": "the graph's prompt words were fixed at export", "device": "the graph runs on the CPU",
                      "image_size": "the graph has its own size", "workers": "the graph's runtime decodes in its own process",
                      "calibration": "the graph carries its thresholds"}

    @property
    def methods(self) -> list[str]:
        return [m.strip() for m in self.method.split(",")] if self.method else []

    def refuse_unused(self) -> None:
        """Refuse each given option that the chosen source would not use (the method's own checks come when it is
        loaded: kano.core.registry.check_given)."""
        if self.model is not None:
            _refuse_beside_model(self, self.NOT_WITH_MODEL)
        if len(self.methods) > 1:  # a list: the options of one method's own run
            for name, why in {"mutual": "fuses one method with MuSc", "k_shot": "sets one method's references",
                              "reference": "sets one method's references",
                              "reference_sampling": "draws one method's references",
                              "rscin_windows": "sets MuSc's windows for one method",
                              "calibration": "holds one scoring mode's thresholds"}.items():
                if _given(getattr(self, name)):
                    raise KanoError(f"{flag(name)} must go with one --method ({why}; run that method on its own), "
                                    f"got --method {self.method}")
        if self.run and self.image_size is not None:
            raise KanoError(f"--image-size is used with --backbone or --method only (a run scores at its own size), "
                            f"got --image-size {self.image_size} with --run {self.run}")

    def common(self) -> dict:
        """Every option but the method's sources, as keyword arguments (evaluate_many passes them to each method)."""
        skip = {"method", "run", "backbone", "aux", "out", "force", "model"}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}


@dataclass
class PredictOptions:
    """`kano predict`: a run, the untrained model (`backbone`), a per-image method, or an exported graph (`model`,
    scored without torch). Defaults are the command line's."""

    inputs: list[str]
    class_name: str
    out: Path = Path("predictions")
    run: Path | None = None
    backbone: str | None = None
    method: str | None = None
    model: Path | None = None
    class_word: str | None = None
    reference: Path | None = None
    k_shot: int = 0
    threshold: float | None = None
    batch_size: int = 8
    workers: int = 0
    device: str | None = None
    force: bool = False
    image_size: int | None = None
    maps: bool = True
    panels: bool = True
    fmt: str = "jsonl"
    resume: bool = False
    calibration: Path | None = None

    # the options an exported graph cannot use, with why
    NOT_WITH_MODEL = {"run": "the graph is the model", "backbone": "the graph is the model", "method": "the graph is the model",
                      "reference": "the graph holds no reference memory", "k_shot": "the graph holds no reference memory",
                      "class_word": "the graph's prompt words were fixed at export", "device": "the graph runs on the CPU",
                      "image_size": "the graph has its own size", "workers": "the graph's runtime decodes in its own process",
                      "calibration": "the graph carries its thresholds"}

    def refuse_unused(self) -> None:
        """Refuse each given option that the chosen source would not use (a method's own checks come when it is
        loaded: kano.core.registry.check_given)."""
        if self.model is not None:
            _refuse_beside_model(self, self.NOT_WITH_MODEL)


def run_predict(opts: "PredictOptions"):
    """`kano predict` from its options (evaluator.options.PredictOptions): refuse what the chosen source would not
    use, then score with the exported graph (--model: this path imports no torch, for the torch-free runtime) or
    the torch model."""
    opts.refuse_unused()
    if opts.model is not None:
        from kano.deploy import command as deploy_command

        return deploy_command.predict(model=opts.model, inputs=opts.inputs, class_name=opts.class_name, out=opts.out,
                                      threshold=opts.threshold, batch_size=opts.batch_size, force=opts.force, maps=opts.maps,
                                      panels=opts.panels, fmt=opts.fmt, resume=opts.resume)
    from kano.evaluator.command import predict

    return predict(inputs=opts.inputs, class_name=opts.class_name, run=opts.run, backbone=opts.backbone, out=opts.out,
                   threshold=opts.threshold, batch_size=opts.batch_size, device=opts.device, workers=opts.workers,
                   force=opts.force, method=opts.method, reference=opts.reference, k_shot=opts.k_shot,
                   class_word=opts.class_word, maps=opts.maps, panels=opts.panels, fmt=opts.fmt, resume=opts.resume,
                   image_size=opts.image_size, calibration=opts.calibration)
