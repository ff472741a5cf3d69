"""The model families this trainer knows, and how to tell which one a model, a folder or a checkpoint belongs to.

``FAMILIES`` lists them (``trainer/families/base.py`` says what a family is). Detection never loads weights: a model
spec is a family's tiny id or Hub id, or a local diffusers folder whose ``model_index.json`` names its pipeline class;
a loaded transformer is known by its class; a saved LoRA by the ``family`` its metadata records (checkpoints written
before families existed are FLUX.1, the only family there was).
"""
from __future__ import annotations

import json
from pathlib import Path

from trainer.errors import UserError
from trainer.families.base import KohyaLayout, ModelFamily, TextReader
from trainer.families.flux1 import FLUX1
from trainer.families.flux2_klein import FLUX2_KLEIN

FAMILIES: tuple[ModelFamily, ...] = (FLUX1, FLUX2_KLEIN)
DEFAULT_FAMILY = FLUX1  # a Hub id we do not know: assume the FLUX.1 architecture, as before there were families

__all__ = ["DEFAULT_FAMILY", "FAMILIES", "FLUX1", "FLUX2_KLEIN", "KohyaLayout", "ModelFamily", "TextReader",
           "family_named", "family_of_folder", "family_of_metadata", "family_of_spec", "family_of_transformer",
           "tiny_ids", "DEMO_IDS", "builtin_ids"]

# Built-in models with *trained* weights, shipped in the repository (``models/<id>/``, a diffusers folder), and their
# families. ``shapes-demo`` (trained by scripts/train_shapes_demo.py) really draws simple scenes, so a CPU user sees
# what a LoRA does; the tiny ids are built in code with random weights and exist for the fastest tests.
DEMO_IDS: dict[str, ModelFamily] = {"shapes-demo": FLUX1}


def family_named(name: str) -> ModelFamily:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise UserError(f"Unknown model family '{name}'. Known families: {', '.join(f.name for f in FAMILIES)}.")


def tiny_ids() -> dict[str, ModelFamily]:
    """The built-in tiny stand-ins' model specs ("tiny-demo", ...) and their families."""
    return {family.tiny_id: family for family in FAMILIES}


def builtin_ids() -> dict[str, ModelFamily]:
    """Every built-in model small enough for a CPU: the tiny stand-ins and the shipped demos, with their families."""
    return {**tiny_ids(), **DEMO_IDS}


def family_of_folder(folder: Path) -> ModelFamily:
    """The family of a diffusers folder, from the pipeline class its ``model_index.json`` names."""
    index = Path(folder) / "model_index.json"
    try:
        class_name = json.loads(index.read_text()).get("_class_name", "")
    except (OSError, ValueError, AttributeError):
        raise UserError(f"'{index}' is missing or not valid JSON; the model folder looks damaged.") from None
    if not class_name:
        return DEFAULT_FAMILY  # a hand-made index without a class: assumed FLUX.1, as before there were families
    for family in FAMILIES:
        if class_name in family.pipeline_classes:
            return family
    known = ", ".join(c for f in FAMILIES for c in f.pipeline_classes)
    raise UserError(f"The model in '{folder}' is a {class_name or 'pipeline of unknown kind'}; this trainer trains "
                    f"{', '.join(f.label for f in FAMILIES)} ({known}).")


def family_of_spec(spec: str) -> ModelFamily:
    """The family of a model spec (a tiny id, a Hub id, a local folder) without downloading anything."""
    spec = (spec or "").strip()
    if spec in builtin_ids():
        return builtin_ids()[spec]
    folder = Path(spec).expanduser()
    if (folder / "model_index.json").is_file():
        return family_of_folder(folder)
    for family in FAMILIES:
        if spec == family.default_hub_id or spec in family.hub_ids:
            return family
    return DEFAULT_FAMILY


def family_of_transformer(transformer) -> ModelFamily:
    """The family of a loaded transformer (unwrapping DistributedDataParallel), by its class."""
    model = getattr(transformer, "module", transformer)
    names = {cls.__name__ for cls in type(model).__mro__}
    for family in FAMILIES:
        if family.transformer_class_name in names:
            return family
    raise TypeError(f"no model family has a transformer of class {type(model).__name__}")


def family_of_metadata(metadata: dict[str, str] | None) -> ModelFamily:
    """The family a saved LoRA was trained on, from its metadata."""
    name = (metadata or {}).get("family")
    return family_named(name) if name else DEFAULT_FAMILY
