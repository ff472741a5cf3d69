"""The one writer of run.json while a job trains: ``RunRecorder`` folds the job's events into its ``RunFolder``.

``trainer.training.job.run_training`` records every event before it yields it, so whatever a reader of the
events has heard of is already in run.json. The recorder is the twin of ``ui.view.RunView``: both fold the same
events, one into the run's record, the other into the page; replaying a job's events into a fresh recorder gives
the run.json the job wrote.

What each event records (the others, Status, Progress and LossHistory, record nothing):

- ``Placed``: the resolved model folder and the memory tier; status "loading".
- ``Started``: the training size, how steps are counted (``schedule``: images, batch, GPUs, epochs, the learning rate
  trained with, every image's size); status "running".
- ``CheckpointSaved``: the checkpoint, with the losses of its steps and its epoch (a resumed job repeats the ones it
  had: no change).
- ``PreviewsRendered``: the previews of that step (step 0: the base model's).
- ``Finished``: status "finished", or "stopped"; ``Failed``: status "failed" and its message.

``write=False`` folds in memory only: the app's side of a multi-GPU job, whose main process records (its copy of
the run folder object follows the same events). The rule of who writes run.json when is in ``trainer.runs.folder``.
"""
from __future__ import annotations

from trainer.events import (CheckpointSaved, Event, Failed, Finished, Placed, PreviewsRendered, Started)
from trainer.runs.folder import RunFolder


class RunRecorder:
    def __init__(self, run: RunFolder, write: bool = True) -> None:
        self.run = run
        self.write = write

    def record(self, event: Event) -> bool:
        """Fold ``event`` into the run; write run.json (atomically) if that changed it. Returns whether it changed.

        A write error (a full disk) is raised to the caller, which turns it into the job's failure."""
        if not isinstance(event, (Placed, Started, CheckpointSaved, PreviewsRendered, Finished, Failed)):
            return False
        run = self.run
        before = run.to_dict()
        if isinstance(event, Placed):
            run.model_path, run.memory_tier = str(event.model_path), event.memory_tier
            run.note_status("loading")
        elif isinstance(event, Started):
            run.train_size = (event.train_width, event.train_height)
            if event.learning_rate:  # an event line from before sets carries no schedule
                run.schedule = {"images": event.images, "batch_size": event.batch_size, "gpus": event.gpus,
                                "steps": event.total_steps, "epochs": round(event.epochs, 4),
                                "learning_rate": event.learning_rate,
                                "train_sizes": [list(size) for size in event.train_sizes]}
            run.note_status("running")
        elif isinstance(event, CheckpointSaved):
            run.note_checkpoint(event.step, event.path, event.losses, event.epoch)
        elif isinstance(event, PreviewsRendered):
            run.note_previews(event.step, [{"path": p.path, "prompt": p.prompt, "seed": p.seed}
                                           for p in event.previews])
        elif isinstance(event, Finished):
            run.note_status("stopped" if event.stopped else "finished")
        elif isinstance(event, Failed):
            run.note_status("failed", event.message)
        changed = run.to_dict() != before
        if changed and self.write:
            run.save()
        return changed
