"""Glue for `kano train`: resolve the config, run the training loop, print the summary."""

from __future__ import annotations

from pathlib import Path

from kano import ui


def train(config_file, resume: bool, overrides: dict, allow_missing_masks: bool = False) -> dict:
    from trainer import TrainConfig, train as run_train
    from trainer.checkpoint import read_config

    if resume and overrides.get("out") and config_file is None and (Path(overrides["out"]) / "config.json").is_file():
        saved = read_config(Path(overrides["out"]))["train"]
        cfg = TrainConfig.from_sources(None, {**{k: v for k, v in saved.items() if k != "model"}, **saved["model"],
                                              **{k: v for k, v in overrides.items() if v is not None}})
    else:
        cfg = TrainConfig.from_sources(str(config_file) if config_file else None, overrides)
    ui.err.print(f"training {cfg.backbone} on {cfg.data} -> {cfg.out}")
    result = run_train(cfg, resume=resume, progress=ui.progress_factory, log=ui.out.print, allow_missing_masks=allow_missing_masks)
    log = result["log"]
    ui.print_table("training", ["epoch", "loss", "kd", "global", "local", "seconds"],
                   [(r["epoch"], r["loss"], r["loss_kd"], r["loss_global"], r["loss_local"], r["seconds"]) for r in log])
    ui.out.print(f"run saved to {result['run_dir']} (decision threshold {result['threshold']:.4f}, from the auxiliary data)")
    return result
