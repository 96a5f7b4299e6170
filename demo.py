"""`kano demo`: the three stages end to end, offline, in the synthetic world, read against its floors.

Trains KAnoCLIP on the auxiliary classes of anomaly_data.world (defect kinds SEEN_DEFECTS only) and
evaluates it zero-shot on the disjoint target classes (every kind, HELD_OUT_DEFECTS included), then
prints one table beside the registry's demo methods on the same backbone (core/registry.py, `demo=True`): the
untrained model (fixed prompts), zero-shot CLIP-AC and WinCLIP, the zero-parameter detectors (per image) and
the transductive floors (which score each test image against the others).
"""

from __future__ import annotations

import time
from pathlib import Path

from kano.core import ui
from kano.core.registry import METHODS as REGISTRY, methods_with

DEMO_BACKBONE = "micro"
DEMO_SIZE = 96           # image side for data, training and evaluation (the micro-CLIP's own size)
# A narrower Bi-CMCI bottleneck than the default 128 keeps the demo within minutes on two CPU cores.
DEMO_MODEL = {"bica_dim": 64, "bica_heads": 2}
# The table's "kind" column per registry kind (an entry's `demo_row` may name its own).
KIND_COLUMN = {"trained": "trained on aux", "zero-shot": "zero-shot, untrained", "zero-parameter": "per-image, 0 params",
               "transductive": "transductive"}


def _classes():
    from kano.anomaly_data.world import WORLD_AUX, WORLD_TARGET

    return WORLD_AUX, WORLD_TARGET


AUX_CLASSES, TARGET_CLASSES = _classes()
METHODS = methods_with(demo=True)  # the table's rows, in the registry's order
PER_IMAGE_BASELINES = methods_with(kind="zero-parameter", demo=True)


def groups() -> dict:
    from kano.anomaly_data.world import COMPARISON_GROUPS

    return dict(COMPARISON_GROUPS)


def rows(backbone: str = DEMO_BACKBONE) -> list[tuple[str, str, str]]:
    """The table's rows in order: (method name in the registry, row name, kind column)."""
    return [(m, *row_label(m, backbone)) for m in METHODS]


def row_label(method: str, backbone: str) -> tuple[str, str]:
    """(name, kind) of a method's row in the demo's table, from its registry entry."""
    spec = REGISTRY[method]
    if spec.demo_row:
        return spec.demo_row
    kind = KIND_COLUMN[spec.kind]
    if spec.kind == "trained":
        return f"{spec.label} (trained)", kind
    if spec.kind == "zero-shot":
        return f"{spec.label} (zero-shot)", kind
    if "backbone" in spec.needs and spec.kind == "transductive":
        return f"{spec.label} ({backbone})", kind
    return spec.label, kind


def run(out: Path, epochs: int = 8, seed: int = 0, backbone: str = DEMO_BACKBONE, n_good: int = 8, n_defect: int = 2,
        n_aux_good: int = 9, n_aux_defect: int = 4, baselines: bool = True) -> dict:
    import torch

    from kano.anomaly_data import synthesize_demo_world
    from kano.evaluator import command as eval_command
    from kano.evaluator.compare import compare
    from kano.evaluator.methods import load_method
    from kano.kb_builder import command as kb_command
    from kano.trainer import command as train_command

    t0 = time.perf_counter()
    out = Path(out)
    ui.out.print(f"[1/5] synthetic world: auxiliary {', '.join(AUX_CLASSES)}; target (unseen) {', '.join(TARGET_CLASSES)}")
    aux, data = synthesize_demo_world(out / "data", seed=seed, size=DEMO_SIZE, n_good=n_good, n_per_defect=n_defect,
                                      n_aux_good=n_aux_good, n_aux_per_defect=n_aux_defect)
    ui.out.print("[2/5] knowledge base from the built-in pack")
    kb = out / "kb.duckdb"
    kb_command.build(classes=",".join(AUX_CLASSES), kb=kb, llm="builtin", vqa="none", images={}, data=None, n_llm=5, m_vqa=1,
                     llm_base_url=None, vqa_base_url=None, temperature=0.7, vqa_temperature=0.2, concurrency=1, retries=0,
                     backoff=1.0, timeout=60.0, seed=seed, dry_run=False, check_names=False)  # the world's own class names
    ui.out.print(f"[3/5] training on the auxiliary classes ({backbone} backbone)")
    run_dir = out / "run"
    resume = (run_dir / "config.json").is_file() and not (run_dir / "weights.safetensors").is_file()
    if not (run_dir / "weights.safetensors").is_file():
        train_command.train(None, resume, dict(kb=str(kb), data=aux, backbone=backbone, out=str(run_dir), epochs=epochs,
                                              batch_size=8, seed=seed, cache="memory", image_size=DEMO_SIZE,
                                              # the built-in pack is all the demo has, by design: said, not warned of
                                              knowledge_sources=["builtin"], **DEMO_MODEL))
    ui.out.print("[4/5] zero-shot evaluation of the trained run on the unseen target classes")
    scored: dict = {}  # the trained run's scores, kept for the table: it is scored once
    result = eval_command.evaluate(data=data, run=run_dir, backbone=None, out=out / "eval", classes=None,
                                   batch_size=16, workers=0, image_size=None, device=None, scored=scored)
    table = []
    if baselines:
        others = [m for m in METHODS if REGISTRY[m].kind != "trained"]
        ui.out.print(f"[5/5] the same target classes: {', '.join(others)}")
        dev = torch.device("cpu")
        entries = []
        for m, name, kind in rows(backbone):
            if REGISTRY[m].kind == "trained":
                entries.append({"name": name, "kind": kind, "scored": scored})
            else:
                bb = backbone if "backbone" in REGISTRY[m].needs else None
                entries.append({"name": name, "kind": kind, "model": load_method(m, None, bb, DEMO_SIZE, dev)[0]})
        about = {"command": "kano demo", "seed": seed, "backbone": backbone, "epochs": epochs, "image_size": DEMO_SIZE,
                 "aux": {"classes": list(AUX_CLASSES), "n_good": n_aux_good, "n_per_defect": n_aux_defect},
                 "target": {"classes": list(TARGET_CLASSES), "n_good": n_good, "n_per_defect": n_defect}}
        table = compare(entries, data, groups(), out / "eval" / "comparison.json", log=ui.out.print, about=about)
        print_comparison(table, out / "eval" / "comparison.md")
    ui.out.print(f"demo finished in {time.perf_counter() - t0:.0f}s: run in {run_dir}, evaluation in {out / 'eval'}")
    return {**result, "comparison": table}


def print_comparison(rows: list[dict], md_path: Path | None = None) -> None:
    from kano.evaluator.compare import method_cells, methods_markdown

    ui.print_table("held-out target classes, % (mean over classes)", *method_cells(rows))
    if md_path is not None:
        Path(md_path).write_text(methods_markdown(rows))
