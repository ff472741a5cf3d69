"""Compare rounds: each round's chosen checkpoint side by side, on the same prompts and seeds, the base model first.

A round's run names the run its candidates came from (``run.json`` ``lineage.parent.run``); following those links
back gives the project's rounds, oldest first. Each round shows its chosen checkpoint: the starred one, else its last.
The grid is an ordinary ``review.grid`` plan whose columns come from several runs, so it renders, streams and composes
as every grid does. The prompts test what growing the dataset is for: the caption, and the views round 1 lacked.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from trainer.errors import UserError
from trainer.families import family_of_spec
from trainer.grow.job import on_plain_background
from trainer.review.advisor import CheckpointFile, checkpoint_files
from trainer.review.grid import BASE_STEP, Column, GridPlan, GridSpec, plan_grid
from trainer.review.prompts import missing_views
from trainer.runs.folder import RunFolder, open_run

MAX_ROUNDS = 6  # a loop is a few rounds; a longer chain of links is most likely a mistake (or a cycle)


def round_number(run: RunFolder) -> int:
    return int(run.lineage.get("round", 1)) if run.lineage else 1


def round_chain(run: RunFolder, open_parent: Callable[[str], RunFolder] = open_run) -> list[RunFolder]:
    """``run`` and the runs it grew from, oldest first. ``open_parent(path)`` opens a parent (the page passes one that
    opens only the owner's own runs); a parent that is gone ends the chain there."""
    chain, seen = [run], {Path(run.path).resolve()}
    while len(chain) < MAX_ROUNDS and chain[-1].lineage.get("parent", {}).get("run"):
        try:
            parent = open_parent(chain[-1].lineage["parent"]["run"])
        except UserError:
            break
        if Path(parent.path).resolve() in seen:
            break
        seen.add(Path(parent.path).resolve())
        chain.append(parent)
    return chain[::-1]


def chosen_checkpoint(run: RunFolder) -> CheckpointFile:
    """The round's starred checkpoint, else its last one still on disk."""
    files = checkpoint_files(run)
    if not files:
        raise UserError(f"The run '{run.path.name}' (round {round_number(run)}) has no checkpoint to compare.")
    return next((f for f in files if f.starred), max(files, key=lambda f: f.step))


def rounds_prompts(first: RunFolder) -> list[str]:
    """The first round's caption (can each round still re-create it?) and the two most extreme views it lacked."""
    from trainer.grow.variations import VIEW_WORDS

    caption = first.config.training_caption
    subject = first.config.trigger.strip() or caption
    return [caption] + [f"{subject}, {VIEW_WORDS[view]}" for view in missing_views(first.captions())[:2]]


def plan_rounds_grid(chain: list[RunFolder], seeds: tuple[int, ...] = (1, 2),
                     sample_steps: int | None = None) -> GridPlan:
    """Columns: the base model, then (a reference-editing family) the base model given round 1's pictures as
    references — what editing alone gives, with no training —, then each round's chosen checkpoint ("round N · step
    S"); rows: seeds; the prompts and render settings of the newest round (all rounds must share its base model)."""
    if len(chain) < 2:
        raise UserError("This run is round 1: there is no other round to compare it with. Grow the dataset from it "
                        "(the Grow tab), train round 2, then compare.")
    newest = chain[-1]
    models = {run.model for run in chain}
    if len(models) > 1:
        raise UserError(f"The rounds were trained on different base models ({', '.join(sorted(models))}); a rounds "
                        "grid compares LoRAs of one base model.")
    plan = plan_grid(newest, GridSpec(prompts=tuple(rounds_prompts(chain[0])), seeds=seeds,
                                      steps=(chosen_checkpoint(newest).step,), sample_steps=sample_steps))
    columns = [Column(BASE_STEP, None)]
    if family_of_spec(newest.model).takes_reference_images:  # can editing alone, with no training, do as well?
        references = tuple(on_plain_background(item) for item in chain[0].load_set())
        columns.append(Column(BASE_STEP, None, name="no training (reference edit)", references=references))
    for run in chain:
        chosen = chosen_checkpoint(run)
        columns.append(Column(chosen.step, chosen.path, name=f"round {round_number(run)} · step {chosen.step}"))
    return GridPlan(run=newest, prompts=plan.prompts, columns=tuple(columns), rows=plan.rows, settings=plan.settings)
