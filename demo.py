"""`kano demo`: the three stages end to end, offline, on synthetic data and the `tiny` backbone."""

from __future__ import annotations

import time
from pathlib import Path

from kano import ui

AUX_CLASSES = ("weave", "stripes", "noise", "grid", "marble", "disc", "ring", "nut", "triangle", "coin")
TARGET_CLASSES = ("checker", "wood", "dots", "tile", "pill")
# The defect kinds whose cues survive a random-weight backbone (a linear probe on its patch tokens separates
# them); stains and colour changes need real CLIP features and are left to real data.
DEMO_DEFECTS = ("hole", "scratch", "crack")
# A narrower Bi-CMCI bottleneck than the default 128 keeps the demo within minutes on two CPU cores.
DEMO_MODEL = {"bica_dim": 64, "bica_heads": 2}


def run(out: Path, epochs: int = 8, seed: int = 0) -> dict:
    from anomaly_data import synthesize
    from evaluator import command as eval_command
    from kb_builder import command as kb_command
    from trainer import command as train_command

    t0 = time.perf_counter()
    out = Path(out)
    aux, target = out / "data" / "aux", out / "data" / "target"
    ui.out.print(f"[1/4] synthetic data: auxiliary {', '.join(AUX_CLASSES)}; target (unseen) {', '.join(TARGET_CLASSES)}")
    if not (aux / "meta.json").is_file():
        synthesize(aux, list(AUX_CLASSES), seed=seed, n_good=6, n_per_defect=4, defects=DEMO_DEFECTS)
    if not (target / "meta.json").is_file():
        synthesize(target, list(TARGET_CLASSES), seed=seed + 1, n_good=8, n_per_defect=4, defects=DEMO_DEFECTS)
    ui.out.print("[2/4] knowledge base from the built-in pack")
    kb = out / "kb.duckdb"
    kb_command.build(classes=",".join(AUX_CLASSES), kb=kb, llm="builtin", vqa="none", images={}, data=None, n_llm=5, m_vqa=1,
                     llm_base_url=None, vqa_base_url=None, temperature=0.7, vqa_temperature=0.2, concurrency=1, retries=0,
                     backoff=1.0, timeout=60.0, seed=seed, dry_run=False)
    ui.out.print("[3/4] training on the auxiliary classes (tiny random-weight backbone)")
    run_dir = out / "run"
    resume = (run_dir / "config.json").is_file() and not (run_dir / "weights.safetensors").is_file()
    if not (run_dir / "weights.safetensors").is_file():
        train_command.train(None, resume, dict(kb=str(kb), data=f"mvtec:{aux}", backbone="tiny", out=str(run_dir), epochs=epochs,
                                              batch_size=8, seed=seed, cache="memory", **DEMO_MODEL))
    ui.out.print("[4/4] zero-shot evaluation on the unseen target classes")
    result = eval_command.evaluate(data=f"mvtec:{target}", run=run_dir, backbone=None, out=out / "eval", classes=None,
                                   batch_size=16, workers=0, image_size=None, device=None)
    ui.out.print(f"demo finished in {time.perf_counter() - t0:.0f}s: run in {run_dir}, evaluation in {out / 'eval'}")
    return result
