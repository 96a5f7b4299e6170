"""Folder names to the words used in prompts ([class] in eq. 1), per dataset."""

from __future__ import annotations

from kano.core.errors import KanoError

PROMPT_NAMES: dict[str, str] = {
    # MVTec-AD
    "metal_nut": "metal nut",
    # VisA
    "pcb1": "printed circuit board", "pcb2": "printed circuit board", "pcb3": "printed circuit board",
    "pcb4": "printed circuit board", "macaroni1": "macaroni", "macaroni2": "macaroni", "capsules": "capsules",
    "chewinggum": "chewing gum", "pipe_fryum": "pipe fryum",
    # MPDD
    "bracket_black": "black bracket", "bracket_brown": "brown bracket", "bracket_white": "white bracket",
    "metal_plate": "metal plate", "tubes": "metal tubes", "connector": "connector",
    # BTAD
    "01": "metal part", "02": "plastic part", "03": "metal surface",
    # SDD, DAGM
    "sdd": "electrical commutator",
    **{f"Class{i}": "textured surface" for i in range(1, 11)},
    # medical
    "brainmri": "brain MRI", "br35h": "brain MRI", "liverct": "liver CT", "resc": "retinal OCT",
    "covid": "chest X-ray", "headct": "head CT",
}


def prompt_name(class_name: str) -> str:
    """The [class] word(s) for a folder name: the table above, else underscores as spaces."""
    return PROMPT_NAMES.get(class_name, class_name.replace("_", " "))


def class_word(class_name: str, explicit: str | None = None, run_words: dict[str, str] | None = None) -> str:
    """The one rule that turns a class (folder) name into the prompt's [class] word, first match wins:
    1. the word given explicitly (`--class-word`, `class_word=`);
    2. the word a trained run used for that class (its config.json "prompt_names");
    3. the table PROMPT_NAMES above (benchmark folder names such as pcb1 -> "printed circuit board");
    4. the name with underscores as spaces (hazelnut_toy -> "hazelnut toy")."""
    if explicit is not None:
        word = explicit.strip()
        if not word:
            raise KanoError(f"the class word for {class_name!r} must be a non-empty word, got {explicit!r}")
        return word
    return (run_words or {}).get(class_name) or prompt_name(class_name)


def parse_class_words(raw: str | None) -> dict[str, str]:
    """'NAME=WORD[,NAME=WORD]' (`kano eval --class-word`) -> {NAME: WORD}."""
    if not raw:
        return {}
    words: dict[str, str] = {}
    for part in raw.split(","):
        name, eq, word = part.partition("=")
        if not eq or not name.strip() or not word.strip():
            raise KanoError(f"--class-word must be NAME=WORD[,NAME=WORD] (e.g. hazelnut_toy=hazelnut), got {raw!r}")
        words[name.strip()] = word.strip()
    return words


def known_words(run_words: dict[str, str] | None = None) -> set[str]:
    """The class words Kano knows: the built-in knowledge pack's classes (names and prompt words) and, for a
    trained run, the classes it was trained with (its config.json "prompt_names", names and words)."""
    import json
    from importlib import resources

    pack = json.loads(resources.files("kano.kb_builder").joinpath("builtin_pack.json").read_text())
    known = set(pack.get("classes", {}))
    known |= {prompt_name(c) for c in known}
    for name, word in (run_words or {}).items():
        known |= {name, word}
    return known


# difflib similarity from which a word counts as a misspelling of a known one: one letter swapped, dropped or
# changed in a word of 4 letters or more (hazlenut/hazelnut 0.88, disk/disc 0.75), while distinct short words
# stay apart (part/carpet 0.60, scales/cable 0.73)
TYPO_SIMILARITY = 0.75


def closest(name: str, choices) -> str | None:
    """The one choice `name` most likely misspells (difflib, similarity >= TYPO_SIMILARITY), or None: for "did
    you mean" and for the corrected name in a command an error suggests."""
    import difflib

    if name in choices:
        return name
    close = difflib.get_close_matches(name, sorted(choices), n=1, cutoff=TYPO_SIMILARITY)
    return close[0] if close else None


def unknown_word_warning(word: str, known: set[str], what: str = "class word") -> str | None:
    """A warning when `word` looks like a misspelling of a known class (difflib), naming the closest ones; None
    when it is known or resembles none. A new class word is no mistake: scoring classes never seen in training
    is what a zero-shot detector is for, and `kano kb build --llm builtin` gives any class generic descriptions."""
    import difflib

    if word in known or word.replace(" ", "_") in known:
        return None
    close = difflib.get_close_matches(word, sorted(known), n=3, cutoff=TYPO_SIMILARITY)
    if not close:
        return None
    return (f"{what} {word!r} is not a class the knowledge base or the built-in pack describes, so the prompts carry "
            f"no learned knowledge of it; did you mean {', '.join(repr(c) for c in close)}?")
