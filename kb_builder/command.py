"""Glue for `kano kb build` and `kano kb stats`: resolves options, runs the builder, prints the summary."""

from __future__ import annotations

import json
import os
from pathlib import Path

from kano import ui
from kano.errors import KanoError


def build(*, classes: str, kb: Path, llm: str, vqa: str, images: dict, data: str | None, n_llm: int, m_vqa: int,
          llm_base_url: str | None, vqa_base_url: str | None, temperature: float, vqa_temperature: float,
          concurrency: int, retries: int, backoff: float, timeout: float, seed: int, dry_run: bool) -> int:
    """Returns the exit code: 0 when every class has what was asked, 1 when something is still missing."""
    from kb_builder import BuildConfig, build_knowledge_base, make_provider
    from knowledge_store import KnowledgeStore

    class_list = [c.strip() for c in classes.split(",") if c.strip()]
    if data:
        from anomaly_data import load_dataset

        ds = load_dataset(data, missing_masks="ignore")  # VQA reads the images only
        unknown = sorted(set(class_list) - set(ds.classes))
        if unknown:
            raise KanoError(f"--classes must be classes of {data} ({', '.join(ds.classes)}), got {', '.join(unknown)}")
        for s in ds.samples("test"):
            if s.label == 1 and s.class_name in class_list:
                images.setdefault(s.class_name, []).append(Path(s.image_path))
    cfg = BuildConfig(classes=class_list, llm=llm, vqa=vqa, images=images, n_llm=n_llm, m_vqa=m_vqa,
                      llm_temperature=temperature, vqa_temperature=vqa_temperature, seed=seed, concurrency=concurrency,
                      max_retries=retries, backoff_s=backoff)
    vqa_url = vqa_base_url or os.environ.get("KANO_VQA_BASE_URL")
    vqa_key = os.environ.get("KANO_VQA_API_KEY") or (None if vqa_url else os.environ.get("OPENAI_API_KEY"))
    llm_provider = make_provider(llm, base_url=llm_base_url or os.environ.get("OPENAI_BASE_URL"), timeout_s=timeout)
    vqa_provider = make_provider(vqa, base_url=vqa_url, api_key=vqa_key, timeout_s=timeout)
    store = KnowledgeStore(kb)
    report = build_knowledge_base(store, cfg, llm_provider, vqa_provider, dry_run=dry_run,
                                  progress_factory=ui.progress_factory("model calls"))
    if dry_run:
        ui.print_table(f"planned calls ({len(report.planned)})", ["kind", "class", "image", "prompt"],
                       [(p.kind, p.class_name, p.image_path or "", p.prompt.splitlines()[0]) for p in report.planned])
        return 0
    ui.print_table(f"knowledge base {kb}", ["class", "llm/builtin", "vqa", "failed calls"],
                   [(c, f"{r.llm}/{r.llm_needed}", f"{r.vqa}/{r.vqa_needed}", r.failed_calls) for c, r in report.classes.items()])
    ui.out.print(f"calls made: {report.calls_made}, reused from the knowledge base: {report.calls_reused}, "
                 f"failed attempts: {len(report.failures)}")
    for f in report.failures[:20]:
        ui.err.print(f"  failed: {f}")
    if report.missing:
        ui.err.print("still missing (run the same command again to complete): " + "; ".join(report.missing))
        return 1
    return 0


def print_stats(kb: Path, as_json: bool) -> None:
    from knowledge_store import stats

    s = stats(kb)
    if as_json:
        print(json.dumps(s, indent=1))
        return
    sources = ["llm", "vqa", "builtin", "import"]
    ui.print_table("descriptions per class", ["class", *sources, "total"],
                   [(c, *[v[s_] for s_ in sources], sum(v.values())) for c, v in s["classes"].items()])
    note = _wording_note(list(s["classes"]))
    if note:
        ui.out.print(note)
    ui.print_table("model calls", ["kind", "provider", "model", "ok", "failed", "tokens in", "tokens out", "mean latency s", "cost USD"],
                   [(r["kind"], r["provider"], r["model"], r["ok"], r["failed"], r["input_tokens"], r["output_tokens"],
                     r["mean_latency_s"], r["cost_usd"]) for r in s["calls"]])
    cost = s["estimated_cost_usd"]
    ui.out.print(f"estimated cost: {'unknown (a model without a known price)' if cost is None else f'${cost:.4f}'}")
    if s["recent_failures"]:
        ui.print_table("recent failures", ["class", "kind", "image", "error"],
                       [(f["class_name"], f["kind"], f["image_path"], f["error"]) for f in s["recent_failures"]])


def _wording_note(classes: list[str]) -> str | None:
    """A note for KBs holding classes whose prompt word differs from the folder name (pcb1 -> printed circuit board)."""
    from anomaly_data.names import prompt_name

    renamed = [f"{c} -> {prompt_name(c)!r}" for c in classes if prompt_name(c) != c]
    if not renamed:
        return None
    return ("note: the LLM and VQA questions name these classes by their prompt word: " + ", ".join(renamed[:6])
            + (", ..." if len(renamed) > 6 else "") + ". Calls an earlier Kano made with the folder name are not "
            "reused for the new wording (the call key includes the prompt): VQA images are asked again and stored "
            "beside the old answers, and a class that already holds n LLM descriptions keeps them. Build a new KB file to "
            "use the new wording alone.")
