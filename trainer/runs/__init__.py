"""A run on disk: its folder, run.json, the training-state files and the folder's lifecycle (lock, interrupted,
resume)."""
