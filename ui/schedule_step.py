"""Step 4's length and batch: epochs beside steps (either one editable), batch size, and the √(images per step)
learning-rate rule, in words, whenever batch size or GPUs change the rate.

Steps stay the run's setting (checkpoints are named by step); epochs are steps counted in this set's images
(``api.epochs_at_step`` / ``api.steps_for_epochs``: the trainer's own arithmetic).
"""
from __future__ import annotations

import gradio as gr

from trainer import api
from trainer.errors import UserError

BATCH_INFO = ("1 is best (the default): each image gets its own update, where a larger batch averages them; a larger "
              "batch only goes through a set's epochs in fewer, slower steps, on more memory")
EPOCHS_INFO = "Each image seen once = 1 epoch. Edit either: the other follows for this set, batch size and GPUs"


def set_size(image_set) -> int:
    return max(1, getattr(image_set, "size", 0) or 0)


def _whole(value, default: int = 1) -> int:
    try:
        return max(1, int(value)) if value is not None else default
    except (TypeError, ValueError):
        return default


def epochs_of(steps, image_set, batch, gpus) -> float | None:
    try:
        shown = round(api.epochs_at_step(int(steps), set_size(image_set), _whole(batch), _whole(gpus)), 2)
    except (TypeError, ValueError):
        return None
    return int(shown) if shown == int(shown) else shown  # "2", not "2.0", in the box


def on_steps_change(steps, epochs, image_set, batch, gpus):
    """Steps (or the set, batch or GPUs) changed: the epochs box follows (left as it is when it already agrees)."""
    shown = epochs_of(steps, image_set, batch, gpus)
    if shown is None or (epochs is not None and abs(float(epochs) - shown) < 0.005):
        return gr.skip()
    return shown


def on_epochs_change(epochs, steps, image_set, batch, gpus):
    """The epochs box was edited: steps follow (rounded up, so the last epoch is never cut short)."""
    try:
        wanted = float(epochs)
    except (TypeError, ValueError):
        return gr.skip()
    if wanted <= 0 or epochs_of(steps, image_set, batch, gpus) == round(wanted, 2):
        return gr.skip()  # the echo of on_steps_change, or nothing usable
    return api.steps_for_epochs(wanted, set_size(image_set), _whole(batch), _whole(gpus))


def schedule_note(steps, save_every, image_set, batch, gpus, learning_rate) -> str:
    """Images per step, the steps as epochs of this set, the checkpoints' epochs, and the learning rate trained with."""
    try:
        n_steps, every = int(steps), int(save_every)
        lr = float(learning_rate)
        checkpoints = api.TrainingConfig(steps=n_steps, save_every=every).checkpoint_steps
    except (TypeError, ValueError, UserError) as err:
        return f"❌ {err}"
    images, b, g = set_size(image_set), _whole(batch), _whole(gpus)
    per_step = api.samples_per_step(b, g)
    where = f"batch {b}" + (f" on each of {g} GPUs" if g > 1 else "")
    lines = [f"**{images} image{'s' if images > 1 else ''}**, {where}: {per_step} image{'s' if per_step > 1 else ''} "
             f"per step, so {n_steps} steps = **{api.epochs_at_step(n_steps, images, b, g):.2f} epochs**."]
    if images > 1 or per_step > 1:
        shown = ", ".join(f"step {s} (epoch {api.epochs_at_step(s, images, b, g):.2f})" for s in checkpoints[:8])
        lines.append(f"Checkpoints are named by step: {shown}{' …' if len(checkpoints) > 8 else ''}.")
    note = api.learning_rate_note(lr, b, g)
    lines.append(f"Learning rate: {note}." if note else
                 f"Learning rate {lr:g} as set (1 image per step: the √(images per step) rule leaves it as it is).")
    return "  \n".join(lines)


def connect(steps, epochs, batch_size, gpus, set_state, save_every, learning_rate, note) -> dict:
    """Keep epochs and steps in step, and the note current. Returns the ``.then`` kwargs a change to the set runs."""
    inputs = [set_state, batch_size, gpus]
    steps.change(on_steps_change, [steps, epochs, *inputs], epochs, api_name=False)
    # .input, not .change: only the user's own edit of the epochs moves the steps. With .change, typing "40" in Steps
    # sent epochs 4 then 40, and the late echo of the 4 set the steps back to 4 (a browser test caught it).
    epochs.input(on_epochs_change, [epochs, steps, *inputs], steps, api_name=False)
    for box in (batch_size, gpus):
        box.change(on_steps_change, [steps, epochs, *inputs], epochs, api_name=False)
    note_inputs = [steps, save_every, *inputs, learning_rate]
    for box in (steps, save_every, batch_size, gpus, learning_rate):
        box.change(schedule_note, note_inputs, note, api_name=False)

    def follow_set(steps_, epochs_, images, batch, gpus_, every, lr):
        return on_steps_change(steps_, epochs_, images, batch, gpus_), schedule_note(steps_, every, images, batch,
                                                                                     gpus_, lr)
    return dict(fn=follow_set, inputs=[steps, epochs, *inputs, save_every, learning_rate], outputs=[epochs, note],
                api_name=False)
