"""Build orchestration: plan, call (bounded concurrency, retries), store each finished call at once.

Resumable by construction: a call whose key (provider, model, prompt, image hash, options) is
stored as successful is never made again, and every call is committed with its descriptions in
one transaction, so a killed build loses at most the calls in flight.
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from kano.errors import KanoError
from knowledge_store import CallRecord, Description, KnowledgeStore, normalise_text

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
        if not self.classes:
            raise KanoError("--classes must name at least one class, got none")
        from anomaly_data.names import prompt_name

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


@dataclass
class BuildReport:
    classes: dict[str, ClassReport]
    calls_made: int
    calls_reused: int
    failures: list[str]
    planned: list[PlannedCall]

    @property
    def missing(self) -> list[str]:
        out = []
        for cls, r in self.classes.items():
            if r.llm < r.llm_needed:
                out.append(f"{cls}: {r.llm_needed - r.llm} LLM description(s)")
            if r.vqa < r.vqa_needed:
                out.append(f"{cls}: {r.vqa_needed - r.vqa} VQA description(s)")
        return out


def call_key(provider: str, model: str, prompt: str, image_sha256: str | None, options: dict) -> str:
    blob = json.dumps([provider, model, prompt, image_sha256 or "", options], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


class _Builder:
    def __init__(self, store: KnowledgeStore, cfg: BuildConfig, llm: Provider | None, vqa: Provider | None,
                 progress: Callable[[int], None]):
        self.store, self.cfg, self.llm, self.vqa = store, cfg, llm, vqa
        self.progress = progress
        self.lock = threading.Lock()  # serialises writes to the file
        self.calls_made = 0
        self.calls_reused = 0
        self.failures: list[str] = []
        self.failed_per_class: dict[str, int] = {}

    # -- one logical call with retries; every attempt is logged -----------------------------
    def _call(self, provider: Provider, kind: str, cls: str, prompt: str, image: bytes | None, image_path: str | None,
              image_sha: str | None, options: dict, accept: Callable[[str], list[str] | None]):
        key = call_key(provider.provider, provider.model, prompt, image_sha, options)
        with self.lock:
            stored = self.store.successful_call(key)
        if stored is not None:
            with self.lock:
                self.calls_reused += 1
            return stored[0], stored[1]
        last_error = ""
        for attempt in range(self.cfg.max_retries + 1):
            t0 = time.perf_counter()
            reply_text = None
            try:
                reply = provider.complete(prompt, image, options)
                reply_text = reply.text
                latency = time.perf_counter() - t0
                if not reply.text or not reply.text.strip():
                    raise ProviderError("empty reply", retryable=True)
                if is_refusal(reply.text):
                    raise ProviderError(f"refusal: {reply.text.strip()[:120]}", retryable=True)
                texts = accept(reply.text)
                if texts is None:
                    raise ProviderError(f"reply has no usable description: {reply.text.strip()[:120]}", retryable=True)
            except ProviderError as exc:
                last_error = str(exc)
                latency = time.perf_counter() - t0
                self._record(CallRecord(key, kind, provider.provider, provider.model, None, cls, prompt, image_path, image_sha,
                                        options, reply_text, None, None, latency, "error", last_error, attempt + 1))
                if not exc.retryable or attempt == self.cfg.max_retries:
                    break
                time.sleep(self.cfg.backoff_s * (2 ** attempt) * (0.5 + random.random()))
                continue
            rec = CallRecord(key, kind, provider.provider, provider.model, reply.served_model, cls, prompt, image_path,
                             image_sha, options, reply.text, reply.input_tokens, reply.output_tokens, latency, "ok", None,
                             attempt + 1)
            descs = [Description(cls, kind, t, None, image_path) for t in texts]
            with self.lock:
                call_id = self.store.record_call(rec, descs if kind == "vqa" else ())
                self.calls_made += 1
            return call_id, reply.text
        self._fail(kind, cls, f"{image_path or ''}: {last_error}")
        return None

    def _record(self, rec: CallRecord) -> None:
        with self.lock:
            self.store.record_call(rec)

    # -- LLM: exactly n distinct descriptions per class ----------------------------------
    def llm_class(self, cls: str) -> None:
        n = self.cfg.n_llm
        for rnd in range(self.cfg.max_rounds):
            with self.lock:
                have = self.store.descriptions(cls, ["llm"])
            if len(have) >= n:
                break
            missing = n - len(have)
            prompt = llm_prompt(self.cfg.prompt_words[cls], missing)
            options = {"temperature": self.cfg.llm_temperature, "max_tokens": self.cfg.max_tokens, "seed": self.cfg.seed + rnd}
            got = self._call(self.llm, "llm", cls, prompt, None, None, None, options,
                             accept=lambda text: parse_descriptions(text) or None)
            if got is None:
                break
            call_id, text = got
            with self.lock:
                seen = {normalise_text(d.text) for d in self.store.descriptions(cls, ["llm"])}
                new = []
                for t in parse_descriptions(text):
                    if normalise_text(t) not in seen and len(seen) < n:
                        seen.add(normalise_text(t))
                        new.append(Description(cls, "llm", t, None, None))
                if new:
                    self.store.add_descriptions_for_call(call_id, new)
        self.progress(1)

    # -- VQA: m descriptions per image ---------------------------------------------------
    def _fail(self, kind: str, cls: str, message: str) -> None:
        with self.lock:
            self.failures.append(f"{kind} {cls} {message}")
            self.failed_per_class[cls] = self.failed_per_class.get(cls, 0) + 1

    def vqa_image(self, cls: str, path: Path, j: int) -> None:
        try:
            data = path.read_bytes()
            image_to_png(data)  # a corrupt file is a recorded failure, not a call
        except OSError as exc:
            self._fail("vqa", cls, f"{path}: cannot read file ({exc.strerror})")
        except ValueError as exc:
            self._fail("vqa", cls, f"{path}: must be a readable image, got {exc}")
        else:
            def accept(text: str):
                cleaned = clean_vqa_reply(text)
                return [cleaned] if cleaned else None

            self._call(self.vqa, "vqa", cls, vqa_prompt(self.cfg.prompt_words[cls]), data, str(path), hashlib.sha256(data).hexdigest(),
                       vqa_options(self.cfg, j), accept)
        self.progress(1)


def vqa_options(cfg: BuildConfig, j: int) -> dict:
    """Options of the j-th VQA call for an image (the seed differs so m > 1 gives m different calls)."""
    return {"temperature": cfg.vqa_temperature, "max_tokens": cfg.max_tokens, "seed": cfg.seed + j}


def _vqa_done(store: KnowledgeStore, provider: Provider, cls: str, path: Path, j: int, cfg: BuildConfig) -> bool:
    try:
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return False
    key = call_key(provider.provider, provider.model, vqa_prompt(cfg.prompt_words[cls]), sha, vqa_options(cfg, j))
    return store.successful_call(key) is not None


def build_knowledge_base(store: KnowledgeStore, cfg: BuildConfig, llm: Provider | None, vqa: Provider | None,
                         dry_run: bool = False, progress_factory=None) -> BuildReport:
    """Fill the knowledge base for cfg.classes. `llm`/`vqa` None mean builtin / none."""
    planned: list[PlannedCall] = []
    llm_jobs: list[str] = []
    vqa_jobs: list[tuple[str, Path, int]] = []
    for cls in cfg.classes:
        if llm is None:
            have = {normalise_text(d.text) for d in store.descriptions(cls, ["builtin"])}
            new = [t for t in builtin_descriptions(cls, cfg.n_llm) if normalise_text(t) not in have]
            if new and not dry_run:
                store.add_descriptions([Description(cls, "builtin", t) for t in new])
        elif (have_llm := len(store.descriptions(cls, ["llm"]))) < cfg.n_llm:
            llm_jobs.append(cls)
            planned.append(PlannedCall("llm", cls, llm_prompt(cfg.prompt_words[cls], cfg.n_llm - have_llm)))
        if vqa is not None:
            for path in cfg.images.get(cls, []):
                for j in range(cfg.m_vqa):
                    if not _vqa_done(store, vqa, cls, path, j, cfg):
                        vqa_jobs.append((cls, path, j))
                        planned.append(PlannedCall("vqa", cls, vqa_prompt(cfg.prompt_words[cls]), str(path)))
    report_classes = {c: ClassReport() for c in cfg.classes}
    if dry_run:
        return _finish(store, cfg, vqa, report_classes, 0, 0, [], planned, {})
    total = len(llm_jobs) + len(vqa_jobs)
    advance, close = (progress_factory(total) if progress_factory and total else (lambda k: None, lambda: None))
    builder = _Builder(store, cfg, llm, vqa, advance)
    try:
        with ThreadPoolExecutor(max_workers=cfg.concurrency) as pool:
            futures = [pool.submit(builder.llm_class, c) for c in llm_jobs]
            futures += [pool.submit(builder.vqa_image, c, p, j) for c, p, j in vqa_jobs]
            for f in as_completed(futures):
                f.result()
    finally:
        close()
    return _finish(store, cfg, vqa, report_classes, builder.calls_made, builder.calls_reused, builder.failures, planned,
                   builder.failed_per_class)


def _finish(store, cfg, vqa, classes, made, reused, failures, planned, failed_per_class) -> BuildReport:
    for cls, r in classes.items():
        source = "builtin" if parse_spec(cfg.llm)[0] == "builtin" else "llm"
        r.llm = len(store.descriptions(cls, [source]))
        r.llm_needed = cfg.n_llm
        if vqa is not None:
            r.vqa = len(store.descriptions(cls, ["vqa"]))
            r.vqa_needed = len(cfg.images.get(cls, [])) * cfg.m_vqa
        r.failed_calls = failed_per_class.get(cls, 0)
    return BuildReport(classes, made, reused, failures, planned)
