"""Glue for `kano train`: resolve the config, run the training loop, print the summary."""

from __future__ import annotations

import os
import shlex
import signal
import sys
from pathlib import Path

from kano.core import ui


def _is_main() -> bool:
    return os.environ.get("RANK", "0") in ("", "0")


def _resume_command() -> str:
    """The command line that was run, with --resume added (what to type to continue)."""
    argv = [Path(sys.argv[0]).name if sys.argv else "kano", *sys.argv[1:]]
    if argv[0] not in ("kano",):
        argv[0] = "kano"
    if "--resume" not in argv:
        argv.append("--resume")
    return shlex.join(argv)


class _TermAsInterrupt:
    """SIGTERM (kill, a scheduler's preemption) handled like Ctrl-C: stop at once and say what is saved."""

    def __enter__(self):
        self.old = None
        try:
            self.old = signal.signal(signal.SIGTERM, self._raise)
        except ValueError:  # not the main thread
            pass
        return self

    @staticmethod
    def _raise(signum, frame):
        raise KeyboardInterrupt

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGTERM, self.old)


def train(config_file, resume: bool, overrides: dict, allow_missing_masks: bool = False) -> dict:
    from kano.trainer import TrainConfig, train as run_train
    from kano.trainer.checkpoint import read_config
    from kano.trainer.train import TrainInterrupted

    if resume and overrides.get("out") and config_file is None and (Path(overrides["out"]) / "config.json").is_file():
        saved = {"aug_rate": 0.0, **read_config(Path(overrides["out"])).get("train", {})}  # runs before the mosaic had none
        cfg = TrainConfig.from_sources(None, {**{k: v for k, v in saved.items() if k != "model"}, **(saved.get("model") or {}),
                                              **{k: v for k, v in overrides.items() if v is not None}})
    else:
        cfg = TrainConfig.from_sources(str(config_file) if config_file else None, overrides)
    main = _is_main()
    if main:
        ui.err.print(f"training {cfg.method} on {cfg.backbone} with {cfg.data} -> {cfg.out}")
    try:
        with _TermAsInterrupt():
            result = run_train(cfg, resume=resume, progress=ui.progress_factory, log=ui.out.print,
                               allow_missing_masks=allow_missing_masks)
    except TrainInterrupted as exc:
        if main:  # plain stderr, not the console: a wrapped command line could not be pasted
            how = f"\n  {_resume_command()}" if exc.resumable else ""
            sys.stderr.write(exc.message + how + "\n")
            sys.stderr.flush()
        sys.exit(130)
    if not main:
        return result
    log = result["log"]
    ui.print_table("training", ["epoch", "loss", "kd", "global", "local", "seconds"],
                   [(r["epoch"], r["loss"], r["loss_kd"], r["loss_global"], r["loss_local"], r["seconds"]) for r in log])
    ui.out.print(f"run saved to {result['run_dir']} (decision threshold {result['threshold']:.4f}, from the auxiliary data"
                 + (f"; {result['world_size']} processes" if result["world_size"] > 1 else "") + ")")
    return result
