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
            panels: bool = True, fmt: str = "jsonl", resume: bool = False, threads: int | None = None) -> list[dict]:
    """`kano predict --model` (evaluator.options.PredictOptions has refused the options a graph cannot use): the
    exported graph through the streaming loop of `--run` (evaluator.predict: rows as they are scored, resume, Parquet,
    sharded under torchrun). One process imports no torch; a launch's processes talk through torch.distributed."""
    import os

    from kano.evaluator.predict import predict as run_predict

    from .runtime import ExportedModel

    graph = ExportedModel(model, threads, threshold=threshold)
    dist = None
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:  # torchrun / accelerate launch: the graph on each process's CPU
        from kano.core.device import resolve_device
        from kano.core.distributed import Dist

        dist = Dist.from_env("cpu", resolve_device)
    try:
        rows = run_predict(graph, inputs, class_name, Path(out), batch_size=batch_size, progress=ui.progress_factory("scoring"),
                           force=force, maps=maps, panels=panels, fmt=fmt, resume=resume, dist=dist)
    finally:
        if dist is not None:
            dist.close()
    if dist is not None and not dist.main:
        return rows
    from kano.evaluator.records import print_worst, print_written

    print_worst(rows, f"{class_name}, {Path(model).name}")
    print_written(rows, out, fmt, maps, panels)
    s = rows.summary
    if s["errors"]:
        raise SystemExit(1)
    return rows


def serve(*, run, model, host, port, public, classes, folder, batch, batch_wait_ms, queue_length, max_upload_mb, timeout_s,
          threads, calibration=None) -> None:
    from .serve import Limits, serve as run_serve

    limits = Limits(max_upload_bytes=int(max_upload_mb * 1024 * 1024), queue_length=queue_length, timeout_s=timeout_s,
                    batch=batch, batch_wait_ms=batch_wait_ms)
    run_serve(run=str(run) if run else None, model=str(model) if model else None, host=host, port=port, public=public,
              folder=str(folder) if folder else None, classes=[c.strip() for c in classes.split(",")] if classes else None,
              limits=limits, threads=threads, calibration=str(calibration) if calibration else None)
