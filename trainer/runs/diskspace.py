"""Free-space checks: refuse a run the disk can't hold, and stop cleanly before a save that won't fit.

Peers lost their last checkpoint to a full disk (docs/RELIABILITY.md point 4). Before a run starts, the expected size of
every checkpoint still to come plus its training state (LoRA in fp32 and AdamW's two moments) and its
previews is compared with the free space; before each save, the size of that one save is. A check that
fails raises ``DiskFullError`` (a ``UserError``): the run ends with a message, nothing half-written, and
the checkpoints already saved are untouched. ``RESERVE_BYTES`` is always left free so ``run.json`` and the
rest of the system can still be written.
"""
from __future__ import annotations

import errno
import shutil
from pathlib import Path

from trainer.errors import UserError

RESERVE_BYTES = 64 * 1024 * 1024
STATE_OVERHEAD_BYTES = 256 * 1024  # RNG states, safetensors header, the JSON next to it
DISK_FULL_ERRNOS = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


class DiskFullError(UserError):
    """Not enough free space for what is about to be written."""


def free_bytes(path: Path) -> int:
    """Free bytes on the file system holding ``path`` (or its nearest existing parent)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def save_bytes(lora_values: int, save_bytes_per_value: int, preview_bytes: int = 0) -> int:
    """One checkpoint: the LoRA as saved, the training state (3 fp32 copies: weights, exp_avg, exp_avg_sq)."""
    return lora_values * save_bytes_per_value + lora_values * 4 * 3 + STATE_OVERHEAD_BYTES + preview_bytes


def preview_bytes(resolution: int, n_prompts: int) -> int:
    """An upper bound for one checkpoint's preview PNGs (uncompressed RGB)."""
    return resolution * resolution * 3 * n_prompts


def check_before_start(folder: Path, per_checkpoint: int, checkpoints: int) -> None:
    needed = per_checkpoint * checkpoints
    free = free_bytes(folder)
    if free - RESERVE_BYTES < needed:
        raise DiskFullError(
            f"Not enough free disk space for this run: its {checkpoints} checkpoint(s) with their training state "
            f"need about {_size(needed)}, and {_size(max(0, free))} is free (with {_size(RESERVE_BYTES)} kept in "
            "reserve). Free some space, or save checkpoints less often (a larger 'save every').")


def check_before_save(folder: Path, needed: int, step: int) -> None:
    free = free_bytes(folder)
    if free - RESERVE_BYTES < needed:
        raise DiskFullError(disk_full_message(step, needed, free))


def disk_full_message(step: int, needed: int | None = None, free: int | None = None) -> str:
    amounts = f" (it needs about {_size(needed)}, {_size(max(0, free))} is free)" if needed is not None else ""
    return (f"The disk is full: the checkpoint at step {step} could not be saved{amounts}. Training stopped; the "
            "checkpoints saved before it are intact. Free some space, then resume the run.")


def is_disk_full(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS


def _size(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.1f} GB"
    return f"{n / 1e6:.1f} MB"


# ---- Gradio's upload folder ---------------------------------------------------------------------------------

def sweep_empty_temp_files(folder: Path, older_than_s: float = 3600) -> int:
    """Remove the empty ``tmp*`` files Gradio leaves behind in its upload folder; returns how many.

    ``gr.File(type="filepath")`` creates an empty ``NamedTemporaryFile(delete=False)`` on every call and never
    removes it (gradio 6.x, ``components/file.py``), and ``delete_cache`` doesn't know about it: one stray file
    per upload, forever. Only empty files directly in the folder, older than ``older_than_s``, are touched.
    """
    import time

    folder = Path(folder)
    removed = 0
    if not folder.is_dir():
        return 0
    cutoff = time.time() - older_than_s
    for path in folder.glob("tmp*"):
        try:
            st = path.lstat()
            if path.is_file() and not path.is_symlink() and st.st_size == 0 and st.st_mtime <= cutoff:
                path.unlink()
                removed += 1
        except OSError:
            continue
    return removed


_sweeper_started = False


def start_temp_sweeper(folder: Path, every_s: float = 600, older_than_s: float = 3600) -> None:
    """Sweep ``folder`` every ``every_s`` seconds on a daemon thread (once per process)."""
    global _sweeper_started
    if _sweeper_started:
        return
    _sweeper_started = True
    import threading
    import time

    def loop() -> None:
        while True:
            time.sleep(every_s)
            sweep_empty_temp_files(folder, older_than_s)

    threading.Thread(target=loop, name="gradio-temp-sweeper", daemon=True).start()
