"""`kano demo`: the three stages end to end, offline, in the synthetic world, read against its floors.

Trains KAnoCLIP on the auxiliary classes of anomaly_data.world (defect kinds SEEN_DEFECTS only) and
evaluates it zero-shot on the disjoint target classes (every kind, HELD_OUT_DEFECTS included), then
prints one table beside the untrained model (fixed prompts), zero-shot CLIP-AC and WinCLIP on the same backbone, the zero-parameter
detectors (per image) and the transductive floor (mutual scoring across the test set).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from kano import ui

DEMO_BACKBONE = "micro"
DEMO_SIZE = 96           # image side for data, training and evaluation (the micro-CLIP's own size)
# A narrower Bi-CMCI bottleneck than the default 128 keeps the demo within minutes on two CPU cores.
DEMO_MODEL = {"bica_dim": 64, "bica_heads": 2}
PER_IMAGE_BASELINES = ("median_colour", "darkness", "brightness", "local_median", "self_similarity", "self_similarity_randconv")
TRANSDUCTIVE_BASELINES = ("mutual", "musc_randconv")
ZERO_SHOT = (("clip-ac", "CLIP-AC (zero-shot)"), ("winclip", "WinCLIP (zero-shot)"))


def _classes():
    from kano.anomaly_data.world import WORLD_AUX, WORLD_TARGET

    return WORLD_AUX, WORLD_TARGET


AUX_CLASSES, TARGET_CLASSES = _classes()


def groups() -> dict:
    from kano.anomaly_data.world import DEFECT_GROUPS, HELD_OUT_DEFECTS, SEEN_DEFECTS

    return {"all": None, "seen": SEEN_DEFECTS, "held_out": HELD_OUT_DEFECTS, **DEFECT_GROUPS}


def run(out: Path, epochs: int = 8, seed: int = 0, backbone: str = DEMO_BACKBONE, n_good: int = 8, n_defect: int = 2,
        n_aux_good: int = 9, n_aux_defect: int = 4, baselines: bool = True) -> dict:
    import torch

    from kano.anomaly_data import synthesize_world
    from kano.evaluator import command as eval_command
    from kano.evaluator.baselines import load_baseline
    from kano.evaluator.methods import load_method
    from kano.evaluator.compare import compare
    from kano.evaluator.loading import load_model
    from kano.kb_builder import command as kb_command
    from kano.trainer import command as train_command

    t0 = time.perf_counter()
    out = Path(out)
    aux, target = out / "data" / "aux", out / "data" / "target"
    ui.out.print(f"[1/5] synthetic world: auxiliary {', '.join(AUX_CLASSES)}; target (unseen) {', '.join(TARGET_CLASSES)}")
    if not (aux / "meta.json").is_file():
        synthesize_world(aux, "aux", seed=seed, size=DEMO_SIZE, n_good=n_aux_good, n_per_defect=n_aux_defect)
    if not (target / "meta.json").is_file():
        synthesize_world(target, "target", seed=seed + 1, size=DEMO_SIZE, n_good=n_good, n_per_defect=n_defect)
    ui.out.print("[2/5] knowledge base from the built-in pack")
    kb = out / "kb.duckdb"
    kb_command.build(classes=",".join(AUX_CLASSES), kb=kb, llm="builtin", vqa="none", images={}, data=None, n_llm=5, m_vqa=1,
                     llm_base_url=None, vqa_base_url=None, temperature=0.7, vqa_temperature=0.2, concurrency=1, retries=0,
                     backoff=1.0, timeout=60.0, seed=seed, dry_run=False)
    ui.out.print(f"[3/5] training on the auxiliary classes ({backbone} backbone)")
    run_dir = out / "run"
    resume = (run_dir / "config.json").is_file() and not (run_dir / "weights.safetensors").is_file()
    if not (run_dir / "weights.safetensors").is_file():
        train_command.train(None, resume, dict(kb=str(kb), data=f"mvtec:{aux}", backbone=backbone, out=str(run_dir), epochs=epochs,
                                              batch_size=8, seed=seed, cache="memory", image_size=DEMO_SIZE, **DEMO_MODEL))
    ui.out.print("[4/5] zero-shot evaluation of the trained run on the unseen target classes")
    data = f"mvtec:{target}"
    result = eval_command.evaluate(data=data, run=run_dir, backbone=None, out=out / "eval", classes=None,
                                   batch_size=16, workers=0, image_size=None, device=None)
    rows = []
    if baselines:
        ui.out.print("[5/5] the same target classes: untrained KAnoCLIP, CLIP-AC and WinCLIP, zero-parameter detectors, transductive floor")
        dev = torch.device("cpu")
        trained, info = load_model(str(run_dir), None, None, dev)
        entries = [{"name": "KAnoCLIP (trained)", "kind": "trained on aux", "model": trained, "prompt_names": info["prompt_names"]}]
        untrained, _ = load_model(None, backbone, DEMO_SIZE, dev)
        entries.append({"name": "KAnoCLIP untrained (fixed prompts)", "kind": "untrained", "model": untrained})
        for m, name in ZERO_SHOT:
            entries.append({"name": name, "kind": "zero-shot, untrained", "model": load_method(m, None, backbone, DEMO_SIZE, dev)[0]})
        for m in PER_IMAGE_BASELINES:
            entries.append({"name": m, "kind": "per-image, 0 params", "model": load_baseline(m, None, None, DEMO_SIZE, dev)[0]})
        for m in TRANSDUCTIVE_BASELINES:
            bb = backbone if m == "mutual" else None
            name = f"mutual ({backbone})" if m == "mutual" else m
            entries.append({"name": name, "kind": "transductive", "model": load_baseline(m, None, bb, DEMO_SIZE, dev)[0]})
        about = {"command": "kano demo", "seed": seed, "backbone": backbone, "epochs": epochs, "image_size": DEMO_SIZE,
                 "aux": {"classes": list(AUX_CLASSES), "n_good": n_aux_good, "n_per_defect": n_aux_defect},
                 "target": {"classes": list(TARGET_CLASSES), "n_good": n_good, "n_per_defect": n_defect}}
        rows = compare(entries, data, groups(), out / "eval" / "comparison.json", log=ui.out.print, about=about)
        print_comparison(rows, out / "eval" / "comparison.md")
    ui.out.print(f"demo finished in {time.perf_counter() - t0:.0f}s: run in {run_dir}, evaluation in {out / 'eval'}")
    return {**result, "comparison": rows}


def print_comparison(rows: list[dict], md_path: Path | None = None) -> None:
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"
    head = ["method", "kind", "img AUROC", "px AUROC", "AUPRO", "seen img/px", "held-out img/px", "part img/px", "struct. img/px"]
    table = []
    for r in rows:
        m = r["metrics"]
        pair = lambda g: f"{pct(m[g]['image_auroc'])} / {pct(m[g]['pixel_auroc'])}"
        table.append((r["name"], r["kind"], pct(m["all"]["image_auroc"]), pct(m["all"]["pixel_auroc"]), pct(m["all"]["aupro"]),
                      pair("seen"), pair("held_out"), pair("part"), pair("structural")))
    ui.print_table("held-out target classes, % (mean over classes)", head, table)
    if md_path is not None:
        md = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"] + ["| " + " | ".join(t) + " |" for t in table]
        md += ["", "per-image and untrained methods see one image at a time; transductive ones score each test image",
               "against the other test images of its class (no labels, no training)."]
        Path(md_path).write_text("\n".join(md) + "\n")


def load_comparison(out: Path) -> dict:
    return json.loads((Path(out) / "eval" / "comparison.json").read_text())
