"""Glue for `kano export`, `kano predict --model` and `kano serve`: check options, call the library, print."""

from __future__ import annotations

from pathlib import Path

from kano.core import ui


def export(*, run, method, backbone, classes: str, fmt: str, out: Path, fp16: bool, calibration=None) -> dict:
    from .export import export as run_export

    side = run_export(run=str(run) if run else None, method=method, backbone=backbone,
                      classes=[c.strip() for c in classes.split(",")], fmt=fmt, out=Path(out), fp16=fp16, calibration=calibration)
    thr = ", ".join(f"{c} {'none' if t is None else f'{t:.4f}'}" for c, t in side["thresholds"].items())
    ui.out.print(f"written {out} ({side['model_format']}, {side['precision']}) and {Path(out).with_suffix('.json')}: "
                 f"{side['method']} on {side['backbone']}, {side['image_size']} px, classes {', '.join(side['classes'])}; thresholds {thr}")
    return side


def predict(*, model: Path, inputs, class_name: str, out: Path, threshold, batch_size: int, force: bool, maps: bool = True,
            panels: bool = True, fmt: str = "jsonl") -> list[dict]:
    """`kano predict --model` (evaluator.options.PredictOptions has refused the options a graph cannot use)."""
    from .runtime import predict as run_predict

    records = run_predict(model, inputs, class_name, Path(out), threshold, batch_size, force, ui.progress_factory("scoring"),
                          maps=maps, panels=panels, fmt=fmt)
    from kano.evaluator.records import worst_first

    ui.print_table(f"predictions ({class_name}, {Path(model).name}), flagged first, by score", ["image", "score", "anomalous"],
                   [(Path(r["image"]).name, "-" if r["score"] is None else r["score"],
                     "error" if r["error"] else ("-" if r["anomalous"] is None else ("yes" if r["anomalous"] else "no")))
                    for r in worst_first(records, len(records))])
    failed = [r for r in records if r["error"]]
    for r in failed:
        ui.err.print(f"not scored: {r['error']}")
    files = ["index.html", "predictions.jsonl"] + (["predictions.parquet"] if fmt == "parquet" else [])
    files += (["panels/"] if panels else []) + (["maps/ (npy and 16-bit png)"] if maps else [])
    ui.out.print(f"written to {out}: {', '.join(files)}")
    if failed:
        raise SystemExit(1)
    return records


def serve(*, run, model, host, port, public, classes, folder, batch, batch_wait_ms, queue_length, max_upload_mb, timeout_s,
          threads, calibration=None) -> None:
    from .serve import Limits, serve as run_serve

    limits = Limits(max_upload_bytes=int(max_upload_mb * 1024 * 1024), queue_length=queue_length, timeout_s=timeout_s,
                    batch=batch, batch_wait_ms=batch_wait_ms)
    run_serve(run=str(run) if run else None, model=str(model) if model else None, host=host, port=port, public=public,
              folder=str(folder) if folder else None, classes=[c.strip() for c in classes.split(",")] if classes else None,
              limits=limits, threads=threads, calibration=str(calibration) if calibration else None)
