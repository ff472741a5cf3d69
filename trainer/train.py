"""One training job from start to end: resolve the model, load it, encode, train; every failure an event.

``run_training`` is what both the app's worker thread and the CLI call. It never raises for a problem
the user can act on: those become a ``Failed`` event with a message, and the checkpoints already saved
stay where they are.
"""
from __future__ import annotations

import gc
import logging
import traceback
from typing import Callable, Iterator

import torch

from trainer.data import encode_example, encode_prompts, free_encoders, prepare_image
from trainer.errors import UserError
from trainer.events import Event, Failed, Finished, Started, Status
from trainer.loop import train_lora
from trainer.models import load_parts, resolve_model
from trainer.runs import RunFolder
from trainer.sampling import PreviewRenderer

log = logging.getLogger(__name__)

OOM_ADVICE = ("The GPU ran out of memory. Pick a smaller-memory setup: a lower rank (character-rank4-400), "
              "gradient checkpointing on, or close other programs using the GPU. The checkpoints saved so far are kept.")


def run_training(run: RunFolder, should_stop: Callable[[], bool] = lambda: False,
                 token: str | None = None) -> Iterator[Event]:
    cfg = run.config
    last_step = 0
    parts = example = renderer = prompts = None
    try:
        yield Status(f"Resolving model {cfg.model}")
        folder = resolve_model(cfg.model, token)  # every hub/token/folder problem surfaces here, before the GPU is touched
        run.model_path = str(folder)
        run.set_status("loading")
        yield Status("Loading model")
        parts = load_parts(folder)
        image, mask = run.load_dataset()
        train_image = prepare_image(image, mask if cfg.masked else None, cfg.resolution)
        run.train_size = train_image.size
        yield Status("Encoding the image and prompts (once; cached for the whole run)")
        prompts = encode_prompts(parts, [cfg.training_caption, *cfg.preview_prompts], cfg.max_text_tokens)
        example = encode_example(parts, train_image, cfg.training_caption, prompts, cfg.masked, cfg.background_weight)
        free_encoders(parts)
        gc.collect()
        renderer = PreviewRenderer(parts, prompts)
        run.set_status("running")
        yield Started(run_dir=run.path, total_steps=cfg.steps, checkpoint_steps=tuple(cfg.checkpoint_steps),
                      train_width=train_image.size[0], train_height=train_image.size[1])
        for event in train_lora(parts, example, cfg, run, renderer, should_stop):
            if isinstance(event, Finished):
                run.set_status("stopped" if event.stopped else "finished")
            elif isinstance(event, Failed):
                run.set_status("failed", event.message)
            last_step = getattr(event, "step", last_step)
            yield event
    except UserError as err:
        run.set_status("failed", str(err))
        yield Failed(str(err), "user", last_step)
    except torch.OutOfMemoryError:
        run.set_status("failed", OOM_ADVICE)
        yield Failed(OOM_ADVICE, "out_of_memory", last_step)
    except Exception as err:  # a bug: keep the traceback in the log, give the user a sentence
        log.error("training failed:\n%s", traceback.format_exc())
        message = (f"Training failed unexpectedly ({type(err).__name__}). The checkpoints saved so far are kept; "
                   "the server log has the details.")
        run.set_status("failed", message)
        yield Failed(message, "internal", last_step)
    finally:
        # Give the accelerator back whatever happened, so the next job starts from a clean slate.
        parts = example = renderer = prompts = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
