"""Publish a run's chosen checkpoint to the Hugging Face Hub with a model card. Optional; private by default.

``plan_publish`` decides everything that would be uploaded (the LoRA in the diffusers layout at the repo root,
the kohya/ComfyUI layout under ``comfyui/``, sample images, the grid, ``README.md``) without touching the
network; ``publish`` creates the repo (private unless asked otherwise) and uploads it all in one commit with
``huggingface_hub``, using the user's own token. The token is passed to the Hub client only: it is never
written into a file, the card, or the LoRA metadata (the export's allow-list keeps it out of the weights).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from trainer.review.advisor import ADVICE_FILE, load_advice, starred_step
from trainer.errors import UserError
from trainer.review.export import export_bytes
from trainer.families import family_of_spec
from trainer.runs.folder import RunFolder

__all__ = ["ADVICE_FILE", "PublishPlan", "plan_publish", "publish", "recommended"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


@dataclass(frozen=True)
class PublishPlan:
    repo_id: str
    private: bool
    step: int
    weight: float
    files: dict[str, bytes]  # path in the repo → content

    @property
    def card(self) -> str:
        return self.files["README.md"].decode("utf-8")

    def operations(self):
        from huggingface_hub import CommitOperationAdd

        return [CommitOperationAdd(path_in_repo=path, path_or_fileobj=data) for path, data in self.files.items()]


def recommended(run: RunFolder) -> tuple[int, float, str]:
    """(step, weight, why): the user's star, else the advisor's suggestion, else the last checkpoint at 1.0."""
    steps = [c["step"] for c in run.checkpoints if (run.path / c["path"]).is_file()]
    if not steps:
        raise UserError("This run has no checkpoints to publish.")
    advice = load_advice(run.path)
    star = starred_step(run.path)
    if star in steps:
        weight = advice.weight if advice and advice.step == star else 1.0
        return star, weight, "starred by the trainer's user"
    if advice and advice.step in steps:
        return advice.step, advice.weight, "suggested by the checkpoint scores (a heuristic)"
    return max(steps), 1.0, "the last checkpoint"


def plan_publish(run: RunFolder, repo_id: str, step: int | None = None, weight: float | None = None,
                 private: bool = True, grid: Path | None = None) -> PublishPlan:
    repo_id = (repo_id or "").strip()
    if not _REPO_ID.match(repo_id):
        raise UserError(f"'{repo_id}' is not a Hub repo id: write it as 'your-username/model-name'.")
    rec_step, rec_weight, why = recommended(run)
    if step is None:
        step, why = rec_step, why
    if weight is None:
        weight = rec_weight if step == rec_step else 1.0
    entry = next((c for c in run.checkpoints if c["step"] == step), None)
    if entry is None or not (run.path / entry["path"]).is_file():
        raise UserError(f"There is no checkpoint at step {step} in this run.")
    cfg = run.config
    name = _file_stem(repo_id)
    info = {"base_model": run.model, "steps": str(step), "step": str(step), "rank": str(cfg.rank),
            "alpha": str(cfg.alpha), "resolution": str(cfg.resolution), "trigger_word": cfg.trigger,
            "caption": cfg.training_caption, "learning_rate": str(cfg.learning_rate), "software": "one-image-lora"}
    checkpoint = run.path / entry["path"]
    files: dict[str, bytes] = {
        f"{name}.safetensors": export_bytes(checkpoint, "diffusers", info),
        f"comfyui/{name}-comfyui.safetensors": export_bytes(checkpoint, "kohya", info),
    }
    samples = []
    for i, preview in enumerate(entry.get("previews", [])):
        path = run.path / preview["path"]
        if path.is_file():
            files[f"images/sample-{i}.png"] = path.read_bytes()
            samples.append((f"images/sample-{i}.png", preview["prompt"]))
    grid_path = None
    if grid is not None and Path(grid).is_file():
        grid_path = "images/grid.png"
        files[grid_path] = Path(grid).read_bytes()
    files["README.md"] = model_card(run, repo_id, name, step, weight, why, samples, grid_path).encode("utf-8")
    return PublishPlan(repo_id=repo_id, private=private, step=step, weight=weight, files=files)


def _file_stem(repo_id: str) -> str:
    return re.sub(r"[^\w.-]", "_", repo_id.split("/", 1)[1])


def model_card(run: RunFolder, repo_id: str, name: str, step: int, weight: float, why: str,
               samples: list[tuple[str, str]], grid_path: str | None) -> str:
    from huggingface_hub import ModelCardData

    cfg = run.config
    family = family_of_spec(run.model_path if run.model_path and Path(run.model_path).is_dir() else run.model)
    hub_base = run.model if _REPO_ID.match(run.model or "") and not Path(run.model).expanduser().exists() else None
    data = dict(tags=["text-to-image", *family.card_tags, "lora", "diffusers", "template:sd-lora", "one-image-lora"],
                library_name="diffusers")
    if hub_base:
        data["base_model"] = hub_base
    if hub_base == family.default_hub_id:
        data.update(family.card_license)
    if cfg.trigger:
        data["instance_prompt"] = cfg.trigger
    if samples:
        data["widget"] = [{"text": prompt, "output": {"url": path}} for path, prompt in samples]
    front = ModelCardData(**data).to_yaml()
    trigger = f"`{cfg.trigger}`" if cfg.trigger else "none (a style LoRA: it applies without one)"
    base_line = f"[{hub_base}](https://huggingface.co/{hub_base})" if hub_base else f"`{run.model}`"
    settings = [("base model", run.model), ("trained steps", step), ("rank / alpha", f"{cfg.rank} / {cfg.alpha:g}"),
                ("learning rate", cfg.learning_rate), ("resolution", f"{cfg.resolution} px area"
                                                                    + (f" ({run.train_size[0]}x{run.train_size[1]})"
                                                                       if run.train_size else "")),
                ("masked loss", "yes (background not trained)" if cfg.masked else "no"),
                ("caption", cfg.training_caption), ("seed", cfg.seed)]
    images = run.image_count
    if images > 1 or cfg.batch_size > 1:  # a set: how its steps counted (a one-image card says what it always said)
        from trainer.training.schedule import epochs_at_step

        settings[1:2] = [("trained steps", f"{step} ({epochs_at_step(step, images, cfg.batch_size, run.gpus):g} "
                                           f"epochs of {images} images, batch {cfg.batch_size} x {run.gpus} GPU(s))")]
        settings[-2] = ("captions", "; ".join(cfg.with_trigger(e["caption"]) for e in run.set_entries()))
    pipeline = family.pipeline_classes[0]
    lines = [
        "---", front.strip(), "---", "",
        f"# {repo_id.split('/', 1)[1]}", "",
        f"A {family.label} LoRA trained from "
        f"{'a single image' if images == 1 else f'a set of {images} images'} with one-image-lora, on {base_line}.", "",
        f"**Trigger word:** {trigger}", "",
        f"**Recommended:** the checkpoint at step {step}, at LoRA weight **{weight:g}** ({why}). "
        "One-image LoRAs overfit easily: if outputs copy the training image or show a rough texture, lower the weight.",
        "",
    ]
    lines += _rounds_section(run)
    if grid_path:
        lines += ["## Checkpoint comparison", "",
                  "Columns: the base model, then each checkpoint; rows: seeds.", "",
                  f"![checkpoint grid]({grid_path})", ""]
    if samples:
        lines += ["## Samples", ""] + [f"![{prompt}]({path})" for path, prompt in samples] + [""]
    lines += ["## Training settings", "", "| setting | value |", "| --- | --- |"]
    lines += [f"| {k} | {str(v).replace('|', '/')} |" for k, v in settings]
    lines += [
        "", "## Use it", "",
        "With diffusers:", "", "```python", "import torch", f"from diffusers import {pipeline}", "",
        f"pipe = {pipeline}.from_pretrained({json.dumps(hub_base or family.default_hub_id)}, "
        "torch_dtype=torch.bfloat16).to(\"cuda\")",
        f"pipe.load_lora_weights({json.dumps(repo_id)}, weight_name={json.dumps(name + '.safetensors')}, adapter_name=\"lora\")",
        f"pipe.set_adapters([\"lora\"], adapter_weights=[{weight:g}])",
        f"image = pipe({json.dumps(cfg.training_caption)}, num_inference_steps={family.usage_steps}, "
        f"guidance_scale={family.usage_guidance:g}).images[0]",
        "```", "",
        f"In ComfyUI or Forge: download `comfyui/{name}-comfyui.safetensors` (kohya layout) into `models/loras` "
        f"and use it at strength {weight:g}.", "",
    ]
    return "\n".join(lines)


def _rounds_section(run: RunFolder) -> list[str]:
    """A grown set's card says what was synthetic and how it was made (trainer.grow: round, source, each picture)."""
    if not run.lineage:
        return []
    source = run.lineage.get("source", {})
    made = (f"rendered by reference editing with {source.get('model', 'a FLUX.2 [klein] model')} (no training)"
            if source.get("kind") == "reference" else
            f"rendered by round {run.lineage.get('parent', {}).get('round', 1)}'s LoRA at step {source.get('step')} "
            f"(weight {source.get('weight', 1.0):g})")
    lines = ["## How the dataset was grown", "",
             f"This is round {run.lineage.get('round')}. Its synthetic pictures were {made}, picked by hand, then "
             "masked and captioned; the original picture(s) stayed in.", "",
             "| picture | origin | asked for | seed |", "| --- | --- | --- | --- |"]
    for entry in run.set_entries():
        origin = entry.get("provenance") or {}
        kind = origin.get("source", {}).get("kind", "original")
        lines.append(f"| {entry.get('name', '')} | {'original' if kind == 'original' else 'synthetic'} | "
                     f"{str(origin.get('kind', '')).replace('|', '/')} | {origin.get('seed', '')} |")
    return lines + [""]


def publish(plan: PublishPlan, token: str | None, api=None, endpoint: str | None = None) -> str:
    """Create the repo (private unless the plan says otherwise) and upload the plan's files in one commit.
    Returns the repo's URL."""
    from huggingface_hub import HfApi
    from huggingface_hub import errors as hub_errors

    if not token:
        raise UserError("Publishing needs your Hugging Face token with write access: set HF_TOKEN, or log in on the "
                        "Space. It is used for this upload only and never saved in the files.")
    api = api or HfApi(endpoint=endpoint, token=token)
    try:
        url = api.create_repo(plan.repo_id, private=plan.private, exist_ok=True, repo_type="model", token=token)
        if plan.private and not getattr(api.repo_info(plan.repo_id, repo_type="model", token=token), "private", True):
            # exist_ok found someone's existing public repo: never publish into it when "private" was asked for.
            raise UserError(f"'{plan.repo_id}' already exists and is public. Choose another name, make it private "
                            "on the Hub, or untick 'private'.")
        api.create_commit(repo_id=plan.repo_id, operations=plan.operations(), token=token, repo_type="model",
                          commit_message=f"Upload LoRA (step {plan.step}) from one-image-lora")
    except hub_errors.HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        if status in (401, 403):
            raise UserError(f"The Hub refused the upload to '{plan.repo_id}' ({status}): the token needs write "
                            "access to that namespace.") from None
        raise UserError(f"Uploading to '{plan.repo_id}' failed (HTTP {status}). Try again later.") from None
    except OSError as err:
        raise UserError(f"Could not reach the Hugging Face Hub to publish: {err}.") from None
    return str(url)
