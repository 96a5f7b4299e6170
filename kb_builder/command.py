"""Glue for `kano kb build` and `kano kb stats`: resolves options, runs the builder, prints the summary."""

from __future__ import annotations

import json
import os
from pathlib import Path

from kano.core import ui
from kano.core.errors import KanoError


def resolve_endpoints(llm_base_url: str | None, vqa_base_url: str | None, env=None) -> dict:
    """Which server and which key each provider uses; each key goes only to its own server.

    LLM: --llm-base-url or $OPENAI_BASE_URL (else OpenAI), key $OPENAI_API_KEY.
    VQA: --vqa-base-url or $KANO_VQA_BASE_URL, key $KANO_VQA_API_KEY or none. With no VQA server of its
    own, the VQA calls go to the LLM's server, and only then may they carry the LLM's key (when
    $KANO_VQA_API_KEY is unset).
    """
    env = os.environ if env is None else env
    llm_url = llm_base_url or env.get("OPENAI_BASE_URL") or None
    llm_key = env.get("OPENAI_API_KEY") or None
    own_vqa_url = vqa_base_url or env.get("KANO_VQA_BASE_URL") or None
    vqa_key = env.get("KANO_VQA_API_KEY") or (None if own_vqa_url else llm_key)
    return {"llm_url": llm_url, "llm_key": llm_key, "vqa_url": own_vqa_url or llm_url, "vqa_key": vqa_key,
            "secrets": tuple(k for k in {llm_key, env.get("KANO_VQA_API_KEY")} if k)}


def build(*, classes: str, kb: Path, llm: str, vqa: str, images: dict, data: str | None, n_llm: int, m_vqa: int,
          llm_base_url: str | None, vqa_base_url: str | None, temperature: float, vqa_temperature: float,
          concurrency: int, retries: int, backoff: float, timeout: float, seed: int, dry_run: bool,
          max_rounds: int = 4, wait: bool = True, check_names: bool = True) -> int:
    """Returns the exit code: 0 when every class has what was asked, 1 when something is still missing.
    check_names: warn of a class name that looks like a misspelt known class (off for the demo's own world)."""
    import tempfile

    from kano.kb_builder import BuildConfig, build_knowledge_base, make_provider
    from kano.kb_builder.providers import parse_spec, scrub
    from kano.knowledge_store import KnowledgeStore

    class_list = [c.strip() for c in classes.split(",") if c.strip()]
    if parse_spec(llm)[0] == "builtin" and check_names:  # the pack's generic text, silently, for a misspelt class: say so
        from kano.anomaly_data.names import known_words, unknown_word_warning

        for c in class_list:
            if (warning := unknown_word_warning(c, known_words(), "class")) is not None:
                ui.err.print(f"warning: {warning}; --llm builtin stores generic descriptions for it", markup=False)
    wants_vqa = parse_spec(vqa)[0] not in ("none", "builtin")  # builtin: BuildConfig says why not
    if wants_vqa and not images and not data:
        raise KanoError(f"--vqa {vqa} needs images to describe: give --images CLASS=DIR or --data KIND:PATH, got neither "
                        "(or drop --vqa)")
    if parse_spec(vqa)[0] == "none" and (images or data):
        raise KanoError("--images and --data name images for VQA: add --vqa PROVIDER:MODEL (e.g. openai:llama3.2-vision), "
                        "got --vqa none")
    if data:
        from kano.anomaly_data import load_dataset

        ds = load_dataset(data, missing_masks="ignore")  # VQA reads the images only
        unknown = sorted(set(class_list) - set(ds.classes))
        if unknown:
            raise KanoError(f"--classes must be classes of {data} ({', '.join(ds.classes)}), got {', '.join(unknown)}")
        for s in ds.samples("test"):
            if s.label == 1 and s.class_name in class_list:
                images.setdefault(s.class_name, []).append(Path(s.image_path))
        if not any(images.get(c) for c in class_list):
            raise KanoError(f"--data {data} must hold anomalous test images of {', '.join(class_list)} for VQA, got none")
    cfg = BuildConfig(classes=class_list, llm=llm, vqa=vqa, images=images, n_llm=n_llm, m_vqa=m_vqa,
                      llm_temperature=temperature, vqa_temperature=vqa_temperature, seed=seed, concurrency=concurrency,
                      max_retries=retries, backoff_s=backoff, max_rounds=max_rounds)
    ends = resolve_endpoints(llm_base_url, vqa_base_url)
    llm_provider = make_provider(llm, base_url=ends["llm_url"], api_key=ends["llm_key"], timeout_s=timeout)
    vqa_provider = make_provider(vqa, base_url=ends["vqa_url"], api_key=ends["vqa_key"], timeout_s=timeout)
    secrets = ends["secrets"]

    def clean(text: str) -> str:
        return scrub(text, secrets)

    if dry_run:  # plan against the file as it is, writing nothing (no file is created, none is migrated)
        with tempfile.TemporaryDirectory(prefix="kano-plan-") as tmp:
            store = KnowledgeStore(kb, read_only=True) if Path(kb).exists() else KnowledgeStore(Path(tmp) / "empty.duckdb")
            report = build_knowledge_base(store, cfg, llm_provider, vqa_provider, dry_run=True)
        ui.print_table(f"planned calls ({len(report.planned)})", ["kind", "class", "image", "prompt"],
                       [(p.kind, p.class_name, p.image_path or "", p.prompt.splitlines()[0]) for p in report.planned])
        return 0
    store = KnowledgeStore(kb)
    lock = store.build_lock()
    lock.acquire(wait=wait, on_wait=lambda holder: ui.err.print(
        f"another `kano kb build` is running on {kb} ({holder}); waiting for it to finish (Ctrl-C to stop), "
        "then reusing what it stored"))
    try:
        report = build_knowledge_base(store, cfg, llm_provider, vqa_provider, progress_factory=ui.progress_factory(
            "LLM classes + VQA images"), scrub=clean)
    finally:
        lock.release()
    ui.print_table(f"knowledge base {kb}", ["class", "llm/builtin", "vqa", "failed calls"],
                   [(c, f"{r.llm}/{r.llm_needed}", f"{r.vqa}/{r.vqa_needed}", r.failed_calls) for c, r in report.classes.items()])
    ui.out.print(report.accounting.line())
    for f in report.failures[:20]:
        ui.err.print(clean(f"  failed: {f}"), markup=False)
    for note in report.exhausted:
        ui.err.print(note, markup=False)
    if report.missing:
        spent = {c for c, r in report.classes.items() if r.llm_short}
        rerun = [m for m in report.missing if not (" LLM " in m and m.split(":")[0] in spent)]
        ui.err.print("still missing: " + "; ".join(report.missing)
                     + (" (run the same command again to complete)" if rerun else ""))
        return 1
    return 0


def print_stats(kb: Path, as_json: bool) -> None:
    from kano.knowledge_store import stats

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
    ui.print_table("model calls (one row per request)", ["kind", "provider", "model", "ok", "failed, later succeeded",
                                                         "still failing", "tokens in", "tokens out", "mean latency s", "cost USD"],
                   [(r["kind"], r["provider"], r["model"], r["ok"], r["failed_then_succeeded"], r["still_failing"],
                     r["input_tokens"], r["output_tokens"], r["mean_latency_s"], r["cost_usd"]) for r in s["calls"]])
    cost = s["estimated_cost_usd"]
    ui.out.print(f"estimated cost: {'unknown (a model without a known price)' if cost is None else f'${cost:.4f}'}")
    if s["recent_failures"]:
        ui.print_table("still failing (latest attempt per call; retried failures that later succeeded are not listed)",
                       ["class", "kind", "image", "error"],
                       [(f["class_name"], f["kind"], f["image_path"], f["error"]) for f in s["recent_failures"]])


def _wording_note(classes: list[str]) -> str | None:
    """A note for KBs holding classes whose prompt word differs from the folder name (pcb1 -> printed circuit board)."""
    from kano.anomaly_data.names import prompt_name

    renamed = [f"{c} -> {prompt_name(c)!r}" for c in classes if prompt_name(c) != c]
    if not renamed:
        return None
    return ("note: the LLM and VQA questions name these classes by their prompt word: " + ", ".join(renamed[:6])
            + (", ..." if len(renamed) > 6 else "") + ". Calls an earlier Kano made with the folder name are not "
            "reused for the new wording (the call key includes the prompt): VQA images are asked again and stored "
            "beside the old answers, and a class that already holds n LLM descriptions keeps them. Build a new KB file to "
            "use the new wording alone.")
