"""A run on disk: its folder and run.json (``folder``), the one writer of run.json during a job (``recorder``), the
training-state files (``state``) and the folder's lifecycle: lock, interrupted, resume (``lifecycle``)."""
