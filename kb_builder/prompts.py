"""The paper's prompt templates (§2.2.1, verbatim) and the parsing of model replies.

Plain data plus small pure functions; unit-tested in tests/test_prompts.py.
"""

from __future__ import annotations

import json
import re

from kano.knowledge_store import normalise_text

# §2.2.1, verbatim: the LLM is asked once per class for n descriptions.
LLM_TEMPLATE = "Q: Describe what an abnormal image of class ({class_name}) looks like?"
# §2.2.1, verbatim: "<IMAGE> + Q: ..." -- the image travels as its own message part.
VQA_TEMPLATE = (
    "Q: Identify anomalies in the input image of the specified class ({class_name}). "
    "Describe each anomaly's location, color, shape, size, and other characteristics."
)
# Our addition after the template, so a reply can be split into n separate sentences.
LLM_COUNT_SUFFIX = "\nGive {k} different {noun}, one per line, each a single complete sentence."

_BULLET = re.compile(r"^\s*(?:[-*\u2022\u2023\u25cf>]+|\(?\d{1,3}[.):\]]|\(?[a-zA-Z][.)])\s+")
_REFUSAL = re.compile(
    r"^\s*(?:i'?m sorry|i am sorry|sorry[,.!]|i cannot|i can'?t|i can not|i'?m unable|i am unable|as an ai\b"
    r"|unfortunately,? i|i (?:do not|don't) (?:see|have)|i won'?t)",
    re.IGNORECASE,
)
MIN_WORDS = 4


def llm_prompt(class_name: str, k: int) -> str:
    """The LLM request text: the paper's template asking for k descriptions.

    `class_name` is the prompt word (anomaly_data.prompt_name: "printed circuit board"), not the folder name.
    """
    return LLM_TEMPLATE.format(class_name=class_name) + LLM_COUNT_SUFFIX.format(k=k, noun="description" if k == 1 else "descriptions")


def vqa_prompt(class_name: str) -> str:
    """The VQA question; `class_name` is the prompt word, as for llm_prompt."""
    return VQA_TEMPLATE.format(class_name=class_name)


def is_refusal(reply: str) -> bool:
    """True for replies that decline the task instead of answering it."""
    return bool(_REFUSAL.match(reply or ""))


def _strip_item(line: str) -> str:
    line = _BULLET.sub("", line.strip())
    line = re.sub(r"^\*\*(.+?)\*\*:?\s*", r"\1: ", line)  # markdown bold heading
    line = line.replace("**", "").strip().strip('"').strip()
    return line


def _json_items(text: str) -> list[str] | None:
    body = text.strip()
    fence = re.match(r"^```(?:json)?\s*(.*?)```\s*$", body, re.DOTALL)
    if fence:
        body = fence.group(1).strip()
    if not body or body[0] not in "[{":
        return None
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        return None
    items: list[str] = []

    def walk(x):
        if isinstance(x, str):
            items.append(x)
        elif isinstance(x, list):
            for y in x:
                walk(y)
        elif isinstance(x, dict):
            for y in x.values():
                walk(y)

    walk(data)
    return items


def parse_descriptions(reply: str) -> list[str]:
    """Split an LLM reply into distinct description sentences.

    Handles JSON (a list, or an object holding lists), numbered lists, bullets and prose.
    Headers ("Here are five descriptions:") and fragments shorter than MIN_WORDS words are
    dropped; duplicates (case and whitespace ignored) are kept once, in order.
    """
    if not reply or not reply.strip() or is_refusal(reply):
        return []
    items = _json_items(reply)
    if items is None:
        lines = [ln for ln in reply.splitlines() if ln.strip()]
        listed = [ln for ln in lines if _BULLET.match(ln)]
        if len(listed) >= 2:
            items = [_strip_item(ln) for ln in listed]
        elif len(lines) >= 2:
            items = [_strip_item(ln) for ln in lines]
        else:
            # one paragraph of prose: one sentence each
            items = [s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", reply.strip())]
    out: list[str] = []
    seen: set[str] = set()
    for item in items:
        item = " ".join(_strip_item(item).split())
        if len(item.split()) < MIN_WORDS or item.endswith(":") or is_refusal(item):
            continue
        key = normalise_text(item)
        if key in seen:
            continue
        seen.add(key)
        out.append(item)
    return out


def clean_vqa_reply(reply: str) -> str | None:
    """One description from a VQA reply: the whole answer on one line, or None if unusable."""
    if not reply or is_refusal(reply):
        return None
    parts = [_strip_item(ln) for ln in reply.splitlines() if ln.strip()]
    text = " ".join(" ".join(parts).split())
    return text if len(text.split()) >= MIN_WORDS else None
