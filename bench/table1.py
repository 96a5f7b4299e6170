"""The paper's Table 1 in the micro world: every method of one harness on the same unseen target classes.

    OMP_NUM_THREADS=1 python bench/table1.py --out /tmp/table1 --seeds 0,1

(one torch thread per job on a shared machine; OMP_NUM_THREADS=2 on two quiet cores.)

Data as `kano demo` makes it (anomaly_data/world.py): the trained methods (KAnoCLIP, April-GAN, AnomalyCLIP, MVFA-AD)
learn on the auxiliary classes (seen defect kinds only) and are evaluated zero-shot on the disjoint target classes
(every kind, the held-out ones included), on the micro-CLIP. All trained methods get the same budget: 8 epochs, batch
8, no mosaic, each with its authors' optimiser (Adam, betas (0.5, 0.999), lr 1e-3; MVFA-AD's 1e-4); their published
epoch counts and batch sizes (15, 3/15, 50 at batch 1) are not used, so that the comparison is at equal cost. Beside them: the untrained model, the zero-shot CLIP methods, the
retrieval memory of the auxiliary features, the zero-parameter detectors (per image) and the transductive methods
(which see the whole test set of a class: marked "transductive"): `mutual`, full MuSc, `musc_randconv` and the
`--mutual` fusion of each trained method with MuSc.

Writes into --out: results.json (every number, per seed, per class and per group of defect kinds, with what produced
it), table1.md (per class image / pixel AUROC in the paper's layout, best per row in bold; seed 0 for trained
methods) and summary.md (class means, mean ± sd over seeds, all / seen / held-out kinds, AUPRO). Resumable: a
finished entry in results.json is not recomputed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from ablations import build_kb, fmt  # noqa: E402  (the same knowledge base and mean ± sd as the ablation table)

# the demo's image side and KAnoCLIP's narrower Bi-CMCI bottleneck (the peers keep their published settings)
from kano.demo import DEMO_MODEL as KANOCLIP_MODEL, DEMO_SIZE as SIZE  # noqa: E402


def prepare(out: Path, seed: int = 0):
    """The demo's data and knowledge base. -> (aux spec, target spec, kb path)."""
    from kano.anomaly_data import synthesize_demo_world
    from kano.anomaly_data.world import WORLD_AUX

    aux, target = synthesize_demo_world(out / "data", seed=seed, size=SIZE)
    kb = out / "kb.duckdb"
    build_kb(kb, list(WORLD_AUX))
    return aux, target, kb


def train_run(method: str, seed: int, aux: str, kb: Path, out: Path, epochs: int, backbone: str) -> Path:
    from kano.trainer import TrainConfig, train

    run_dir = out / "runs" / f"{method}_s{seed}"
    if not (run_dir / "weights.safetensors").is_file():
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)
        model = KANOCLIP_MODEL if method == "kanoclip" else {}
        # the same budget for every trained method (epochs, batch 8, no mosaic); each its own published optimiser
        cfg = TrainConfig(method=method, kb=str(kb), data=aux, backbone=backbone, out=str(run_dir), epochs=epochs, batch_size=8,
                          aug_rate=0.0, seed=seed, cache="disk", cache_dir=str(out / "feature_cache"), image_size=SIZE, model=model)
        train(cfg, log=lambda s: None)
    return run_dir


def score(model, target: str, prompt_names: dict | None = None) -> dict:
    """-> {"classes": {class: {image_auroc, pixel_auroc}}, "groups": {all|seen|held_out: {...}}} on the target."""
    from kano.anomaly_data.world import COMPARISON_GROUPS
    from kano.evaluator.compare import grouped_metrics, score_classes
    from kano.evaluator.metrics import image_auroc, pixel_auroc

    scored = score_classes(model, target, prompt_names=prompt_names)
    per_class = {c: {"image_auroc": image_auroc(torch_tensor([s.label for s in samples]), scores),
                     "pixel_auroc": pixel_auroc(masks, maps)} for c, (samples, scores, maps, masks) in scored.items()}
    groups = {k: v for k, v in COMPARISON_GROUPS.items() if k in ("all", "seen", "held_out")}
    return {"classes": per_class, "groups": grouped_metrics(scored, groups)}


def torch_tensor(x):
    import torch

    return torch.tensor(x)


# The table's "kind" column per registry kind.
KIND_COLUMN = {"trained": "trained on aux", "zero-shot": "zero-shot", "memory": "memory of aux",
               "zero-parameter": "per-image, 0 params", "transductive": "transductive"}


def entries(args, aux: str, target: str, kb: Path, out: Path, seeds: list[int]):
    """(key, name, kind, seed, build) for every row, one per method of the registry (trained ones per seed, then
    each trained one fused with MuSc); build() -> (model, prompt_names)."""
    import torch

    from kano.evaluator.methods import load_method, with_mutual
    from kano.kanoclip.runs import load_run
    from kano.core.registry import METHODS

    dev, size, bb = torch.device("cpu"), SIZE, args.backbone
    trained = [m for m, s in METHODS.items() if s.kind == "trained"]
    rows = []
    for m in trained:
        for s in seeds:
            def build(m=m, s=s):
                model, cfg = load_run(train_run(m, s, aux, kb, out, args.epochs, bb), dev)
                return model.eval(), cfg.get("prompt_names", {})
            rows.append((f"{m}/s{s}", METHODS[m].label, KIND_COLUMN["trained"], s, build))
    for m, spec in METHODS.items():
        # one-class methods (PatchCore, PaDiM, oneclass) fit each target product's own normal photos: another
        # setting than Table 1's unseen classes (the paper's table has none of them)
        if spec.kind in ("trained", "one-class"):
            continue
        key = "untrained" if m == "kanoclip-untrained" else m
        name = f"{spec.label} ({bb})" if spec.kind == "transductive" and "backbone" in spec.needs else spec.label
        kind = "untrained" if m == "kanoclip-untrained" else KIND_COLUMN[spec.kind]
        rows.append((key, name, kind, None, lambda m=m, spec=spec: (load_method(
            m, None, bb if "backbone" in spec.needs else None, size, dev, aux=aux if "aux" in spec.needs else None,
            data=target)[0], {})))
    for m in trained:  # `kano eval --run R --mutual`: the run's map and score averaged with MuSc's
        for s in seeds:
            def build(m=m, s=s):
                model, cfg = load_run(train_run(m, s, aux, kb, out, args.epochs, bb), dev)
                return with_mutual(model.eval(), {}, f"--run {m}", data=target)[0], cfg.get("prompt_names", {})
            rows.append((f"{m}+mutual/s{s}", f"{METHODS[m].label} + MuSc (--mutual)", "transductive", s, build))
    return rows


def pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def spread(vals: list) -> str:
    """mean ± sd in percent of the values that exist (ablations.fmt)."""
    return fmt([v for v in vals if v is not None])


def write_tables(results: dict, out: Path, target: str, seeds: list[int]) -> str:
    from kano.evaluator.compare import comparison_tables, to_markdown

    rows = results["rows"]
    # one column per method: trained ones at the first seed
    first = seeds[0]
    cols = [(k, r) for k, r in rows.items() if r["seed"] in (None, first)]
    # the per-class layout, best in bold per setting and the mean row: `kano compare`'s own tables
    records = [{"dir": key, "data": target, "dataset": target, "classes": r["classes"], "provenance": {},
                "method": {"name": r["name"], "kind": r["kind"],
                           "setting": "transductive" if r["kind"] == "transductive" else "per-image"}} for key, r in cols]
    head = (f"Table 1 in the micro world: image / pixel AUROC (%), per target class (unseen), trained methods at seed "
            f"{first}. Data: {target}.\n\n")
    md = head + to_markdown(comparison_tables(records))
    (out / "table1.md").write_text(md)

    # summary: one line per method, mean ± sd over seeds for trained ones
    by_name: dict[str, list[dict]] = {}
    kinds = {}
    for r in rows.values():
        by_name.setdefault(r["name"], []).append(r)
        kinds[r["name"]] = r["kind"]
    head = ["method", "kind", "img AUROC", "px AUROC", "AUPRO", "seen img / px", "held-out img / px", "seeds"]
    sm = ["Class means (%) on the unseen target classes; trained methods mean ± sd over seeds "
          f"{','.join(map(str, seeds))}.", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name, rs in by_name.items():
        g = lambda grp, m: spread([r["groups"][grp][m] for r in rs])
        sm.append("| " + " | ".join([name, kinds[name], g("all", "image_auroc"), g("all", "pixel_auroc"), g("all", "aupro"),
                                     f"{g('seen', 'image_auroc')} / {g('seen', 'pixel_auroc')}",
                                     f"{g('held_out', 'image_auroc')} / {g('held_out', 'pixel_auroc')}",
                                     ",".join(str(r["seed"]) for r in rs if r["seed"] is not None) or "-"]) + " |")
    (out / "summary.md").write_text("\n".join(sm) + "\n")
    return "\n".join(sm) + "\n\n" + md


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--backbone", default="micro")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--only", help="comma-separated keys (or prefixes) of the rows to compute, e.g. aprilgan,musc")
    # unset: torch's own count (OMP_NUM_THREADS where set). On a busy machine more threads than free cores make
    # MVFA-AD's epochs (encoded anew every batch) many times slower: measured 9x with 2 threads on 2 shared cores
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: OMP_NUM_THREADS or torch's own)")
    args = ap.parse_args(argv)

    import torch

    from kano.evaluator.report import stamp

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    aux, target, kb = prepare(out)
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {"rows": {}}
    t_all = time.perf_counter()
    for key, name, kind, seed, build in entries(args, aux, target, kb, out, seeds):
        if key in results["rows"] or (args.only and not any(key.startswith(p) for p in args.only.split(","))):
            continue
        t0 = time.perf_counter()
        model, names = build()
        row = {"name": name, "kind": kind, "seed": seed, **score(model, target, names), "seconds": round(time.perf_counter() - t0, 1)}
        results["rows"][key] = row
        results["produced_by"] = {"command": "bench/table1.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                                  "aux": aux, "target": target, "backbone": args.backbone, "epochs": args.epochs, **stamp()}
        path.write_text(json.dumps(results, indent=1))
        a = row["groups"]["all"]
        print(f"{key:28s} img {pct(a['image_auroc'])}  px {pct(a['pixel_auroc'])}  aupro {pct(a['aupro'])}  ({row['seconds']:.0f}s)",
              flush=True)
    print(write_tables(results, out, target, seeds))
    print(f"total {time.perf_counter() - t_all:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
