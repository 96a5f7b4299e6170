"""What a person reads after `kano eval` and `kano predict`: metrics files that say what produced them,
and self-contained HTML pages (no network, no JavaScript; charts are inline SVG drawn here; images are
relative links to the PNGs beside the page).

Provenance: `provenance(method, ...)` takes a small method description, a dict with at least
"kind" (the method's kind in the registry, core/registry.py KINDS: "trained", "zero-shot", "zero-parameter",
"transductive", "memory"), "name" and "method" (its registry name), plus whatever identifies it: a trained run gives
{"kind": "trained", "name": "KAnoCLIP", "method": NAME, "run": path, "config_sha256": ..., "backbone": ...}; a
zero-parameter floor gives e.g. {"kind": "zero-parameter", "name": NAME, "method": NAME, "backbone": None}. Any
method that fills such a dict writes the same schema.

Units: metrics.json and metrics.csv hold fractions in [0, 1] (metrics.json says so in "units", the CSV in
its `unit` column); metrics.md and report.html show percent, labelled "(%)".
"""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import html
import json
import math
import time
from pathlib import Path

import numpy as np


LABELS = {"image_auroc": "image AUROC", "image_ap": "image AP", "image_f1_max": "image F1-max", "pixel_auroc": "pixel AUROC",
          "pixel_ap": "pixel AP", "pixel_f1_max": "pixel F1-max", "aupro": "AUPRO (FPR ≤ 0.3)"}


# ---------------------------------------------------------------------------------------------- provenance

def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def trained_method(run_dir: str | Path, config: dict) -> dict:
    """The method description of a trained run: its path and the SHA-256 of its config.json."""
    from kano.kanoclip.registry import DEFAULT_METHOD, DISPLAY_NAMES

    run_dir = Path(run_dir)
    method = config.get("method", DEFAULT_METHOD)
    kind = "one-class" if config.get("kind") == "one-class" else "trained"
    return {"kind": kind, "name": DISPLAY_NAMES.get(method, method), "method": method, "run": str(run_dir.resolve()),
            "config_sha256": file_sha256(run_dir / "config.json"), "backbone": config.get("backbone"),
            "train_data": config.get("data"), "run_threshold": config.get("threshold"), "stages": config.get("stages"),
            "vv_start": config.get("vv_start"), "pos_resize": config.get("pos_resize"),  # None: a run without it (each loader's own resize)
            "recipe": {k: (config.get("train") or {}).get(k) for k in ("epochs", "batch_size", "lr", "betas", "aug_rate", "recipe")}}


def baseline_method(name: str, kind: str, backbone: str | None = None, **extra) -> dict:
    """The method description of a floor of evaluator/baselines.py (`backbone` None when it uses none)."""
    return {"kind": kind, "name": name, "method": name, "backbone": backbone, **extra}


def _git_commit() -> str | None:
    from kano.core.files import git_commit

    return git_commit()


def stamp(now: float | None = None) -> dict:
    """Which Kano made a file, and when: kano_version, git_commit, date (UTC, ISO 8601)."""
    from kano import __version__

    now = time.time() if now is None else now
    return {"kano_version": __version__, "git_commit": _git_commit(),
            "date": _dt.datetime.fromtimestamp(now, _dt.timezone.utc).isoformat(timespec="seconds")}


def provenance(method: dict, image_size: int | None, started: float, data: str | None = None) -> dict:
    """What produced a result. `started` = time.time() at the start; elapsed is measured to now."""
    if not isinstance(method, dict) or "kind" not in method or "name" not in method:
        raise ValueError(f"method must be a dict with 'kind' and 'name', got {method!r}")
    now = time.time()
    return {"method": dict(method), "data": data, "image_size": image_size, **stamp(now), "elapsed_s": round(now - started, 2)}


def describe_method(method: dict) -> str:
    """One line for headings: 'trained run /runs/x (config sha256 1a2b3c4d5e6f), backbone tiny'."""
    if method.get("kind") in ("trained", "one-class"):
        s = f"{method['kind']} run {method.get('run')} (config sha256 {str(method.get('config_sha256'))[:12]})"
    else:
        s = f"{method.get('kind')} {method.get('name')}"
    if method.get("setting"):
        s += f" ({method['setting']})"
    if method.get("backbone"):
        s += f", backbone {method['backbone']}"
    return s


def provenance_lines(p: dict) -> list[tuple[str, str]]:
    commit = p.get("git_commit")
    rows = [("method", describe_method(p.get("method", {})))] + ([("data", str(p["data"]))] if p.get("data") else [])
    if p.get("class_words"):  # the [class] word of the prompts, per class: it changes the scores
        rows.append(("class words", ", ".join(f"{c} -> {w!r}" for c, w in p["class_words"].items())))
    return rows + [
            ("image size", f"{p['image_size']} px" if p.get("image_size") else "-"),
            ("Kano", f"{p.get('kano_version')} (git commit {commit[:12] if commit else 'unknown: not run from a git checkout'})"),
            ("date", str(p.get("date"))), ("elapsed", f"{p.get('elapsed_s', 0):.1f} s")]


# ---------------------------------------------------------------------------------------------- metrics files

def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def table_rows(result: dict) -> list[tuple]:
    from .metrics import METRIC_KEYS  # here, not at the top: predict_html serves the torch-free runtime
    rows = [(c, *[m[k] for k in METRIC_KEYS]) for c, m in result["classes"].items()]
    rows.append(("mean", *[result["mean"][k] for k in METRIC_KEYS]))
    return rows


def write_reports(result: dict, out_dir: Path, details: dict | None = None) -> list[str]:
    """Write metrics.json, metrics.csv, metrics.md, and (with details) scores.csv and report.html.

    result: {"dataset", "classes": {cls: metrics + n_images, n_anomalous}, "mean", "provenance" (optional)}.
    details: {"threshold": float | None, "classes": {cls: {"labels": [...], "scores": [...], "images": [...],
    "defects": [...]}}, "gallery": [{"class", "file" (relative to out_dir), "reason", ...}]}.
    Returns the written file names (relative to out_dir)."""
    from .metrics import METRIC_KEYS  # here, not at the top: predict_html serves the torch-free runtime
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {**result, "units": "fraction in [0, 1] (metrics.md and report.html show percent)"}
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=1))
    rows = table_rows(result)
    counts = {c: (m.get("n_images"), m.get("n_anomalous")) for c, m in result["classes"].items()}
    with open(out_dir / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", "unit", *METRIC_KEYS, "n_images", "n_anomalous"])
        for r in rows:
            n = counts.get(r[0], ("", ""))
            w.writerow([r[0], "fraction", *["" if v is None else f"{v:.6f}" for v in r[1:]], *["" if x is None else x for x in n]])
    prov = result.get("provenance")
    md = [f"# Kano evaluation: {result['dataset']}", ""]
    if prov:
        md += [f"- {k}: {v}" for k, v in provenance_lines(prov)] + [""]
    md += ["| class | " + " | ".join(f"{k} (%)" for k in METRIC_KEYS) + " | images | anomalous |",
           "|---" * (len(METRIC_KEYS) + 3) + "|"]
    for r in rows:
        n = counts.get(r[0], ("", ""))
        md.append("| " + " | ".join([r[0], *[_pct(v) for v in r[1:]], *["" if x is None else str(x) for x in n]]) + " |")
    md += ["", "Values in percent (metrics.json and metrics.csv hold the same values as fractions). aupro: exact AUPRO up to "
           "FPR 0.3 (anomalib's definition). mean: unweighted over classes."]
    (out_dir / "metrics.md").write_text("\n".join(md) + "\n")
    written = ["metrics.json", "metrics.csv", "metrics.md"]
    if details is not None:
        with open(out_dir / "scores.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["class", "defect", "image", "label", "score"])
            for cls, d in details["classes"].items():
                for img, dfc, y, s in zip(d["images"], d["defects"], d["labels"], d["scores"]):
                    w.writerow([cls, dfc, img, y, f"{s:.6f}"])
        (out_dir / "report.html").write_text(eval_html(result, details))
        written += ["scores.csv", "report.html"]
    return written


# ---------------------------------------------------------------------------------------------- gallery choice

def select_gallery(labels: list[int], scores: list[float], threshold: float | None, n: int) -> list[tuple[int, str]]:
    """Up to n (index, reason) pairs, taken in turn from five queues: the highest-scoring anomalous image
    ("most confident anomaly"), the highest-scoring normal one ("worst false alarm" when it is at or above
    the threshold, else "hardest normal"), the lowest-scoring anomalous one ("worst miss" when below the
    threshold, else "hardest anomaly"), the one closest to the threshold (without one: to the median score;
    "least confident") and the lowest-scoring normal one ("most confident normal"); then the next of each."""
    y = np.asarray(labels, dtype=int)
    s = np.asarray(scores, dtype=np.float64)
    idx = np.arange(len(s))
    pos, neg = idx[y == 1], idx[y == 0]
    cut = threshold if threshold is not None else (float(np.median(s)) if len(s) else 0.0)
    queues = [("top anomaly", list(pos[np.argsort(-s[pos], kind="stable")])),
              ("top normal", list(neg[np.argsort(-s[neg], kind="stable")])),
              ("bottom anomaly", list(pos[np.argsort(s[pos], kind="stable")])),
              ("least confident", list(idx[np.argsort(np.abs(s - cut), kind="stable")])),
              ("bottom normal", list(neg[np.argsort(s[neg], kind="stable")]))]

    def reason(kind: str, i: int) -> str:
        if kind == "top anomaly":
            return "most confident anomaly"
        if kind == "bottom normal":
            return "most confident normal"
        if kind == "top normal":
            return "worst false alarm" if threshold is not None and s[i] >= threshold else "hardest normal"
        if kind == "bottom anomaly":
            return "worst miss" if threshold is not None and s[i] < threshold else "hardest anomaly"
        return kind

    chosen: list[tuple[int, str]] = []
    used: set[int] = set()
    seen: dict[str, int] = {}  # a second pass over the queues names its picks "2nd ...", "3rd ...": no slot twice
    n = min(n, len(s))
    while len(chosen) < n:
        for kind, q in queues:
            while q and q[0] in used:
                q.pop(0)
            if q and len(chosen) < n:
                i = int(q.pop(0))
                used.add(i)
                r = reason(kind, i)
                seen[r] = seen.get(r, 0) + 1
                chosen.append((i, r if seen[r] == 1 else f"{_ordinal(seen[r])} {r}"))
    return chosen


def _ordinal(k: int) -> str:
    return f"{k}{'th' if 10 <= k % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(k % 10, 'th')}"


# ---------------------------------------------------------------------------------------------- SVG charts

def _counts_at_thresholds(labels, scores) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Scores sorted once, descending: true positives and predicted positives at each distinct threshold
    (the last of each tie group), and the numbers of positives and negatives."""
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last = np.r_[s[1:] != s[:-1], True]
    return np.cumsum(y)[last], np.arange(1, len(y) + 1)[last], int(y.sum()), int((~y).sum())


def roc_points(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) at every distinct threshold, from (0, 0) to (1, 1)."""
    tp, n, P, N = _counts_at_thresholds(labels, scores)
    fp = n - tp
    P, N = max(P, 1), max(N, 1)
    return np.r_[0.0, fp / N], np.r_[0.0, tp / P]


def pr_points(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    """(recall, precision) at every distinct threshold, descending thresholds."""
    tp, pp, P, _ = _counts_at_thresholds(labels, scores)
    P = max(P, 1)
    return np.r_[0.0, tp / P], np.r_[1.0, tp / pp]


def _esc(x) -> str:
    return html.escape(str(x), quote=True)


def _axes(title: str, xlabel: str, ylabel: str, w: int, h: int, pad: int, x_ticks, y_ticks, x_of, y_of) -> list[str]:
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" aria-label="{_esc(title)}">',
           f'<title>{_esc(title)}</title><rect x="0" y="0" width="{w}" height="{h}" fill="#fff"/>',
           f'<rect x="{pad}" y="{pad // 2}" width="{w - pad - 10}" height="{h - pad - pad // 2}" fill="none" stroke="#444"/>']
    for v in x_ticks:
        x = x_of(v)
        out.append(f'<line x1="{x:.1f}" y1="{h - pad}" x2="{x:.1f}" y2="{h - pad + 4}" stroke="#444"/>'
                   f'<text x="{x:.1f}" y="{h - pad + 15}" font-size="10" text-anchor="middle">{v:g}</text>')
    for v in y_ticks:
        y = y_of(v)
        out.append(f'<line x1="{pad - 4}" y1="{y:.1f}" x2="{pad}" y2="{y:.1f}" stroke="#444"/>'
                   f'<text x="{pad - 6}" y="{y + 3:.1f}" font-size="10" text-anchor="end">{v:g}</text>')
    out.append(f'<text x="{(pad + w - 10) / 2:.0f}" y="{h - 4}" font-size="11" text-anchor="middle">{_esc(xlabel)}</text>'
               f'<text transform="translate(11 {(h - pad) / 2:.0f}) rotate(-90)" font-size="11" text-anchor="middle">{_esc(ylabel)}</text>')
    return out


def curve_svg(x: np.ndarray, y: np.ndarray, title: str, xlabel: str, ylabel: str, diagonal: bool = False,
              w: int = 260, h: int = 230, pad: int = 40) -> str:
    """A line chart on [0, 1] x [0, 1] as inline SVG."""
    x_of = lambda v: pad + v * (w - pad - 10)
    y_of = lambda v: (h - pad) - v * (h - pad - pad // 2)
    ticks = [0, 0.25, 0.5, 0.75, 1]
    out = _axes(title, xlabel, ylabel, w, h, pad, ticks, ticks, x_of, y_of)
    if diagonal:
        out.append(f'<line x1="{x_of(0):.1f}" y1="{y_of(0):.1f}" x2="{x_of(1):.1f}" y2="{y_of(1):.1f}" stroke="#aaa" stroke-dasharray="4 3"/>')
    pts = " ".join(f"{x_of(float(a)):.1f},{y_of(float(b)):.1f}" for a, b in zip(x, y))
    out.append(f'<polyline points="{pts}" fill="none" stroke="#b5179e" stroke-width="2"/>')
    out.append("</svg>")
    return "".join(out)


def histogram_svg(labels, scores, threshold: float | None, title: str, bins: int = 20, w: int = 320, h: int = 230, pad: int = 40) -> str:
    """Score histograms of normal (green) and anomalous (red) images on [0, 1], the threshold as a line."""
    y = np.asarray(labels, dtype=int)
    s = np.clip(np.asarray(scores, dtype=np.float64), 0, 1)
    edges = np.linspace(0, 1, bins + 1)
    hn = np.histogram(s[y == 0], edges)[0]
    ha = np.histogram(s[y == 1], edges)[0]
    top = max(1, int(max(hn.max(initial=0), ha.max(initial=0))))
    x_of = lambda v: pad + v * (w - pad - 10)
    y_of = lambda v: (h - pad) - v / top * (h - pad - pad // 2)
    step = max(1, math.ceil(top / 4))
    out = _axes(title, "image score", "images", w, h, pad, [0, 0.25, 0.5, 0.75, 1], list(range(0, top + 1, step)), x_of, y_of)
    bw = (x_of(1) - x_of(0)) / bins
    for counts, colour, shift in ((hn, "#2a9d3f", 0.0), (ha, "#d62828", 0.5)):
        for b, c in enumerate(counts):
            if c:
                x0 = x_of(edges[b]) + shift * bw
                out.append(f'<rect x="{x0:.1f}" y="{y_of(c):.1f}" width="{bw / 2:.1f}" height="{y_of(0) - y_of(c):.1f}" fill="{colour}" opacity="0.85"/>')
    if threshold is not None:
        x = x_of(min(max(threshold, 0), 1))
        out.append(f'<line x1="{x:.1f}" y1="{pad // 2}" x2="{x:.1f}" y2="{h - pad}" stroke="#000" stroke-width="1.5" stroke-dasharray="5 3"/>'
                   f'<text x="{x + 3:.1f}" y="{pad // 2 + 10}" font-size="10">threshold {threshold:.3f}</text>')
    out.append(f'<rect x="{w - 120}" y="{pad // 2 + 16}" width="10" height="10" fill="#2a9d3f"/><text x="{w - 106}" y="{pad // 2 + 25}" font-size="10">normal ({int((y == 0).sum())})</text>'
               f'<rect x="{w - 120}" y="{pad // 2 + 30}" width="10" height="10" fill="#d62828"/><text x="{w - 106}" y="{pad // 2 + 39}" font-size="10">anomalous ({int((y == 1).sum())})</text>')
    out.append("</svg>")
    return "".join(out)


# ---------------------------------------------------------------------------------------------- pages

CSS = """body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:24px;color:#111;max-width:1500px}
h1{font-size:22px;margin:0 0 8px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd}h3{font-size:15px;margin:16px 0 6px}
dl.prov{display:grid;grid-template-columns:max-content auto;gap:2px 14px;font-size:13px;margin:0 0 12px}dl.prov dt{color:#555}dl.prov dd{margin:0}
table{border-collapse:collapse;font-size:13px}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}tr.mean td{font-weight:bold;background:#fafafa}.charts{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0 0 14px}figcaption{font-size:12px;color:#333;margin-top:2px}.gallery{display:flex;flex-wrap:wrap;gap:14px}.gallery figure{flex:0 1 720px}.gallery figure img{max-width:100%;border:1px solid #ddd}
.note{font-size:12px;color:#555}.bad{color:#b00}.yes{color:#b00;font-weight:bold}.no{color:#070}"""


def _page(title: str, body: list[str]) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{_esc(title)}</title>"
            f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _prov_html(p: dict | None) -> str:
    if not p:
        return ""
    return "<dl class=\"prov\">" + "".join(f"<dt>{_esc(k)}</dt><dd>{_esc(v)}</dd>" for k, v in provenance_lines(p)) + "</dl>"


THRESHOLD_SOURCES = {"command line": "given on the command line (--threshold)",
                     "calibration": "calibrated for this class on normal images (RUN/calibration.json, kano calibrate)",
                     "run": "from the run, calibrated on its auxiliary data at training"}


def threshold_text(threshold: float | None, source: str | None) -> str:
    """'0.520 (given on the command line (--threshold))', or why there is none."""
    if threshold is None:
        return "none (no --threshold, no calibration and none in the run: no decision)"
    return f"{threshold:.3f} ({THRESHOLD_SOURCES.get(source, source or 'source not recorded')})"


def eval_html(result: dict, details: dict) -> str:
    from .metrics import METRIC_KEYS  # here, not at the top: predict_html serves the torch-free runtime
    prov = result.get("provenance")
    thr = details.get("threshold")
    b = [f"<h1>Kano evaluation: {_esc(result['dataset'])}</h1>", _prov_html(prov)]
    b.append("<h2>Metrics per class</h2>")
    b.append("<table><thead><tr><th>class</th>" + "".join(f"<th>{_esc(LABELS[k])} (%)</th>" for k in METRIC_KEYS)
             + "<th>images</th><th>anomalous</th></tr></thead><tbody>")
    for r in table_rows(result):
        m = result["classes"].get(r[0], {})
        cls_attr = ' class="mean"' if r[0] == "mean" and r[0] not in result["classes"] else ""
        b.append(f"<tr{cls_attr}><td>{_esc(r[0])}</td>" + "".join(f"<td>{_pct(v)}</td>" for v in r[1:])
                 + f"<td>{m.get('n_images', '')}</td><td>{m.get('n_anomalous', '')}</td></tr>")
    b.append("</tbody></table><p class=\"note\">Percent. Mean: unweighted over classes. Pixel metrics only where the class has "
             "masks (-: none). AUPRO: exact, up to FPR 0.3 (anomalib's definition).</p>")
    b.append("<h2>Curves and score distributions (image level)</h2>")
    unreadable = details.get("unreadable") or []
    if unreadable:
        b.append(f"<p class=\"bad\">{len(unreadable)} unreadable image(s), left out of the metrics: "
                 + "; ".join(_esc(f"{u['image']}: {u['error']}") for u in unreadable) + "</p>")
    for cls, d in details["classes"].items():
        m = result["classes"][cls]
        thr = d.get("threshold", thr)
        b.append(f"<h3>{_esc(cls)}</h3><p class=\"note\">Class word in the prompts: {_esc(repr(d.get('class_word')))}. "
                 f"Threshold: {_esc(threshold_text(thr, d.get('threshold_source')))}.</p><div class=\"charts\">")
        labels, scores = d["labels"], d["scores"]
        if 0 < sum(labels) < len(labels):
            fpr, tpr = roc_points(labels, scores)
            rec, prec = pr_points(labels, scores)
            b.append(f"<figure>{curve_svg(fpr, tpr, f'ROC {cls}', 'false-positive rate', 'true-positive rate', diagonal=True)}"
                     f"<figcaption>ROC, image AUROC {_pct(m['image_auroc'])} %</figcaption></figure>")
            b.append(f"<figure>{curve_svg(rec, prec, f'PR {cls}', 'recall', 'precision')}"
                     f"<figcaption>precision-recall, image AP {_pct(m['image_ap'])} %</figcaption></figure>")
        else:
            b.append("<p class=\"note\">No curves: the class needs both normal and anomalous images.</p>")
        b.append(f"<figure>{histogram_svg(labels, scores, thr, f'scores {cls}')}<figcaption>image scores, normal vs anomalous"
                 "</figcaption></figure></div>")
    b.append("<h2>Gallery</h2><p class=\"note\">Per class: the most confident detection, the worst false alarm and miss, the "
             "least confident image and the most confident normal one (as many as --n-overlays). Panels: image | ground truth "
             "| map | map over image (only where the map is at least the level in the caption). Colours: relative to the class's "
             "calibrated pixel threshold t (middle colour = t, brightest >= 2t) where there is a calibration, else the absolute "
             "0-1 scale; each panel states its scale, and says so in words where a map is degenerate. Cyan: ground-truth "
             "outline.</p><div class=\"gallery\">")
    for g in details.get("gallery", []):
        b.append(f"<figure><img src=\"{_esc(g['file'])}\" alt=\"{_esc(g['class'] + ' ' + g['reason'] + ' ' + g.get('image', ''))}\">"
                 f"<figcaption><b>{_esc(g['class'])}: {_esc(g['reason'])}</b>, {_esc(g.get('image', ''))}, score {g['score']:.3f}</figcaption></figure>")
    b.append("</div>")
    return _page(f"Kano evaluation: {result['dataset']}", b)


def predict_html(records: list[dict], header: dict) -> str:
    """The gallery page of `kano predict`: provenance, one row per image (score, decision, files), its panel.
    header["total"]: the images of the run when `records` are only its first ones (the page says so);
    header["summary"]: records.summarize's counts. Maps and panels appear when the records have them."""
    thr = header.get("threshold")
    total = header.get("total", len(records))
    shown = (f"{total} images" if total == len(records) else f"the {len(records)} highest-scoring of {total} images (all in "
             "predictions.jsonl)") + ", the flagged first, then by score"
    counts = header.get("summary")
    counts = f"{counts['scored']} scored, {counts['errors']} not scored; " if counts else ""
    b = [f"<h1>Kano predictions: {_esc(header.get('class'))}</h1>", _prov_html(header.get("provenance")),
         f"<p class=\"note\">{_esc(shown)}; {counts}class word in the prompts {_esc(repr(header.get('class_word')))}; threshold "
         f"{_esc(threshold_text(thr, header.get('threshold_source')))}; "
         f"maps: {_esc(header.get('map_scale') or 'colours: map value on the absolute 0-1 scale')}; the overlay shows only "
         "where the map is at least its level; masks/ holds each flagged image's defect mask at the pixel threshold.</p>",
         "<table><thead><tr><th>image</th><th>score</th><th>anomalous</th><th>map</th></tr></thead><tbody>"]
    for r in records:
        if r.get("error"):
            b.append(f"<tr><td>{_esc(r['image'])}</td><td colspan=\"3\" class=\"bad\">not scored: {_esc(r['error'])}</td></tr>")
            continue
        dec = "-" if r["anomalous"] is None else ("<span class=\"yes\">yes</span>" if r["anomalous"] else "<span class=\"no\">no</span>")
        rel = r.get("rel") or {}
        cell = "-"
        if "map_npy" in rel:
            note = " (downscaled)" if r.get("map_downscaled") else ""
            cell = (f"<a href=\"{_esc(rel['map_npy'])}\">npy</a> <a href=\"{_esc(rel['map_png'])}\">png16</a> "
                    f"{r['map_size'][0]}x{r['map_size'][1]}{note}")
        if "mask_png" in rel:
            cell += f" <a href=\"{_esc(rel['mask_png'])}\">mask</a>"
        if r.get("map_note"):
            cell += f" <span class=\"bad\">{_esc(r['map_note'])}</span>"
        b.append(f"<tr><td>{_esc(r['image'])}</td><td>{r['score']:.3f}</td><td>{dec}</td><td>{cell}</td></tr>")
    b.append("</tbody></table><div class=\"gallery\">")
    for r in records:
        if not r.get("error") and "panel_png" in (r.get("rel") or {}):
            b.append(f"<figure><img src=\"{_esc(r['rel']['panel_png'])}\" alt=\"{_esc(r['image'])}\"><figcaption>{_esc(r['image'])}</figcaption></figure>")
    b.append("</div>")
    return _page(f"Kano predictions: {header.get('class')}", b)
