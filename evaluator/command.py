"""Glue for `kano eval` and `kano predict`: build the model, call the library, print results."""

from __future__ import annotations

from pathlib import Path

import torch

from kano.core import ui
from kano.core.errors import KanoError


def _device(name: str | None) -> torch.device:
    from kano.core.device import resolve_device

    return resolve_device(name)


def _method(run, backbone, info) -> dict:
    from kano.evaluator.loading import untrained_info
    from kano.evaluator.report import trained_method
    from kano.kanoclip.registry import UNTRAINED_METHOD

    if run:
        return trained_method(run, info["config"])
    return untrained_info(UNTRAINED_METHOD, backbone)


def uses_prompts(described: dict) -> bool:
    """Whether the method a provenance dict describes scores with prompts naming the class (its registry entry)."""
    from kano.kanoclip.registry import METHODS

    spec = METHODS.get(described.get("method"))
    return spec is not None and spec.prompts


def check_common(batch_size: int, workers: int | None = 0, threshold: float | None = None, n_overlays: int = 0) -> None:
    """Value checks shared by eval and predict: 'X must be Y, got Z'."""
    if batch_size < 1:
        raise KanoError(f"--batch-size must be an integer >= 1, got {batch_size}")
    if workers is not None and workers < 0:
        raise KanoError(f"--workers must be an integer >= 0 (0: load in the main process), got {workers}")
    if threshold is not None and not (0.0 <= threshold <= 1.0):
        raise KanoError(f"--threshold must be a number in [0, 1] (scores are in [0, 1]), got {threshold}")
    if n_overlays < 0:
        raise KanoError(f"--n-overlays must be an integer >= 0, got {n_overlays}")


def evaluate(*, data, run, backbone, out, classes, batch_size, workers, image_size, device, n_overlays: int = 6,
             threshold: float | None = None, force: bool = False, allow_missing_masks: bool = False,
             method: str | None = None, aux: str | None = None, mutual: bool = False, k_shot: int = 0,
             reference=None, class_words: str | None = None, strict: bool = False,
             rscin_windows: list[int] | None = None, scored: dict | None = None, calibration=None,
             class_names: list[str] | None = None,
             reference_sampling: str | None = None) -> dict:
    from kano.evaluator import evaluate as run_eval, load_model

    check_common(batch_size, workers, threshold, n_overlays)
    if reference_sampling is not None:
        from kano.evaluator.methods import parse_sampling

        parse_sampling(reference_sampling)
        if not k_shot or reference:
            raise KanoError(f"--reference-sampling chooses among each class's train images for --k-shot (without "
                            f"--reference), got --reference-sampling {reference_sampling} "
                            f"{'with --reference' if reference else 'without --k-shot'}")
    folder_names = class_folders(class_names or [], data)  # {FOLDER: NAME}
    if folder_names:  # the methods read --data's folders (references of --k-shot): they get the folder names
        name_folders = {n: f for f, n in folder_names.items()}
        classes_given = classes
        classes = [name_folders.get(c, c) for c in classes] if classes else None
    dist = _dist(device)
    dev = dist.device
    from kano.kanoclip.registry import methods_with, methods_with_option

    if aux and not method:
        raise KanoError(f"--aux is used by --method {', '.join(methods_with(needs='aux'))} only, got --aux {aux} without --method")
    if rscin_windows and not (mutual or method in methods_with_option("rscin_windows")):
        raise KanoError(f"--rscin-windows is used by --method {', '.join(methods_with_option('rscin_windows'))} and --mutual "
                        f"only, got it with {'--method ' + method if method else '--run' if run else '--backbone'} and no --mutual")
    if method:
        from kano.evaluator.methods import load_method

        model, info = load_method(method, run, backbone, image_size, dev, aux=aux, allow_missing_masks=allow_missing_masks,
                                  k_shot=k_shot, data=data, classes=classes, references=reference,
                                  rscin_windows=None if mutual else rscin_windows, class_word=class_words,
                                  sampling=reference_sampling)
        described = info["method"]
    else:
        model, info = load_model(str(run) if run else None, backbone, image_size, dev)
        described = _method(run, backbone, info)
        if k_shot or reference:  # April-GAN's few-shot memory on the run or the untrained model
            from kano.evaluator.methods import with_patch_memory

            model, described = with_patch_memory(model, described, k_shot, data, reference, classes, reference_sampling)
    if mutual:
        from kano.evaluator.methods import with_mutual

        model, described = with_mutual(model, described, f"--method {method}" if method else (f"--run {run}" if run else f"--backbone {backbone}"),
                                       data=data, rscin_windows=rscin_windows)
    if folder_names:
        classes = classes_given
        model.rename_references(folder_names)  # references were read per folder; the evaluator names classes
    from kano.anomaly_data.names import class_word as class_word_rule, known_words, parse_class_words, unknown_word_warning
    from kano.evaluator.detector import weights_sha256

    words = parse_class_words(class_words)
    if words and not uses_prompts(described):
        raise KanoError(f"--class-word is used by the methods that score with prompts naming the class, got "
                        f"{described.get('method') or described['name']}, which uses none (got --class-word {class_words})")
    if (info.get("config") or {}).get("class_words") == "folder":  # the run's rule: folder names as they are
        from kano.anomaly_data import load_dataset

        words = {**{c: c for c in (classes or load_dataset(data, missing_masks="warn").classes)}, **words}
    if uses_prompts(described):  # the floors and memories use no prompts
        known = known_words(info["prompt_names"])
        for w in words.values():
            if (warning := unknown_word_warning(w, known)) is not None:
                ui.err.print(f"warning: {warning}", markup=False)
    digest = weights_sha256(info.get("config"))
    thresholds = eval_thresholds(threshold, run, calibration, described, model, digest,
                                 None if (k_shot or reference or mutual) else info["threshold"],
                                 lambda c: class_word_rule(c, words.get(c), info["prompt_names"]))
    try:
        result = run_eval(model, data, Path(out), classes, batch_size, workers, dev, info["prompt_names"], n_overlays=n_overlays,
                          progress=ui.progress_factory("evaluating"), method=described, force=force,
                          allow_missing_masks=allow_missing_masks, class_words=words, strict=strict,
                          threshold_for=thresholds.image, pixel_threshold_for=thresholds.pixel,
                          dist=dist if dist.world > 1 else None, scored=scored, class_names=folder_names or None)
    finally:
        dist.close()
    if not dist.main:
        return result
    if method:  # setting, kind and name, each word once ("few-shot winclip+", "per-image zero-shot clip")
        kind = None if described.get("setting") == "few-shot" else described["kind"]  # given references, not zero-shot
        what = " ".join([*dict.fromkeys(w for w in (described.get("setting"), kind) if w), described["name"]])
    else:
        what = "run " + str(run) if run else "untrained " + backbone
    what += " + MuSc (--mutual)" if mutual else ""
    print_result(result, data, what, out)
    return result


def print_result(result: dict, data: str, what: str, out) -> None:
    """eval's terminal summary: the metrics table, each class's decision threshold, the unreadable images, the files."""
    from kano.evaluator import METRIC_KEYS
    from kano.evaluator.evaluate import table_rows

    short = {"image_auroc": "img AUROC", "image_ap": "img AP", "image_f1_max": "img F1max", "pixel_auroc": "px AUROC",
             "pixel_ap": "px AP", "pixel_f1_max": "px F1max", "aupro": "AUPRO"}
    rows = [(r[0], *["-" if v is None else f"{100 * v:.1f}" for v in r[1:]]) for r in table_rows(result)]
    ui.print_table(f"{data} ({what}), percent", ["class", *[short[k] for k in METRIC_KEYS]], rows)
    for cls, m in result["classes"].items():
        t = m["threshold"]
        ui.out.print(f"decision threshold: {'-' if t is None else f'{t:.6f}'} from the {m['threshold_source'] or 'none'} (class {cls})")
    for u in result["unreadable"]:
        ui.err.print(f"not scored (left out of the metrics): {u['error']}", markup=False)
    if result["unreadable"]:
        ui.err.print(f"{len(result['unreadable'])} unreadable image(s) skipped; --strict makes this an error", markup=False)
    ui.out.print(f"written to {out}: report.html, metrics.json, metrics.csv, metrics.md, scores.csv; overlays in {out}/overlays")


def evaluate_model(*, model, data, out, classes, batch_size, n_overlays: int = 6, threshold: float | None = None,
                   force: bool = False, allow_missing_masks: bool = False, strict: bool = False,
                   class_names: list[str] | None = None, threads: int | None = None) -> dict:
    """`kano eval --model FILE`: an exported graph's metrics on a labelled dataset (evaluator.options.EvalOptions has
    refused the options a graph cannot use), to check that an export scores the data as its run did. The graph's
    classes, prompt words and thresholds (or --threshold) are the sidecar's; a class of the data it lacks is refused
    before anything is written. One process (the graph on the CPU)."""
    import os

    from kano.deploy.runtime import ExportedModel
    from kano.evaluator import evaluate as run_eval

    check_common(batch_size, None, threshold, n_overlays)
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise KanoError(f"kano eval --model runs in one process (the graph on the CPU), got a launch of "
                        f"{os.environ['WORLD_SIZE']} processes: run it without torchrun")
    graph = ExportedModel(model, threads, threshold=threshold)
    folder_names = class_folders(class_names or [], data)
    result = run_eval(graph, data, Path(out), classes, batch_size, None, None, graph.words, n_overlays=n_overlays,
                      progress=ui.progress_factory("evaluating"), method=graph.describe(), force=force,
                      allow_missing_masks=allow_missing_masks, strict=strict, threshold_for=graph.threshold_for,
                      pixel_threshold_for=lambda c: graph.pixel_threshold_for(c)[0], class_names=folder_names or None)
    print_result(result, data, f"{graph.meta['method']} exported, {Path(model).name}", out)
    return result


def class_folders(items: list[str], data: str) -> dict[str, str]:
    """`kano eval --class`: NAME (the one class folder of --data is class NAME) or NAME=FOLDER, repeatable
    -> {FOLDER: NAME}."""
    if not items:
        return {}
    from kano.anomaly_data import load_dataset

    folders = load_dataset(data, missing_masks="ignore").classes
    out: dict[str, str] = {}
    for item in items:
        name, eq, folder = (x.strip() for x in item.partition("="))
        if not name or (eq and not folder):
            raise KanoError(f"--class must be NAME or NAME=FOLDER (e.g. hazelnut=hazelnut_toy), got {item!r}")
        if not eq:
            if len(folders) != 1 or len(items) != 1:
                raise KanoError(f"--class NAME alone must go with a --data of one class folder, got {len(folders)} "
                                f"({', '.join(folders[:6])}{', ...' if len(folders) > 6 else ''}): use --class NAME=FOLDER")
            folder = folders[0]
        if folder in out:
            raise KanoError(f"--class must name each folder once, got {folder!r} as {out[folder]!r} and {name!r}")
        out[folder] = name
    return out


class eval_thresholds:
    """Per class, eval's decision threshold and map scale: --threshold > the calibration of this scoring mode
    (--calibration FILE, else RUN/calibration.json; one of another mode is refused by name) > the run's own (None
    with references or --mutual: it was set on the run's plain scores) > none."""

    def __init__(self, given, run, calibration, described: dict, model, digest: str | None, run_threshold, word_of):
        from kano.evaluator import calibrate as C

        self.given, self.run_threshold, self.word_of = given, run_threshold, word_of
        self.path = Path(calibration) if calibration else (Path(run) / C.CALIBRATION_FILE if run else None)
        self.cal = None
        if self.path is not None and (calibration or self.path.is_file()):
            self.cal = C.read_calibration(self.path) if calibration else C.load_calibration(run)
            self.mode = C.scoring_mode(described, model, digest)

    def entry(self, c: str) -> dict | None:
        from kano.evaluator import calibrate as C

        return None if self.cal is None else C.calibration_entry(self.path, self.cal, self.mode, c, self.word_of(c))

    def image(self, c: str) -> tuple:
        from kano.evaluator.detector import resolve_threshold

        if self.given is not None:
            return resolve_threshold(self.given, None, c, None)
        return resolve_threshold(None, None, c, self.run_threshold, calibration=self.entry(c))

    def pixel(self, c: str) -> float | None:
        e = self.entry(c)
        return None if e is None else float(e["pixel_threshold"])


def _dist(device: str | None):
    """The launch's processes (torchrun / accelerate launch set WORLD_SIZE); one process otherwise."""
    from kano.core.distributed import Dist

    return Dist.from_env(device, _device)


def detector(*, run, backbone, method: str | None = None, reference=None, k_shot: int = 0, threshold: float | None = None,
             device: str | None = None, batch_size: int = 8, image_size: int | None = None, calibration=None):
    """The Detector `kano predict` scores with (the Python API's object): a run, a per-image --method on
    --backbone (with --reference DIR --k-shot K for the methods that take references), or the untrained model."""
    from kano.evaluator.detector import Detector

    if method:
        if run:
            raise KanoError(f"--method {method} runs a method that needs no training: give --backbone SPEC, not --run, got --run {run}")
        return Detector.zero_shot(method, backbone, references=reference, k_shot=k_shot, threshold=threshold, device=device,
                                  batch_size=batch_size, style="cli", image_size=image_size, calibration=calibration)
    if reference and not k_shot or k_shot and not reference:
        raise KanoError(f"--reference DIR and --k-shot K >= 1 go together, got {'--reference ' + str(reference) if reference else '--k-shot ' + str(k_shot)} alone")
    if run:
        return Detector.load(run, threshold=threshold, device=device, batch_size=batch_size, references=reference, k_shot=k_shot,
                             calibration=calibration, style="cli")
    from kano.evaluator import load_model

    model, info = load_model(None, backbone, image_size, _device(device))
    return Detector.with_references(model, _method(None, backbone, info), reference, k_shot, threshold=threshold,
                                    batch_size=batch_size, calibration=calibration, style="cli")


def predict(*, inputs, class_name, run, backbone, out, threshold, batch_size, device, workers: int = 0, force: bool = False,
            method: str | None = None, reference=None, k_shot: int = 0, class_word: str | None = None, maps: bool = True,
            panels: bool = True, fmt: str = "jsonl", resume: bool = False, image_size: int | None = None, calibration=None):
    from kano.evaluator import predict as run_predict

    check_common(batch_size, workers, threshold)
    if image_size is not None and (image_size < 1 or run or method):
        raise KanoError(f"--image-size must be an integer >= 1 with --backbone and no --method (a run uses its own), got {image_size}"
                        + (f" with --run {run}" if run else f" with --method {method}" if method else ""))
    dist = _dist(device)
    try:
        det = detector(run=run, backbone=backbone, method=method, reference=reference, k_shot=k_shot, threshold=threshold,
                       device=str(dist.device), batch_size=batch_size, image_size=image_size, calibration=calibration)
        if class_word and not uses_prompts(det.method):
            raise KanoError(f"--class-word is used by the methods that score with prompts naming the class, got "
                            f"{det.method.get('method') or det.method['name']}, which uses none (got --class-word {class_word})")
        word = det.class_word(class_name, class_word)
        if (warning := det.word_warning(word)) is not None and dist.main:
            ui.err.print(f"warning: {warning}", markup=False)
        det.workers = workers
        det.begin_class(class_name, word)
        # a manifest's other classes are decided by the given class's threshold (a run's is set on its class)
        rows = run_predict(det, inputs, class_name, Path(out), class_word=word, batch_size=batch_size,
                           progress=ui.progress_factory("scoring"), force=force, maps=maps, panels=panels, fmt=fmt, resume=resume,
                           dist=dist if dist.world > 1 else None, same_threshold=True)
        threshold, source = det.threshold_for(class_name, word)
        pixel_threshold, _ = det.pixel_threshold_for(class_name, word)
    finally:
        dist.close()
    if not dist.main:
        return rows
    from kano.evaluator.records import print_worst, print_written

    print_worst(rows, f"{class_name}, class word {word!r}")
    if threshold is None:
        ui.err.print("no threshold (no --threshold, no calibration and none in the run): scores only")
    else:
        ui.out.print(f"decision threshold: {threshold:.6f} from the {source}")
    s = rows.summary
    masks = pixel_threshold is not None and s["anomalous"] and (Path(out) / "masks").is_dir()
    print_written(rows, out, fmt, maps, panels,
                  [f"masks/ (each flagged image's defect mask at the pixel threshold {pixel_threshold:.3g})"] if masks else [])
    if s["errors"]:
        raise SystemExit(1)
    return rows


def evaluate_options(opts) -> dict | list[dict]:
    """`kano eval` from its options (evaluator.options.EvalOptions): refuse what the chosen source would not use,
    then one method (or a run, or the untrained model) into OUT, or several into OUT/NAME with their comparison."""
    opts.refuse_unused()
    if opts.model is not None:
        return evaluate_model(model=opts.model, data=opts.data, out=opts.out, classes=opts.classes, batch_size=opts.batch_size,
                              n_overlays=opts.n_overlays, threshold=opts.threshold, force=opts.force,
                              allow_missing_masks=opts.allow_missing_masks, strict=opts.strict, class_names=opts.class_names)
    if len(opts.methods) > 1:
        return evaluate_many(methods=opts.method, out=opts.out, force=opts.force, backbone=opts.backbone, aux=opts.aux,
                             run=opts.run, **opts.common())
    return evaluate(method=opts.method, run=opts.run, backbone=opts.backbone, aux=opts.aux, out=opts.out, force=opts.force,
                    **opts.common())


def evaluate_many(*, methods: str, out, force: bool = False, backbone: str | None = None, aux: str | None = None,
                  run=None, class_words: str | None = None, **common) -> list[dict]:
    """`kano eval --method a,b,c`: each method into OUT/NAME (the other options alike), then their comparison
    (evaluator.compare) into OUT itself. Names are checked before anything runs. --backbone goes to the methods
    that take one, --aux to those that need labelled auxiliary data (the registry's `needs`)."""
    from kano.kanoclip.registry import METHODS, methods_with
    from kano.evaluator.compare import DEFAULT_METRICS, claim_out, comparison_tables, load_results, to_markdown, write_comparison

    untrained = [m for m in methods_with(trained=False) if METHODS[m].kind != "one-class"]  # one-class: from a run
    names = [m.strip() for m in methods.split(",")]
    bad = [m for m in names if m not in untrained]
    if bad or len(set(names)) != len(names) or len(names) < 2:
        why = (f"unknown {', '.join(repr(m) for m in bad)}" if bad else "a name twice" if len(set(names)) != len(names)
               else "fewer than two")
        raise KanoError(f"--method must be a comma-separated list of distinct NAME (one of {', '.join(untrained)}), "
                        f"got {methods!r} ({why})")
    backbone_methods = [m for m in names if "backbone" in METHODS[m].needs]
    aux_methods = [m for m in names if "aux" in METHODS[m].needs]
    if not backbone and backbone_methods:
        raise KanoError(f"--method {methods} needs --backbone SPEC for {', '.join(backbone_methods)}")
    prompt_methods = [m for m in names if METHODS[m].prompts]
    if class_words and not prompt_methods:
        raise KanoError(f"--class-word is used by the methods that score with prompts naming the class "
                        f"({', '.join(methods_with(prompts=True))}), got --method {methods}, none of which uses them")
    if aux and not aux_methods:
        raise KanoError(f"--aux is used by --method {', '.join(methods_with(needs='aux'))} only, got --method {methods} "
                        f"with --aux {aux}")
    out = Path(out)
    dirs = [out / n for n in names]
    identity = {"results": [str(d.resolve()) for d in dirs], "metrics": list(DEFAULT_METRICS)}
    claim_out(out, identity, force)  # before the first evaluation: a refused OUT costs nothing
    for n, d in zip(names, dirs):
        evaluate(method=n, out=d, force=force, run=run, backbone=backbone if n in backbone_methods else None,
                 aux=aux if n in aux_methods else None, class_words=class_words if n in prompt_methods else None, **common)
    tables = comparison_tables(load_results(dirs), DEFAULT_METRICS)
    write_comparison(tables, out, identity, claimed=True)
    ui.out.print(to_markdown(tables), markup=False, highlight=False, soft_wrap=True)  # labels may hold [brackets]
    ui.out.print(f"written to {out}: comparison.md, comparison.csv, comparison.json, comparison.html; each method in {out}/NAME")
    return tables
