"""The paper's Table 3 in miniature: KAnoCLIP with each module switched off, in the micro world.

    OMP_NUM_THREADS=2 python bench/ablations.py --out /tmp/abl --seeds 0,1,2

Trains on the world's auxiliary classes (anomaly_data/world.py WORLD_AUX, seen defect kinds) and evaluates
zero-shot on its target classes (WORLD_TARGET), once on the defect kinds the auxiliary data shows and once
on the kinds held out of it (unless --aux/--target give KIND:PATH), with the micro-CLIP backbone. Rows: the full model; --no-knpl, --no-vv, --no-bicmci, --no-adapter (Table 3); the
language-free control (--text-free: the normal and abnormal text features are two freely learned
vectors, VisualAD-style); and the untrained KAnoCLIP, kanoclip-untrained (fixed prompts, no training: seed-independent). Cells are
mean ± standard deviation over seeds of the class-averaged metric, in %. Writes results.json and
results.md into --out. Frozen features are cached on disk under --out and shared by every run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VARIANTS = {  # name -> ModelConfig overrides
    "full KAnoCLIP": {},
    "w/o KnPL (fixed prompts)": {"use_knpl": False},
    "w/o CLIP-VV (Q-K tokens)": {"use_vv": False},
    "w/o Bi-CMCI (linear head)": {"use_bicmci": False},
    "w/o Conv-Adapter": {"use_adapter": False},
    "language-free (2 learned vectors)": {"use_knpl": False, "text_free": True},
}
METRICS = (("image_auroc", "img AUROC"), ("pixel_auroc", "px AUROC"), ("aupro", "AUPRO"), ("image_ap", "img AP"))


def prepare_data(out: Path, seed: int) -> tuple[str, dict[str, str], list[str]]:
    """The world's auxiliary classes (seen defect kinds) and its target classes, split into the defect kinds
    the auxiliary data shows and the kinds held out of it. Returns (aux spec, {target name: spec}, aux classes)."""
    from kano.anomaly_data.synth import synthesize_world
    from kano.anomaly_data.world import HELD_OUT_DEFECTS, SEEN_DEFECTS, WORLD_AUX

    aux = out / "data" / "aux"
    if not (aux / "meta.json").is_file():
        synthesize_world(aux, split="aux", seed=seed, size=128, n_good=8, n_per_defect=2)
    targets = {}
    for name, kinds in (("seen kinds", SEEN_DEFECTS), ("held-out kinds", HELD_OUT_DEFECTS)):
        root = out / "data" / f"target_{name.split()[0]}"
        if not (root / "meta.json").is_file():
            synthesize_world(root, split="target", seed=seed + 1, size=128, n_good=8, n_per_defect=2, defects=kinds)
        targets[name] = f"mvtec:{root}"
    return f"mvtec:{aux}", targets, list(WORLD_AUX)


def build_kb(kb: Path, classes: list[str]) -> None:
    from kano.kb_builder import command as kb_command

    if kb.is_file():
        return
    code = kb_command.build(classes=",".join(classes), kb=kb, llm="builtin", vqa="none", images={}, data=None, n_llm=5, m_vqa=1,
                            llm_base_url=None, vqa_base_url=None, temperature=0.7, vqa_temperature=0.2, concurrency=1,
                            retries=0, backoff=1.0, timeout=60.0, seed=0, dry_run=False)
    if code:
        raise SystemExit(f"knowledge base build failed ({code})")


def evaluate(model, target: str, out: Path, prompt_names: dict) -> dict:
    from kano.evaluator import evaluate as run_eval

    res = run_eval(model, target, out, None, 16, 0, model.backbone.device, prompt_names, n_overlays=0)
    return res["mean"]


def fmt(vals: list[float]) -> str:
    if not vals:
        return "-"
    m = 100 * statistics.fmean(vals)
    return f"{m:.1f} ± {100 * statistics.stdev(vals):.1f}" if len(vals) > 1 else f"{m:.1f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--backbone", default="micro")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--aux", help="auxiliary KIND:PATH (default: the demo's auxiliary classes, synthesized)")
    ap.add_argument("--target", help="target KIND:PATH (default: the demo's held-out target classes, synthesized)")
    ap.add_argument("--variants", help="comma-separated subset of: " + ", ".join(VARIANTS))
    ap.add_argument("--model", default='{"bica_dim": 64, "bica_heads": 2}', help="JSON ModelConfig overrides for every run")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from kano.anomaly_data import load_dataset
    from kano.evaluator import load_model
    from kano.trainer import TrainConfig, train
    from kano.trainer.checkpoint import load_run

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.aux and args.target:
        aux, targets = args.aux, {"target": args.target}
        classes = load_dataset(aux).classes
    else:
        aux, targets, classes = prepare_data(out, 0)
    kb = out / "kb.duckdb"
    build_kb(kb, classes)
    base_model = json.loads(args.model)
    variants = {k: v for k, v in VARIANTS.items() if not args.variants or k in args.variants.split(",") or
                any(w.strip() and w.strip() in k for w in args.variants.split(","))}
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    t_all = time.perf_counter()

    if "kanoclip-untrained (fixed prompts)" not in results:
        model, _ = load_model(None, args.backbone)
        results["kanoclip-untrained (fixed prompts)"] = {"seeds": [None], "seconds": [0], "metrics": [
            {t: evaluate(model, spec, out / "eval" / f"untrained_{t.split()[0]}", {}) for t, spec in targets.items()}]}
        results_path.write_text(json.dumps(results, indent=1))
    for name, over in variants.items():
        for seed in seeds:
            key = f"{name}"
            done = results.get(key, {"seeds": [], "metrics": [], "seconds": []})
            if seed in done["seeds"]:
                continue
            slug = "".join(ch if ch.isalnum() else "_" for ch in name)[:40]
            run_dir = out / "runs" / f"{slug}_s{seed}"
            t0 = time.perf_counter()
            if not (run_dir / "weights.safetensors").is_file():
                if run_dir.exists():
                    import shutil

                    shutil.rmtree(run_dir)
                cfg = TrainConfig(kb=str(kb), data=aux, backbone=args.backbone, out=str(run_dir), epochs=args.epochs, batch_size=8,
                                  seed=seed, cache="disk", cache_dir=str(out / "feature_cache"), model={**base_model, **over})
                train(cfg, log=lambda s: None)
            model, rcfg = load_run(run_dir, "cpu")
            m = {t: evaluate(model.eval(), spec, out / "eval" / f"{slug}_s{seed}_{t.split()[0]}", rcfg.get("prompt_names", {}))
                 for t, spec in targets.items()}
            done["seeds"].append(seed)
            done["metrics"].append(m)
            done["seconds"].append(round(time.perf_counter() - t0, 1))
            results[key] = done
            results_path.write_text(json.dumps(results, indent=1))
            print(f"{name} seed {seed}: " + "; ".join(f"{t}: " + ", ".join(f"{lab} {100 * mt[k]:.1f}" for k, lab in METRICS if mt.get(k) is not None)
                                                      for t, mt in m.items()) + f" ({done['seconds'][-1]:.0f}s)", flush=True)

    order = ["kanoclip-untrained (fixed prompts)", *VARIANTS]
    header = ["variant", *[lab for _, lab in METRICS], "seeds"]
    md = [f"Ablations (trained on {aux}; backbone {args.backbone}, {args.epochs} epochs); class-averaged %, mean ± sd over seeds"]
    for t, spec in targets.items():
        md += ["", f"Target: {spec} ({t})", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for name in order:
            if name not in results:
                continue
            ms = [m[t] for m in results[name]["metrics"] if t in m]
            md.append("| " + " | ".join([name, *[fmt([m[k] for m in ms if m.get(k) is not None]) for k, _ in METRICS],
                                         "-" if results[name]["seeds"] == [None] else ",".join(map(str, results[name]["seeds"]))]) + " |")
    text = "\n".join(md) + "\n"
    (out / "results.md").write_text(text)
    print(text)
    print(f"total {time.perf_counter() - t_all:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
