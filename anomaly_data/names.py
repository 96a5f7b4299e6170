"""Folder names to the words used in prompts ([class] in eq. 1), per dataset."""

from __future__ import annotations

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
