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


def train(config_file, resume: bool, overrides: dict, allow_missing_masks: bool = False, holdout: float | None = None,
          min_holdout: int = 0) -> dict:
    from kano.trainer import TrainConfig, train as run_train
    from kano.trainer.checkpoint import read_config
    from kano.trainer.train import TrainInterrupted

    if resume and overrides.get("out") and config_file is None and (Path(overrides["out"]) / "config.json").is_file():
        saved = {"aug_rate": 0.0, **read_config(Path(overrides["out"])).get("train", {})}  # runs before the mosaic had none
        cfg = TrainConfig.from_sources(None, {**{k: v for k, v in saved.items() if k != "model"}, **(saved.get("model") or {}),
                                              **{k: v for k, v in overrides.items() if v is not None}})
    else:
        cfg = TrainConfig.from_sources(str(config_file) if config_file else None, overrides)
    from kano.kanoclip.registry import is_one_class

    if is_one_class(cfg.method):
        return fit(cfg, resume, holdout, min_holdout)
    if holdout is not None:
        from kano.core.errors import KanoError

        raise KanoError(f"--holdout is used by the one-class methods (fitted on normal photos), got it with --method {cfg.method}")
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


def fit(cfg, resume: bool, holdout: float | None, min_holdout: int) -> dict:
    """`kano train --method NAME` of a one-class method: fit, print what was chosen and where the run is."""
    from kano.core.errors import KanoError
    from kano.trainer.one_class import fit_run

    if resume:
        raise KanoError(f"--resume continues an interrupted training; --method {cfg.method} is fitted in one pass: run the "
                        "command again without --resume into a new --out")
    if holdout is not None and (isinstance(holdout, bool) or not 0.0 < holdout < 1.0):
        raise KanoError(f"--holdout must be a fraction in (0, 1) of the normal photos to keep out of the fit, got {holdout}")
    ui.err.print(f"fitting {cfg.method} on {cfg.backbone} with {cfg.data} -> {cfg.out}")
    result = fit_run(cfg, holdout=holdout, min_holdout=min_holdout, log=ui.out.print)
    info = result["fit"]
    rows = info.get("variants") or []
    if rows:
        keys = [k for k in rows[0] if k != "chosen"]
        ui.print_table("variants (validation on the synthetic defects, out-of-fold)", [*keys, "chosen"],
                       [(*(r[k] for k in keys), "*" if r.get("chosen") else "") for r in rows])
    thr = result["threshold"]
    ui.out.print(f"run saved to {result['run_dir']} ({result['image_size']} px, fitted in {result['seconds']:.1f}s; "
                 + (f"decision threshold {thr:.4f}, F1-best on the synthetic defects)" if thr is not None else
                    "no decision threshold: calibrate it with `kano calibrate`)"))
    return result
