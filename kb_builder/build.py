"""Build orchestration: plan, call (bounded concurrency, retries), store each finished call at once.

Resumable by construction: a call whose key (provider, model, prompt, image hash, options) is
stored as successful is never made again, and every call is committed with its descriptions in
one transaction (knowledge_store.KnowledgeStore.record_call), so a killed build loses at most the
calls in flight and never leaves a call without its descriptions. One build per KB file at a time
(a lock file beside it): a second build waits, then finds everything stored and pays for nothing.
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from kano.core.errors import KanoError
from kano.knowledge_store import CallRecord, Description, KnowledgeStore

from .builtin import builtin_descriptions
from .prompts import clean_vqa_reply, is_refusal, llm_prompt, parse_descriptions, vqa_prompt
from .providers import Provider, ProviderError, image_to_png, parse_spec


@dataclass
class BuildConfig:
    classes: list[str]
    llm: str = "builtin"
    vqa: str = "none"
    images: dict[str, list[Path]] = field(default_factory=dict)
    n_llm: int = 5
    m_vqa: int = 1
    llm_temperature: float = 0.7
    vqa_temperature: float = 0.2
    max_tokens: int = 512
    seed: int = 0
    concurrency: int = 4
    max_retries: int = 4
    backoff_s: float = 1.0
    max_rounds: int = 4
    # class folder name -> the word(s) that fill the templates' (class): the same word the learnable prompts use
    # (anomaly_data.prompt_name: pcb1 -> "printed circuit board"), so GPT-3.5 is never asked about "pcb1".
    # Descriptions are still stored under the folder name. Classes left out get prompt_name(class).
    prompt_words: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        self.classes = list(dict.fromkeys(self.classes))  # "a,a" is one class
        if not self.classes:
            raise KanoError("--classes must name at least one class, got none")
        if self.max_rounds < 1:
            raise KanoError(f"--max-rounds must be >= 1, got {self.max_rounds}")
        # one folder given twice (or a file reached by two spellings) is one image
        self.images = {c: list({p.resolve(): p for p in reversed(list(ps))}.values())[::-1] for c, ps in self.images.items()}
        from kano.anomaly_data.names import prompt_name

        self.prompt_words = {c: self.prompt_words.get(c) or prompt_name(c) for c in self.classes}
        if self.n_llm < 1 or self.m_vqa < 0:
            raise KanoError(f"--n-llm must be >= 1 and --m-vqa >= 0, got {self.n_llm} and {self.m_vqa}")
        if self.concurrency < 1:
            raise KanoError(f"--concurrency must be >= 1, got {self.concurrency}")
        parse_spec(self.llm)
        parse_spec(self.vqa)
        if parse_spec(self.llm)[0] == "none":
            raise KanoError("--llm must be a model spec or builtin, got none")
        if parse_spec(self.vqa)[0] == "builtin":
            raise KanoError("--vqa must be PROVIDER:MODEL or none, got builtin (the built-in pack has no per-image descriptions)")
        unknown = sorted(set(self.images) - set(self.classes))
        if unknown:
            raise KanoError(f"--images classes must be among --classes ({', '.join(self.classes)}), got {', '.join(unknown)}")


@dataclass
class PlannedCall:
    kind: str
    class_name: str
    prompt: str
    image_path: str | None = None


@dataclass
class ClassReport:
    llm: int = 0
    llm_needed: int = 0
    vqa: int = 0
    vqa_needed: int = 0
    failed_calls: int = 0
    llm_short: str | None = None  # "the model gave only 4 of 5 ..." when the re-ask budget is spent


@dataclass
class Accounting:
    """One count of what the build did; `made` equals the rows it added to `calls`."""

    made: int = 0             # requests sent to a model (each is one row in `calls`)
    succeeded: int = 0        # ... of which answered with usable text
    retried: int = 0          # ... of which failed and were tried again
    failed_for_good: int = 0  # logical calls that ended without an answer (retries exhausted or not retryable)
    reused: int = 0           # answers taken from the KB instead of a call

    def line(self) -> str:
        return (f"model calls: {self.made} made ({self.succeeded} answered, {self.retried} failed and were retried, "
                f"{self.failed_for_good} failed for good), {self.reused} reused from the knowledge base")


@dataclass
class BuildReport:
    classes: dict[str, ClassReport]
    calls_made: int
    calls_reused: int
    failures: list[str]
    planned: list[PlannedCall]
    accounting: Accounting = field(default_factory=Accounting)
    notes: list[str] = field(default_factory=list)

    @property
    def missing(self) -> list[str]:
        out = []
        for cls, r in self.classes.items():
            if r.llm < r.llm_needed:
                out.append(f"{cls}: {r.llm_needed - r.llm} LLM description(s)")
            if r.vqa < r.vqa_needed:
                out.append(f"{cls}: {r.vqa_needed - r.vqa} VQA description(s)")
        return out

    @property
    def exhausted(self) -> list[str]:
        """Messages for classes where asking again will not help (the re-ask budget is spent)."""
        return [r.llm_short for r in self.classes.values() if r.llm_short]


def call_key(provider: str, model: str, prompt: str, image_sha256: str | None, options: dict) -> str:
    blob = json.dumps([provider, model, prompt, image_sha256 or "", options], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class _VqaJob:
    """One VQA call: byte-identical images of a class share it, and each gets its own description."""

    cls: str
    j: int
    key: str
    data: bytes
    sha: str
    paths: list[Path]


def _identity(text: str) -> str:
    return text


class _Builder:
    def __init__(self, store: KnowledgeStore, cfg: BuildConfig, llm: Provider | None, vqa: Provider | None,
                 progress: Callable[[int], None], scrub: Callable[[str], str] = _identity):
        self.store, self.cfg, self.llm, self.vqa = store, cfg, llm, vqa
        self.progress = progress
        self.scrub = scrub
        self.lock = threading.Lock()  # serialises this process's use of the file (one transaction at a time)
        self.acc = Accounting()
        self.failures: list[str] = []
        self.failed_per_class: Counter = Counter()
        self.short: dict[str, str] = {}

    # -- one logical call with retries; every attempt is logged -----------------------------
    def _call(self, provider: Provider, kind: str, cls: str, prompt: str, image: bytes | None, image_path: str | None,
              image_sha: str | None, options: dict, accept: Callable[[str], list[str] | None],
              descriptions: Callable[[list[str]], list[Description]], cap: int | None = None) -> bool:
        """Make the call (retrying), then store it with its descriptions in one transaction. True on success."""
        key = call_key(provider.provider, provider.model, prompt, image_sha, options)
        last_error = ""
        for attempt in range(self.cfg.max_retries + 1):
            t0 = time.perf_counter()
            reply_text = None
            try:
                reply = provider.complete(prompt, image, options)
                reply_text = self.scrub(reply.text) if isinstance(reply.text, str) else None
                latency = time.perf_counter() - t0
                if not reply_text or not reply_text.strip():
                    raise ProviderError("empty reply", retryable=True)
                if is_refusal(reply_text):
                    raise ProviderError(f"refusal: {reply_text.strip()[:120]}", retryable=True)
                texts = accept(reply_text)
                if texts is None:
                    raise ProviderError(f"reply has no usable description: {reply_text.strip()[:120]}", retryable=True)
            except ProviderError as exc:
                last_error = self.scrub(str(exc))
                latency = time.perf_counter() - t0
                final = not exc.retryable or attempt == self.cfg.max_retries
                with self.lock:
                    self.store.record_call(CallRecord(key, kind, provider.provider, provider.model, None, cls, prompt, image_path,
                                                      image_sha, options, reply_text, None, None, latency, "error", last_error,
                                                      attempt + 1))
                    self.acc.made += 1
                    if not final:
                        self.acc.retried += 1
                if final:
                    break
                time.sleep(self.cfg.backoff_s * (2 ** attempt) * (0.5 + random.random()))
                continue
            rec = CallRecord(key, kind, provider.provider, provider.model, reply.served_model, cls, prompt, image_path,
                             image_sha, options, reply_text, reply.input_tokens, reply.output_tokens, latency, "ok", None,
                             attempt + 1)
            with self.lock:
                self.store.record_call(rec, descriptions(texts), cap=cap)
                self.acc.made += 1
                self.acc.succeeded += 1
            return True
        self._fail(kind, cls, f"{image_path or ''}: {last_error}")
        return False

    def _fail(self, kind: str, cls: str, message: str, call: bool = True) -> None:
        with self.lock:
            self.failures.append(self.scrub(f"{kind} {cls} {message}"))
            self.failed_per_class[cls] += 1
            if call:  # an unreadable image is a failure but not a call
                self.acc.failed_for_good += 1

    # -- LLM: exactly n distinct descriptions per class ----------------------------------
    def llm_class(self, cls: str) -> None:
        n, llm = self.cfg.n_llm, self.llm

        def as_descriptions(texts: list[str]) -> list[Description]:
            return [Description(cls, "llm", t) for t in texts]

        def accept(text: str):
            return parse_descriptions(text) or None

        failed = False
        for rnd in range(self.cfg.max_rounds):
            with self.lock:
                have = self.store.count_descriptions(cls, "llm")
            if have >= n:
                break
            prompt = llm_prompt(self.cfg.prompt_words[cls], n - have)
            options = {"temperature": self.cfg.llm_temperature, "max_tokens": self.cfg.max_tokens, "seed": self.cfg.seed + rnd}
            key = call_key(llm.provider, llm.model, prompt, None, options)
            with self.lock:
                stored = self.store.successful_call(key)
                if stored is not None:  # asked before (an earlier run): use its answer, pay nothing
                    self.store.attach_descriptions(key, as_descriptions(parse_descriptions(stored[1] or "")), cap=n)
                    self.acc.reused += 1
                    continue
                spent = self.store.llm_calls(cls, llm.provider, llm.model)
            if spent >= self.cfg.max_rounds:
                break  # the budget is per class across runs: a re-run does not repeat a useless question
            if not self._call(llm, "llm", cls, prompt, None, None, None, options, accept, as_descriptions, cap=n):
                failed = True
                break
        with self.lock:
            have = self.store.count_descriptions(cls, "llm")
            spent = self.store.llm_calls(cls, llm.provider, llm.model)
        if have < n and not failed:
            self.short[cls] = (f"{cls}: the model gave only {have} of {n} distinct descriptions in {spent} call(s); Kano asks at "
                               f"most --max-rounds {self.cfg.max_rounds} times per class, so running again asks nothing: "
                               f"accept them with --n-llm {have}, raise --max-rounds, or try another --llm model or --seed")
        self.progress(1)

    # -- VQA: m descriptions per image ---------------------------------------------------
    def vqa_job(self, job: _VqaJob) -> None:
        def accept(text: str):
            cleaned = clean_vqa_reply(text)
            return [cleaned] if cleaned else None

        def as_descriptions(texts: list[str]) -> list[Description]:
            return [Description(job.cls, "vqa", texts[0], None, str(p)) for p in job.paths]

        with self.lock:
            stored = self.store.successful_call(job.key)
            if stored is not None:  # answered before (e.g. for a byte-identical image): describe the others with it
                text = clean_vqa_reply(stored[1] or "")
                if text:
                    self.store.attach_descriptions(job.key, as_descriptions([text]))
                self.acc.reused += 1
        if stored is None:
            self._call(self.vqa, "vqa", job.cls, vqa_prompt(self.cfg.prompt_words[job.cls]), job.data, str(job.paths[0]), job.sha,
                       vqa_options(self.cfg, job.j), accept, as_descriptions)
        self.progress(1)


def vqa_options(cfg: BuildConfig, j: int) -> dict:
    """Options of the j-th VQA call for an image (the seed differs so m > 1 gives m different calls)."""
    return {"temperature": cfg.vqa_temperature, "max_tokens": cfg.max_tokens, "seed": cfg.seed + j}


def _plan_vqa(store: KnowledgeStore, cfg: BuildConfig, vqa: Provider, classes: list[str],
              unreadable: list[tuple[str, str]]) -> tuple[list[_VqaJob], int]:
    """VQA jobs still to do, grouped by call key, and the number of (image, j) descriptions already stored."""
    jobs: dict[str, _VqaJob] = {}
    done = 0
    for cls in classes:
        described = store.described_images(cls) if cfg.images.get(cls) else set()
        for path in cfg.images.get(cls, []):
            try:
                data = path.read_bytes()
                image_to_png(data)  # a corrupt file is a recorded failure, not a call
            except OSError as exc:
                unreadable.append((cls, f"{path}: cannot read file ({exc.strerror})"))
                continue
            except ValueError as exc:
                unreadable.append((cls, f"{path}: must be a readable image, got {exc}"))
                continue
            sha = hashlib.sha256(data).hexdigest()
            for j in range(cfg.m_vqa):
                key = call_key(vqa.provider, vqa.model, vqa_prompt(cfg.prompt_words[cls]), sha, vqa_options(cfg, j))
                if (str(path), key) in described:
                    done += 1
                    continue
                job = jobs.setdefault(key, _VqaJob(cls, j, key, data, sha, []))
                job.paths.append(path)
    return list(jobs.values()), done


def build_knowledge_base(store: KnowledgeStore, cfg: BuildConfig, llm: Provider | None, vqa: Provider | None,
                         dry_run: bool = False, progress_factory=None, scrub: Callable[[str], str] = _identity) -> BuildReport:
    """Fill the knowledge base for cfg.classes. `llm`/`vqa` None mean builtin / none.

    The caller holds the KB's build lock (KnowledgeStore.build_lock) unless dry_run.
    """
    planned: list[PlannedCall] = []
    llm_jobs: list[str] = []
    notes: list[str] = []
    for cls in cfg.classes:
        if llm is None:
            if not dry_run:
                store.add_descriptions([Description(cls, "builtin", t) for t in builtin_descriptions(cls, cfg.n_llm)])
        elif (have_llm := store.count_descriptions(cls, "llm")) < cfg.n_llm:
            llm_jobs.append(cls)
            planned.append(PlannedCall("llm", cls, llm_prompt(cfg.prompt_words[cls], cfg.n_llm - have_llm)))
    unreadable: list[tuple[str, str]] = []
    vqa_jobs, _ = _plan_vqa(store, cfg, vqa, cfg.classes, unreadable) if vqa is not None else ([], 0)
    for job in vqa_jobs:
        planned.append(PlannedCall("vqa", job.cls, vqa_prompt(cfg.prompt_words[job.cls]), ", ".join(map(str, job.paths))))
    report_classes = {c: ClassReport() for c in cfg.classes}
    if dry_run:
        return _finish(store, cfg, vqa, report_classes, Accounting(), [], planned, Counter(), {}, notes)
    total = len(llm_jobs) + len(vqa_jobs)
    advance, close = (progress_factory(total) if progress_factory and total else (lambda k: None, lambda: None))
    builder = _Builder(store, cfg, llm, vqa, advance, scrub)
    for cls, message in unreadable:
        builder._fail("vqa", cls, message, call=False)
    try:
        with ThreadPoolExecutor(max_workers=cfg.concurrency) as pool:
            futures = [pool.submit(builder.llm_class, c) for c in llm_jobs]
            futures += [pool.submit(builder.vqa_job, job) for job in vqa_jobs]
            for f in as_completed(futures):
                f.result()
    finally:
        close()
    return _finish(store, cfg, vqa, report_classes, builder.acc, builder.failures, planned, builder.failed_per_class,
                   builder.short, notes)


def _finish(store, cfg, vqa, classes, acc, failures, planned, failed_per_class, short, notes) -> BuildReport:
    source = "builtin" if parse_spec(cfg.llm)[0] == "builtin" else "llm"
    for cls, r in classes.items():
        r.llm = min(store.count_descriptions(cls, source), cfg.n_llm)
        r.llm_needed = cfg.n_llm
        r.failed_calls = failed_per_class.get(cls, 0)
        r.llm_short = short.get(cls)
    if vqa is not None:
        for cls, r in classes.items():
            r.vqa_needed = len(cfg.images.get(cls, [])) * cfg.m_vqa
            # described (image, j) pairs among this build's images: byte-identical images each count
            classes[cls].vqa = _plan_vqa(store, cfg, vqa, [cls], [])[1]
    return BuildReport(classes, acc.succeeded, acc.reused, failures, planned, acc, notes)
