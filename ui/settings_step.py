"""Steps 3-5 of the page: caption and trigger word, preset and overrides, base model."""
from __future__ import annotations

import os

from trainer import api
from trainer.errors import UserError

DEFAULT_PROMPTS = "[trigger] as a watercolor painting\n[trigger] seen from the back, in a snowy forest"


def preset_choices() -> list[tuple[str, str]]:
    return [(f"{p.name} — {p.description}", p.name) for p in api.list_presets()]


def on_preset_change(name: str):
    """Fill the override boxes with the preset's values."""
    cfg = api.load_preset(name).config()
    return cfg.rank, cfg.steps, cfg.learning_rate, cfg.save_every


def on_plan_change(model: str, rank, steps, save_every, preset: str | None = None, prompts: str = "") -> str:
    """Checkpoints and their size, and before Train how long it will take on a CPU (``api.time_notice``: the CLI says
    the same), from the preset's resolution and the preview prompts."""
    try:
        cfg = api.TrainingConfig(rank=int(rank), steps=int(steps), save_every=int(save_every))
        full, _ = api.training_config(api.RunRequest(
            caption="[trigger]", preset=preset or api.DEFAULT_PRESET, sample_prompts=prompt_lines(prompts),
            model=model_spec(model), overrides={"rank": cfg.rank, "steps": cfg.steps, "save_every": cfg.save_every}))
    except (UserError, TypeError, ValueError) as err:
        return f"❌ {err}"
    lines = [api.plan_summary(model_spec(model), cfg.rank, cfg.checkpoint_steps)]
    timing = api.time_notice(full)
    if timing:
        lines.append(f"⏱️ {timing}")
        if preset != api.CPU_DEMO_PRESET and any(p.name == api.CPU_DEMO_PRESET for p in api.list_presets()):
            lines.append(f"No GPU here: the **{api.CPU_DEMO_PRESET}** preset tries the whole workflow in a few minutes.")
    return "  \n".join(lines)


def first_preset(presets: list[tuple[str, str]]) -> str:
    """The preset the page starts with: the short CPU demo on a machine without a CUDA GPU, else the default."""
    import torch

    names = [value for _, value in presets]
    wanted = api.DEFAULT_PRESET if torch.cuda.is_available() else api.CPU_DEMO_PRESET
    if wanted not in names:
        wanted = api.DEFAULT_PRESET
    return wanted if wanted in names else names[0]


def model_spec(choice: str) -> str:
    return (choice or api.default_model()).strip()


def model_notice(choice: str) -> str:
    """What the chosen model is, its license, what it downloads and needs, before anything is fetched."""
    import torch

    spec = model_spec(choice)
    extra = " No CUDA GPU was found, so it is the default here." \
        if not torch.cuda.is_available() and spec == api.default_model() else ""
    if spec == api.SHAPES_DEMO:
        return f"ℹ️ {api.SHAPES_DEMO_NOTICE}{extra}"
    tiny = api.tiny_ids()
    if spec in tiny:
        return f"ℹ️ {tiny[spec].tiny_notice}{extra}"
    try:
        family = api.family_of_spec(spec)
    except UserError as err:
        return f"⚠️ {err}"
    token = "found in the environment (HF_TOKEN)" if os.environ.get("HF_TOKEN") else "not set"
    lines = []
    if spec in family.hub_ids:
        gated = (f"It is gated: accept its license on huggingface.co, and give a token (HF_TOKEN). Token: **{token}**. "
                 if family.gated else "")
        lines.append(f"**{family.label}**. {gated}{family.download_notice}")
        lines.append(f"License: {family.license_notice}")
    else:
        lines.append(f"A Hub id or a local diffusers folder (with model_index.json), trained as {family.label}. "
                     f"Hub token: **{token}**.")
    if not torch.cuda.is_available():
        lines.append("⚠️ No CUDA GPU was found: only the built-in small models (shapes-demo, tiny-demo) can train here.")
    return "  \n".join(lines)


def memory_tier_choices() -> list[tuple[str, str]]:
    return [("auto — picked from the detected GPU", api.AUTO),
            *((f"{t.name} — {t.description}", t.name) for t in api.list_tiers())]


def memory_tier_notice(choice: str, model: str = "") -> str:
    """What the job will do about GPU memory, and why: the detected GPU and the tier it gets."""
    import torch

    try:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        spec = model_spec(model)
        picked = api.choose_tier(choice or api.AUTO, device, tiny_model=spec in api.builtin_ids(),
                                 family=api.family_of_spec(spec))
    except UserError as err:
        return f"⚠️ {err}"
    return f"ℹ️ {picked.reason}"


def preview_model_options(model: str) -> dict:
    """The "previews drawn by" choice for this model: the base model being trained, or its family's distilled
    model (klein). Hidden, and empty, for a family without one."""
    try:
        family = api.family_of_spec(model_spec(model))
    except UserError:
        family = None
    if family is None or family.distilled_render is None:
        return dict(choices=[("the base model being trained", "")], value="", visible=False)
    steps, guidance = family.distilled_render
    return dict(choices=[(f"the base model being trained ({family.preview_steps} steps, guidance "
                          f"{family.preview_guidance:g})", ""),
                         (f"{family.distilled_hub_id} — the distilled model ({steps} steps, guidance {guidance:g}; "
                          "downloaded like the base model)", family.distilled_hub_id)],
                value="", visible=True)


def gpus_choices(max_gpus: int) -> list[int]:
    """1 .. the most GPUs one job can have (the job manager's devices: one per CUDA GPU when there are several)."""
    return list(range(1, max(1, int(max_gpus)) + 1))


def gpus_note(gpus, learning_rate, batch_size=1) -> str:
    """What N GPUs do to one job: N data-parallel processes, the batch on each, the learning rate x sqrt(N x batch)."""
    try:
        n, lr, b = int(gpus or 1), float(learning_rate), max(1, int(batch_size or 1))
    except (TypeError, ValueError):
        return "❌ The learning rate must be a number."
    if n <= 1:
        return (f"One GPU, batch {b}. With several GPUs one job trains data-parallel: batch {b} on each GPU, "
                f"learning rate scaled by √(N × batch).")
    per = n * b
    return (f"{n} GPUs, **batch {b} on each GPU** (each sees its own noised copy of its image every step). The "
            f"learning rate is scaled by √{per}: {lr:g} × √{per} = **{api.scaled_learning_rate(lr, n, b):.3g}**. The "
            f"job waits until {n} GPUs are free; each holds the whole model.")


def model_choices() -> list[str]:
    """Each family's Hub models, then the built-in small ones (shapes-demo first: it learns something visible)."""
    return [*(hub_id for family in api.FAMILIES for hub_id in family.hub_ids), api.SHAPES_DEMO,
            *(spec for spec in api.builtin_ids() if spec != api.SHAPES_DEMO)]


def prompt_lines(text: str) -> tuple[str, ...]:
    return tuple(line.strip() for line in (text or "").splitlines() if line.strip())
