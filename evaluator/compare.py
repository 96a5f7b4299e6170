"""Comparison tables, one module for both: several methods side by side on one dataset.

Two tables share one set of cell formats (`pct`, percent with one decimal, "-" for no value) and one Markdown
table writer (`markdown_table`):

- `kano compare` (and `kano eval --method a,b`): several `kano eval` result folders in one table per dataset,
  in the KAnoCLIP paper's layout (Table 1): one row per class plus their mean, one column per method, each cell
  "image AUROC / pixel AUROC" in percent with one decimal, the best of each row and metric in bold.
  `load_results(dirs)` reads each folder's metrics.json, `comparison_tables(results, metrics)` builds the tables
  (no formatting), `to_markdown` / `to_csv` / `to_json` / `to_html` render them, and `write_comparison` writes
  the four files into an `--out` folder (claimed as `evaluator.outputs` does for eval).

  Which values are compared: each class's metrics as the result folder holds them; the mean row is recomputed
  over the table's classes (a folder's own "mean" may cover other classes), skipping None values (a metric a
  class cannot have, e.g. pixel AUROC without masks) as `kano eval` does. A method that lacks one of the
  table's classes shows "-" there and has no mean: its mean would average over other classes than its peers'.

  Transductive methods (they see a class's whole test set at once) are marked with a dagger, placed after the
  per-image ones, and compete for bold only among themselves: the comparison the paper makes is per image.

- The demo's table (`compare`, rendered by `method_cells` / `methods_markdown`): one row per method, scored
  here, with metrics over all defects and per group of defect kinds. A group's subset of a class is its normal
  test images plus the images of the group's kinds; each group's metric is the mean over the classes holding
  that group.

Torch is imported only where a method is scored: `kano compare` reads JSON and writes text.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Callable

from kano.core.errors import KanoError

from . import outputs
from .report import CSS, LABELS, _esc, describe_method, stamp



# ---------------------------------------------------------------- cells and Markdown, shared by both tables

def pct(v: float | None) -> str:
    """A fraction as percent with one decimal; "-" for no value."""
    return "-" if v is None else f"{100 * v:.1f}"


def markdown_table(head: list[str], rows: list) -> list[str]:
    """The lines of a Markdown table: the head, the rule, one line per row of cells."""
    return ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"] + ["| " + " | ".join(r) + " |" for r in rows]


# ---------------------------------------------------------------- `kano compare`: result folders, one table per dataset

DEFAULT_METRICS = ("image_auroc", "pixel_auroc")
METRIC_CHOICES = ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro")
DAGGER = "\u2020"
FILES = ("comparison.md", "comparison.csv", "comparison.json", "comparison.html")
# The mean row is set apart by a rule, not in bold as in report.html: bold marks the best cells here.
TABLE_CSS = "tr.avg td{border-top:2px solid #888;background:#fafafa}tr.avg td:first-child{font-style:italic}td b{color:#000}"


def parse_metrics(raw: str | None) -> list[str]:
    """'image_auroc,pixel_auroc' -> ['image_auroc', 'pixel_auroc'], refusing unknown and repeated names."""
    names = [m.strip() for m in (raw or ",".join(DEFAULT_METRICS)).split(",") if m.strip()]
    bad = [m for m in names if m not in METRIC_CHOICES]
    if not names or bad or len(set(names)) != len(names):
        raise KanoError(f"--metrics must be a comma-separated list of distinct metrics, each one of {', '.join(METRIC_CHOICES)}, "
                        f"got {raw!r}")
    return names


def _data_key(folder: Path, metrics: dict) -> str:
    """The dataset a result is on: the resolved KIND:PATH that `kano eval` recorded in its manifest (so that
    'mvtec:data' and 'mvtec:/abs/data' meet), else metrics.json's dataset as given."""
    try:
        ident = json.loads((folder / outputs.MANIFEST).read_text()).get("identity") or {}
        if isinstance(ident.get("data"), str):
            return ident["data"]
    except (OSError, ValueError, AttributeError):
        pass
    return str(metrics.get("dataset"))


def load_results(dirs: list) -> list[dict]:
    """One record per `kano eval` result folder: {"dir", "data", "dataset", "classes", "method", "provenance"}.

    Refuses (KanoError) a path that is not a folder, a folder without metrics.json, unreadable JSON, a
    metrics.json without per-class metrics, and the same folder given twice."""
    if not dirs:
        raise KanoError("RESULT_DIR must be one or more `kano eval` result folders, got none")
    out, seen = [], {}
    for d in dirs:
        folder = Path(d)
        if not folder.is_dir():
            what = "a file" if folder.exists() else "no such folder"
            raise KanoError(f"RESULT_DIR must be a `kano eval` result folder (holding metrics.json), got {what}: {folder}")
        mf = folder / "metrics.json"
        if not mf.is_file():
            raise KanoError(f"RESULT_DIR must be a `kano eval` result folder (holding metrics.json), got a folder without "
                            f"metrics.json: {folder}")
        try:
            m = json.loads(mf.read_text())
        except (OSError, UnicodeDecodeError) as e:
            raise KanoError(f"{mf} must be readable, got {type(e).__name__}: {e}") from None
        except ValueError as e:
            raise KanoError(f"{mf} must be the JSON that `kano eval` writes, got unreadable JSON ({e})") from None
        if not isinstance(m, dict) or not isinstance(m.get("classes"), dict) or not all(isinstance(v, dict) for v in m["classes"].values()):
            got = f"keys {', '.join(sorted(m))}" if isinstance(m, dict) else type(m).__name__
            raise KanoError(f"{mf} must hold \"classes\": {{class: {{metric: value}}}} as `kano eval` writes it, got {got}")
        key = str(folder.resolve())
        if key in seen:
            raise KanoError(f"RESULT_DIR must name each folder once, got {seen[key]} and {folder}")
        seen[key] = folder
        prov = m.get("provenance") if isinstance(m.get("provenance"), dict) else {}
        method = prov.get("method") if isinstance(prov.get("method"), dict) else {"kind": "unknown", "name": folder.name}
        out.append({"dir": key, "data": _data_key(folder, m), "dataset": str(m.get("dataset")), "classes": m["classes"],
                    "method": method, "provenance": prov})
    return out


def is_transductive(method: dict) -> bool:
    return method.get("setting") == "transductive"


def method_label(method: dict) -> str:
    """A column heading from a method's provenance: 'clip-ac (tiny)', 'median_colour', for a trained run
    'KAnoCLIP (RUN FOLDER, backbone)'."""
    name = str(method.get("name") or method.get("kind") or "method")
    parts = []
    if method.get("kind") in ("trained", "one-class") and method.get("run"):
        parts.append(Path(str(method["run"])).name)
    if method.get("backbone"):
        parts.append(str(method["backbone"]))
    return f"{name} ({', '.join(parts)})" if parts else name


def _unique_labels(results: list[dict]) -> list[str]:
    """Labels made distinct: a clash takes in its result folder's name, then a counter."""
    base = [method_label(r["method"]) for r in results]
    labels = [f"{b} [{Path(r['dir']).name}]" if base.count(b) > 1 else b for b, r in zip(base, results)]
    out, seen = [], set()
    for lab in labels:
        n, cand = 1, lab
        while cand in seen:
            n += 1
            cand = f"{lab}-{n}"
        seen.add(cand)
        out.append(cand)
    return out


def _value(m: dict | None, metric: str) -> float | None:
    v = (m or {}).get(metric)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _best(values: list[float | None], group: list[bool]) -> list[bool]:
    """Which cells of one row and metric are bold: the maximum among those of the same setting (group True:
    transductive); a lone method of its setting has nothing to beat, so it is never bold. Compared as shown
    (percent, one decimal), so that two cells that read alike are both bold."""
    shown = [None if v is None else round(100 * v, 1) for v in values]
    flags = [False] * len(values)
    for g in (False, True):
        vals = [s for s, t in zip(shown, group) if t == g and s is not None]
        if vals and group.count(g) >= 2:
            top = max(vals)
            flags = [f or (t == g and s == top) for f, s, t in zip(flags, shown, group)]
    return flags


def comparison_tables(results: list[dict], metrics=DEFAULT_METRICS) -> list[dict]:
    """One table per dataset (results on different datasets are never mixed), in order of first appearance.

    Each table: {"data", "dataset", "metrics", "methods": [{"label", "dir", "transductive", "method",
    "provenance"}] (per-image first), "rows": [{"class", "values": [[value per metric] per method],
    "best": [[bool per metric] per method]}] with the classes (first appearance order) and last "mean"}.
    Values are fractions in [0, 1] or None (missing)."""
    metrics = list(metrics)
    labels = dict(zip((id(r) for r in results), _unique_labels(results)))
    groups: dict[str, list[dict]] = {}
    for r in results:
        groups.setdefault(r["data"], []).append(r)
    tables = []
    for data, rs in groups.items():
        rs = sorted(rs, key=lambda r: is_transductive(r["method"]))  # stable: per-image first, each in given order
        trans = [is_transductive(r["method"]) for r in rs]
        classes = list(dict.fromkeys(c for r in rs for c in r["classes"]))
        rows = []
        for c in classes:
            values = [[_value(r["classes"].get(c), k) if c in r["classes"] else None for k in metrics] for r in rs]
            rows.append({"class": c, "values": values})
        mean = []
        for r in rs:
            cells = []
            for k in metrics:
                vals = [_value(r["classes"][c], k) for c in classes if c in r["classes"]]
                vals = [v for v in vals if v is not None]
                complete = all(c in r["classes"] for c in classes)
                cells.append(sum(vals) / len(vals) if vals and complete else None)
            mean.append(cells)
        rows.append({"class": "mean", "values": mean})
        for row in rows:
            cols = [_best([row["values"][i][j] for i in range(len(rs))], trans) for j in range(len(metrics))]
            row["best"] = [[cols[j][i] for j in range(len(metrics))] for i in range(len(rs))]
        tables.append({"data": data, "dataset": rs[0]["dataset"], "metrics": metrics, "rows": rows,
                       "methods": [{"label": labels[id(r)], "dir": r["dir"], "transductive": t, "method": r["method"],
                                    "provenance": r["provenance"]} for r, t in zip(rs, trans)]})
    return tables


def _heading(m: dict) -> str:
    return m["label"] + (DAGGER if m["transductive"] else "")


def _cell(values, best, bold: tuple[str, str]) -> str:
    return " / ".join(f"{bold[0]}{pct(v)}{bold[1]}" if b else pct(v) for v, b in zip(values, best))


def _metric_names(t: dict) -> str:
    return " / ".join(LABELS.get(k, k) for k in t["metrics"])


def legend(t: dict) -> str:
    """What a table's cells mean, in one paragraph (the same words in Markdown and HTML)."""
    trans = [m["label"] for m in t["methods"] if m["transductive"]]
    s = (f"Each cell: {_metric_names(t)}, in percent (one decimal). Bold: the best per row and metric "
         f"(ties as shown are all bold). mean: unweighted over the classes of the table, recomputed here; "
         f"-: no value (the method lacks the class, or the class has no masks for pixel metrics; a method "
         f"lacking a class has no mean).")
    few = [m["label"] for m in t["methods"] if (m.get("method") or {}).get("setting") == "few-shot"]
    if few:
        s += f" Few-shot ({', '.join(few)}): also sees k normal training images of each class."
    if trans:
        s += (f" {DAGGER} transductive ({', '.join(trans)}): sees a class's whole test set at once, so it is kept "
              f"apart: placed last and bold only among the transductive methods (a lone one is never bold).")
    else:
        s += (" Every method here scores one test image at a time (no transductive method, which would be marked "
              + DAGGER + ").")
    return s


def _sources(t: dict) -> list[str]:
    return [f"{_heading(m)}: {describe_method(m['method'])}; from {m['dir']}" for m in t["methods"]]


def to_markdown(tables: list[dict]) -> str:
    """The tables as Markdown: per dataset a heading, the table, its legend and where each column came from."""
    md = ["# Kano comparison", ""]
    for t in tables:
        md += [f"## {t['dataset']}", ""] + ([f"Data: {t['data']}", ""] if t["data"] != t["dataset"] else [])
        md += markdown_table(["class", *(_heading(m) for m in t["methods"])],  # bold is kept for the best cells
                             [[row["class"], *(_cell(v, b, ("**", "**")) for v, b in zip(row["values"], row["best"]))]
                              for row in t["rows"]])
        md += ["", legend(t), "", "Columns:", ""] + [f"- {s}" for s in _sources(t)] + [""]
    return "\n".join(md)


def to_csv(tables: list[dict]) -> str:
    """Long format, one line per dataset, class, method and metric; values in percent (the header says so),
    each line with its source folder and the method's provenance."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["dataset", "data", "class", "method", "metric", "value (%)", "best", "setting", "kind", "name", "backbone",
                "run", "produced_by"])
    for t in tables:
        for row in t["rows"]:
            for m, vals, best in zip(t["methods"], row["values"], row["best"]):
                p = m["method"]
                for k, v, b in zip(t["metrics"], vals, best):
                    w.writerow([t["dataset"], t["data"], row["class"], m["label"], k, "" if v is None else f"{100 * v:.4f}",
                                int(b), p.get("setting") or "", p.get("kind") or "", p.get("name") or "",
                                p.get("backbone") or "", p.get("run") or "", m["dir"]])
    return buf.getvalue()


def to_json(tables: list[dict], now: float | None = None) -> str:
    """The same numbers (fractions in [0, 1]), each method's provenance and source folder, and Kano's stamp."""
    return json.dumps({"units": "fraction in [0, 1] (comparison.md, .csv and .html show percent)",
                       "produced_by": stamp(now), "tables": tables}, indent=1)


def to_html(tables: list[dict]) -> str:
    """A self-contained page (no network, no JavaScript): per dataset the table, best in bold, legend, sources."""
    b = ["<h1>Kano comparison</h1>"]
    for t in tables:
        b.append(f"<h2>{_esc(t['dataset'])}</h2><p class=\"note\">Data: {_esc(t['data'])}. Cells: {_esc(_metric_names(t))} (%).</p>")
        b.append("<table><thead><tr><th>class</th>" + "".join(f"<th>{_esc(_heading(m))}</th>" for m in t["methods"])
                 + "</tr></thead><tbody>")
        for row in t["rows"]:
            attr = ' class="avg"' if row["class"] == "mean" else ""
            b.append(f"<tr{attr}><td>{_esc(row['class'])}</td>"
                     + "".join(f"<td>{_cell(v, bb, ('<b>', '</b>'))}</td>" for v, bb in zip(row["values"], row["best"])) + "</tr>")
        b.append(f"</tbody></table><p class=\"note\">{_esc(legend(t))}</p><ul class=\"note\">"
                 + "".join(f"<li>{_esc(s)}</li>" for s in _sources(t)) + "</ul>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>Kano comparison</title>"
            f"<style>{CSS}{TABLE_CSS}</style></head><body>\n" + "\n".join(b) + "\n</body></html>\n")


def check_out(out_dir: Path, results: list[dict]) -> None:
    """--out must not be one of the compared folders (with --force its results would be removed)."""
    target = Path(out_dir).resolve()
    for r in results:
        if Path(r["dir"]) == target:
            raise KanoError(f"--out must be another folder than the RESULT_DIRs compared, got {out_dir}")


def claim_out(out_dir: Path, identity: dict, force: bool = False) -> None:
    """`outputs.claim` for a comparison; comparison files without a manifest (written by hand or by an older
    Kano) count as results too, so they are replaced only with --force."""
    out_dir = Path(out_dir)
    stray = [n for n in FILES if (out_dir / n).exists()]
    if stray and not (out_dir / outputs.MANIFEST).is_file() and not force:
        raise KanoError(f"--out {out_dir} must be a new folder or hold the results of this same compare, got results without "
                        f"a record of what produced them ({', '.join(stray)}); pass another --out, or --force to replace them")
    outputs.claim(out_dir, "compare", identity, force)


def write_comparison(tables: list[dict], out_dir: Path, identity: dict | None = None, force: bool = False,
                     claimed: bool = False) -> list[Path]:
    """Write comparison.md/.csv/.json/.html into out_dir (claimed first unless `claimed`); -> the files."""
    out_dir = Path(out_dir)
    identity = identity or {"results": sorted(m["dir"] for t in tables for m in t["methods"]),
                            "metrics": tables[0]["metrics"] if tables else []}
    if not claimed:
        claim_out(out_dir, identity, force)
    texts = {"comparison.md": to_markdown(tables), "comparison.csv": to_csv(tables), "comparison.json": to_json(tables),
             "comparison.html": to_html(tables)}
    for name, text in texts.items():
        (out_dir / name).write_text(text)
    outputs.write_manifest(out_dir, "compare", identity, list(texts))
    return [out_dir / n for n in texts]


def compare_folders(dirs: list, out_dir: Path, metrics=DEFAULT_METRICS, force: bool = False) -> list[dict]:
    """`kano compare`: load, check, tabulate and write; -> the tables."""
    metrics = list(metrics)
    results = load_results(dirs)
    check_out(out_dir, results)
    tables = comparison_tables(results, metrics)
    identity = {"results": [r["dir"] for r in results], "metrics": metrics}
    write_comparison(tables, out_dir, identity, force)
    return tables


# ---------------------------------------------------------------- the demo's table: methods scored here, metrics per group of defect kinds

def score_classes(model, data: str, classes: list[str] | None = None, batch_size: int = 16, device=None,
                  prompt_names: dict | None = None) -> dict[str, tuple]:
    """-> {class: (samples, image scores (N,), maps (N, S, S), masks (N, S, S))} on the test split of KIND:PATH."""
    from kano.anomaly_data import load_dataset, prompt_name

    from .evaluate import run_inference

    device = device or model.backbone.device
    ds = load_dataset(data)
    out = {}
    for cls in classes or ds.classes:
        cs = ds.samples("test", [cls])
        name = (prompt_names or {}).get(cls) or prompt_name(cls)
        bs = len(cs) if model.transductive else batch_size
        model.begin_class(cls, name)  # per-class state, e.g. WinCLIP+'s reference images
        out[cls] = (cs, *run_inference(model, cs, [name] * len(cs), bs, device))
    return out


def grouped_metrics(scored: dict, groups: dict[str, tuple[str, ...] | None], with_aupro: tuple[str, ...] = ("all",)) -> dict:
    """{group: {"image_auroc", "pixel_auroc"[, "aupro"], "n_classes"}}; a group of None means every defect kind."""
    import numpy as np
    import torch

    from .metrics import aupro, image_auroc, pixel_auroc

    res = {}
    for g, kinds in groups.items():
        vals: dict[str, list[float]] = {"image_auroc": [], "pixel_auroc": [], "aupro": []}
        for cls, (samples, scores, maps, masks) in scored.items():
            idx = [i for i, s in enumerate(samples) if s.label == 0 or kinds is None or s.defect in kinds]
            labels = torch.tensor([samples[i].label for i in idx])
            if not labels.any() or labels.all():
                continue
            vals["image_auroc"].append(image_auroc(labels, scores[idx]))
            vals["pixel_auroc"].append(pixel_auroc(masks[idx], maps[idx]))
            if g in with_aupro:
                vals["aupro"].append(aupro(masks[idx], maps[idx]))
        res[g] = {k: (float(np.mean(v)) if v else None) for k, v in vals.items()}
        res[g]["n_classes"] = len(vals["image_auroc"])
    return res


def compare(entries: list[dict], data: str, groups: dict[str, tuple[str, ...] | None], out_json: Path | None = None,
            log: Callable[[str], None] = lambda s: None, about: dict | None = None) -> list[dict]:
    """entries: [{"name", "kind", "model", "prompt_names"?} or {"name", "kind", "scored"} (scores already made, as
    evaluator.evaluate's `scored` gives them)] -> one record per entry with its grouped metrics.
    about: what produced the table (seed, backbone, ...), written beside the rows with Kano's version and commit."""
    rows = []
    for e in entries:
        if "scored" in e:
            scored = e["scored"]
        else:
            log(f"  scoring {e['name']} ({e['kind']})")
            scored = score_classes(e["model"], data, prompt_names=e.get("prompt_names"))
        rows.append({"name": e["name"], "kind": e["kind"], "metrics": grouped_metrics(scored, groups)})
    if out_json is not None:
        produced = {**(about or {}), **stamp()}
        Path(out_json).write_text(json.dumps({"dataset": data, "groups": {g: list(k) if k else None for g, k in groups.items()},
                                              "produced_by": produced, "rows": rows}, indent=1))
    return rows


GROUP_COLUMNS = (("seen", "seen img/px"), ("held_out", "held-out img/px"), ("part", "part img/px"), ("structural", "struct. img/px"))
NOTE = ("per-image and untrained methods see one image at a time; transductive ones score each test image",
        "against the other test images of its class (no labels, no training).")


def method_cells(rows: list[dict]) -> tuple[list[str], list[tuple[str, ...]]]:
    """compare()'s records -> (column heads, one tuple of cells per method): percent with one decimal over all
    defect kinds (image AUROC, pixel AUROC, AUPRO), then "image / pixel AUROC" per group of GROUP_COLUMNS."""
    head = ["method", "kind", "img AUROC", "px AUROC", "AUPRO", *[h for _, h in GROUP_COLUMNS]]
    table = []
    for r in rows:
        m = r["metrics"]
        table.append((r["name"], r["kind"], pct(m["all"]["image_auroc"]), pct(m["all"]["pixel_auroc"]), pct(m["all"]["aupro"]),
                      *[f"{pct(m[g]['image_auroc'])} / {pct(m[g]['pixel_auroc'])}" for g, _ in GROUP_COLUMNS]))
    return head, table


def methods_markdown(rows: list[dict]) -> str:
    """The demo's table as Markdown (comparison.md), with its note on the settings."""
    return "\n".join(markdown_table(*method_cells(rows)) + ["", *NOTE]) + "\n"
