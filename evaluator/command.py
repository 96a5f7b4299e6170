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

    if run:
        return trained_method(run, info["config"])
    return untrained_info("kanoclip-untrained", backbone)


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
             rscin_windows: list[int] | None = None, scored: dict | None = None) -> dict:
    from kano.evaluator import METRIC_KEYS, evaluate as run_eval, load_model
    from kano.evaluator.evaluate import table_rows

    check_common(batch_size, workers, threshold, n_overlays)
    dist = _dist(device)
    dev = dist.device
    if aux and not method:
        raise KanoError(f"--aux is used by --method retrieval only, got --aux {aux} without --method")
    if rscin_windows and not (mutual or method == "musc"):
        raise KanoError(f"--rscin-windows is used by --method musc and --mutual only, got it with "
                        f"{'--method ' + method if method else '--run' if run else '--backbone'} and no --mutual")
    if method:
        from kano.evaluator.methods import load_method

        model, info = load_method(method, run, backbone, image_size, dev, aux=aux, allow_missing_masks=allow_missing_masks,
                                  k_shot=k_shot, data=data, classes=classes, references=reference, rscin_windows=rscin_windows)
        described = info["method"]
    else:
        model, info = load_model(str(run) if run else None, backbone, image_size, dev)
        described = _method(run, backbone, info)
        if k_shot or reference:  # April-GAN's few-shot memory on the run or the untrained model
            from kano.evaluator.methods import with_patch_memory

            model, described = with_patch_memory(model, described, k_shot, data, reference, classes)
    if mutual:
        from kano.evaluator.methods import with_mutual

        model, described = with_mutual(model, described, f"--method {method}" if method else (f"--run {run}" if run else f"--backbone {backbone}"),
                                       data=data, rscin_windows=rscin_windows)
    from kano.anomaly_data.names import known_words, parse_class_words, unknown_word_warning
    from kano.api import resolve_threshold, weights_sha256

    words = parse_class_words(class_words)
    if described.get("kind") != "baseline":  # the floors use no prompts
        known = known_words(info["prompt_names"])
        for w in words.values():
            if (warning := unknown_word_warning(w, known)) is not None:
                ui.err.print(f"warning: {warning}", markup=False)
    digest = weights_sha256(info.get("config"))
    try:
        result = run_eval(model, data, Path(out), classes, batch_size, workers, dev, info["prompt_names"], n_overlays=n_overlays,
                          progress=ui.progress_factory("evaluating"), method=described, force=force,
                          allow_missing_masks=allow_missing_masks, class_words=words, strict=strict,
                          threshold_for=lambda c: resolve_threshold(threshold, run, c, info["threshold"], digest),
                          dist=dist if dist.world > 1 else None, scored=scored)
    finally:
        dist.close()
    if not dist.main:
        return result
    short = {"image_auroc": "img AUROC", "image_ap": "img AP", "image_f1_max": "img F1max", "pixel_auroc": "px AUROC",
             "pixel_ap": "px AP", "pixel_f1_max": "px F1max", "aupro": "AUPRO"}
    rows = [(r[0], *["-" if v is None else f"{100 * v:.1f}" for v in r[1:]]) for r in table_rows(result)]
    if method:  # setting, kind and name, each word once ("few-shot winclip+", "per-image zero-shot clip")
        what = " ".join([*dict.fromkeys(w for w in (described.get("setting"), described["kind"]) if w), described["name"]])
    else:
        what = "run " + str(run) if run else "untrained " + backbone
    what += " + MuSc (--mutual)" if mutual else ""
    ui.print_table(f"{data} ({what}), percent", ["class", *[short[k] for k in METRIC_KEYS]], rows)
    for cls, m in result["classes"].items():
        t = m["threshold"]
        ui.out.print(f"decision threshold: {'-' if t is None else f'{t:.6f}'} from the {m['threshold_source'] or 'none'} (class {cls})")
    for u in result["unreadable"]:
        ui.err.print(f"not scored (left out of the metrics): {u['error']}", markup=False)
    if result["unreadable"]:
        ui.err.print(f"{len(result['unreadable'])} unreadable image(s) skipped; --strict makes this an error", markup=False)
    ui.out.print(f"written to {out}: report.html, metrics.json, metrics.csv, metrics.md, scores.csv; overlays in {out}/overlays")
    return result


def _dist(device: str | None):
    """The launch's processes (torchrun / accelerate launch set WORLD_SIZE); one process otherwise."""
    from kano.core.distributed import Dist

    return Dist.from_env(device, _device)


# rows printed in the terminal; all of them are in the result file
PRINT_ROWS = 20


def detector(*, run, backbone, method: str | None = None, reference=None, k_shot: int = 0, threshold: float | None = None,
             device: str | None = None, batch_size: int = 8, image_size: int | None = None):
    """The Detector `kano predict` scores with (the Python API's object): a run, a per-image --method on
    --backbone (with --reference DIR --k-shot K for the methods that take references), or the untrained model."""
    from kano.api import Detector

    if method:
        if run:
            raise KanoError(f"--method {method} runs a method that needs no training: give --backbone SPEC, not --run, got --run {run}")
        return Detector.zero_shot(method, backbone, references=reference, k_shot=k_shot, threshold=threshold, device=device,
                                  batch_size=batch_size)
    if reference and not k_shot or k_shot and not reference:
        raise KanoError(f"--reference DIR and --k-shot K >= 1 go together, got {'--reference ' + str(reference) if reference else '--k-shot ' + str(k_shot)} alone")
    if run:
        return Detector.load(run, threshold=threshold, device=device, batch_size=batch_size, references=reference, k_shot=k_shot)
    from kano.evaluator import load_model

    model, info = load_model(None, backbone, image_size, _device(device))
    return Detector.with_references(model, _method(None, backbone, info), reference, k_shot, threshold=threshold,
                                    batch_size=batch_size)


def predict(*, inputs, class_name, run, backbone, out, threshold, batch_size, device, workers: int = 0, force: bool = False,
            method: str | None = None, reference=None, k_shot: int = 0, class_word: str | None = None, maps: bool = True,
            panels: bool = True, fmt: str = "jsonl", resume: bool = False, image_size: int | None = None):
    from kano.evaluator import predict as run_predict

    check_common(batch_size, workers, threshold)
    if image_size is not None and (image_size < 1 or run or method):
        raise KanoError(f"--image-size must be an integer >= 1 with --backbone and no --method (a run uses its own), got {image_size}"
                        + (f" with --run {run}" if run else f" with --method {method}" if method else ""))
    dist = _dist(device)
    try:
        det = detector(run=run, backbone=backbone, method=method, reference=reference, k_shot=k_shot, threshold=threshold,
                       device=str(dist.device), batch_size=batch_size, image_size=image_size)
        word = det.class_word(class_name, class_word)
        if (warning := det.word_warning(word)) is not None and dist.main:
            ui.err.print(f"warning: {warning}", markup=False)
        threshold, source = det.threshold_for(class_name)
        det.begin_class(class_name, word)
        rows = run_predict(det.model, inputs, class_name, Path(out), threshold, batch_size, det.device, word,
                           progress=ui.progress_factory("scoring"), method=det.method, force=force, workers=workers,
                           threshold_source=source, maps=maps, panels=panels, fmt=fmt, resume=resume,
                           dist=dist if dist.world > 1 else None, prompts=det.run_words)
    finally:
        dist.close()
    if not dist.main:
        return rows
    s = rows.summary
    shown = []
    for r in rows:
        if len(shown) == PRINT_ROWS:
            break
        shown.append(r)
    title = f"predictions ({class_name}, class word {word!r})" + ("" if s["images"] <= PRINT_ROWS else f", the first {PRINT_ROWS} of {s['images']}")
    ui.print_table(title, ["image", "score", "anomalous"],
                   [(Path(r["image"]).name, "-" if r["score"] is None else round(r["score"], 6),
                     "error" if r["error"] else ("-" if r["anomalous"] is None else ("yes" if r["anomalous"] else "no"))) for r in shown])
    if threshold is None:
        ui.err.print("no threshold (no --threshold, no calibration and none in the run): scores only")
    else:
        ui.out.print(f"decision threshold: {threshold:.6f} from the {source}")
    errors = 0
    for r in rows:
        if r["error"]:
            errors += 1
            if errors <= PRINT_ROWS:
                ui.err.print(f"not scored: {r['error']}")
    ui.out.print(f"{s['images']} images: {s['scored']} scored ({s['anomalous']} anomalous, {s['normal']} normal), {s['errors']} not scored")
    files = ["index.html", "predictions.jsonl", "summary.json"] + (["predictions.parquet"] if fmt == "parquet" else [])
    files += (["maps/ (npy and 16-bit png)"] if maps else []) + (["panels/"] if panels else [])
    ui.out.print(f"written to {out}: {', '.join(files)}")
    if s["errors"]:
        raise SystemExit(1)
    return rows


def evaluate_many(*, methods: str, out, force: bool = False, backbone: str | None = None, aux: str | None = None,
                  run=None, **common) -> list[dict]:
    """`kano eval --method a,b,c`: each method into OUT/NAME (the other options alike), then their comparison
    (evaluator.table) into OUT itself. Names are checked before anything runs. --backbone goes to the methods
    that take one, --aux to those that need labelled auxiliary data (the registry's `needs`)."""
    from kano.evaluator.methods import ALL_METHODS, BACKBONE_METHODS, MEMORY_METHODS
    from kano.kanoclip.registry import RUN_METHODS as TRAINED_METHODS  # trained and one-class: from a run, not by name
    from kano.evaluator.table import DEFAULT_METRICS, claim_out, comparison_tables, load_results, to_markdown, write_comparison

    names = [m.strip() for m in methods.split(",")]
    bad = [m for m in names if m not in ALL_METHODS or m in TRAINED_METHODS]
    if bad or len(set(names)) != len(names) or len(names) < 2:
        why = (f"unknown {', '.join(repr(m) for m in bad)}" if bad else "a name twice" if len(set(names)) != len(names)
               else "fewer than two")
        raise KanoError(f"--method must be a comma-separated list of distinct NAME (one of "
                        f"{', '.join(m for m in ALL_METHODS if m not in TRAINED_METHODS)}), "
                        f"got {methods!r} ({why})")
    if not backbone and any(m in BACKBONE_METHODS for m in names):
        raise KanoError(f"--method {methods} needs --backbone SPEC for {', '.join(m for m in names if m in BACKBONE_METHODS)}")
    if aux and not any(m in MEMORY_METHODS for m in names):
        raise KanoError(f"--aux is used by --method retrieval only, got --method {methods} with --aux {aux}")
    out = Path(out)
    dirs = [out / n for n in names]
    identity = {"results": [str(d.resolve()) for d in dirs], "metrics": list(DEFAULT_METRICS)}
    claim_out(out, identity, force)  # before the first evaluation: a refused OUT costs nothing
    for n, d in zip(names, dirs):
        evaluate(method=n, out=d, force=force, run=run, backbone=backbone if n in BACKBONE_METHODS else None,
                 aux=aux if n in MEMORY_METHODS else None, **common)
    tables = comparison_tables(load_results(dirs), DEFAULT_METRICS)
    write_comparison(tables, out, identity, claimed=True)
    ui.out.print(to_markdown(tables), markup=False, highlight=False, soft_wrap=True)  # labels may hold [brackets]
    ui.out.print(f"written to {out}: comparison.md, comparison.csv, comparison.json, comparison.html; each method in {out}/NAME")
    return tables
