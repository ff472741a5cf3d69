"""The process's switches, read from the environment once: ``current()`` returns them as a frozen ``Runtime``.

Every variable has the prefix ``ONE_IMAGE_LORA_``:

- ``ONE_IMAGE_LORA_COMPILE`` (1 | 0, default 1): compile the transformer blocks on a CUDA GPU (0: debugging, or a
  GPU where compiling misbehaves).
- ``ONE_IMAGE_LORA_CUDA_GRAPHS`` (1 | 0, default 1): replay the training step and the preview forward from CUDA
  graphs.
- ``ONE_IMAGE_LORA_FP8_MATMUL`` (1 | 0, default 1): let a memory tier with ``matmul = "fp8"`` multiply the frozen base
  in fp8 on a GPU with fp8 tensor cores (``trainer.model.fp8_matmul``); 0 keeps every matmul in bf16 (to compare, or
  where a driver misbehaves).
- ``ONE_IMAGE_LORA_ATTENTION`` (auto | cudnn | flash, default auto): ``auto`` puts cuDNN's attention first where
  its self-test passes, ``cudnn`` skips the test, ``flash`` keeps PyTorch's own choice.
- ``ONE_IMAGE_LORA_MASK_MODEL`` (auto | u2net | u2netp | birefnet-general | isnet-anime, default auto): the
  automatic mask's network when none is chosen. ``auto`` is u2net when its file is on the machine with the right md5
  (``scripts/fetch_offline_mask_model.py`` installs it), else u2netp; the tests set u2netp, which is 5x faster.
- ``ONE_IMAGE_LORA_DATA_DIR``: where runs, the tiny demo model and caches live (default: a Space's ``/data``
  volume when there is one, else ``~/.cache/one-image-lora``).
- ``ONE_IMAGE_LORA_APP_HOST``, ``ONE_IMAGE_LORA_APP_PORT`` (default 127.0.0.1:7860),
  ``ONE_IMAGE_LORA_APP_USERNAME``, ``ONE_IMAGE_LORA_APP_PASSWORD``: how ``app.py`` listens, and its login.

The older names ``LORA_DATA_DIR``, ``LORA_APP_HOST``, ``LORA_APP_PORT``, ``LORA_APP_USERNAME`` and
``LORA_APP_PASSWORD`` are still read where the new name is not set, each with a one-line notice naming the new one.
An invalid value is a ``UserError`` at start-up (``app.py`` and the CLI call ``current()`` first), not a silent
default. Nothing reads these variables at call time any more: worker threads ask ``current()`` (or are handed a
``Runtime``), so a job sees the switches the process started with. Child processes (torchrun's ranks, the cuDNN
self-test) inherit the environment and so read the same switches.

Tests install their own with ``using(runtime)`` (tests/conftest.py does it for every test).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Literal

from trainer.errors import UserError

log = logging.getLogger(__name__)

PREFIX = "ONE_IMAGE_LORA_"
SPACE_VOLUME = Path("/data")  # a Hugging Face Space's persistent storage, when the owner has enabled it
ATTENTION_CHOICES = ("auto", "cudnn", "flash")
# trainer.dataset.masking.MASK_MODELS plus "auto" (written out: importing the masking package here would load cv2 and
# rembg's session table into every process that only reads a switch; a test keeps the two lists equal)
MASK_MODEL_CHOICES = ("auto", "u2netp", "birefnet-general", "isnet-anime", "u2net")
_ON, _OFF = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
# new name -> the name it had before every variable took the one prefix
OLD_NAMES = {f"{PREFIX}DATA_DIR": "LORA_DATA_DIR", f"{PREFIX}APP_HOST": "LORA_APP_HOST",
             f"{PREFIX}APP_PORT": "LORA_APP_PORT", f"{PREFIX}APP_USERNAME": "LORA_APP_USERNAME",
             f"{PREFIX}APP_PASSWORD": "LORA_APP_PASSWORD"}

Attention = Literal["auto", "cudnn", "flash"]


def default_data_dir(environ: Mapping[str, str], space_volume: Path = SPACE_VOLUME) -> Path:
    """Without ``ONE_IMAGE_LORA_DATA_DIR``: a Space's persistent volume when it exists and is writable, else the
    user's cache folder (never the working directory: Gradio serves files from there)."""
    if environ.get("SPACE_ID") and space_volume.is_dir() and os.access(space_volume, os.W_OK):
        return space_volume / "one-image-lora"
    return Path.home() / ".cache" / "one-image-lora"


@dataclasses.dataclass(frozen=True)
class Runtime:
    """The switches of this process (see the module docstring for the variables). The password is never in the
    repr, nor in the log."""
    compile: bool = True
    cuda_graphs: bool = True
    fp8_matmul: bool = True
    attention: Attention = "auto"
    mask_model: str = "auto"
    data_dir: Path = dataclasses.field(default_factory=lambda: default_data_dir({}))
    app_host: str = "127.0.0.1"
    app_port: int = 7860
    app_username: str = ""
    app_password: str = dataclasses.field(default="", repr=False)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ, *,
                         space_volume: Path = SPACE_VOLUME) -> "Runtime":
        """Read every switch from ``environ``; ``UserError`` (one sentence naming the variable) on a bad value."""
        def get(suffix: str) -> str | None:
            name = PREFIX + suffix
            value = environ.get(name)
            old = OLD_NAMES.get(name)
            if old is not None and environ.get(old) not in (None, ""):
                if value in (None, ""):
                    log.warning("%s is read as %s: rename it (the old name will stop working)", old, name)
                    return environ[old]
                log.warning("%s is ignored: %s is set and takes its place", old, name)
            return value if value not in (None, "") else None

        def switch(suffix: str) -> bool:
            value = get(suffix)
            if value is None:
                return True
            if value.strip().lower() in _ON:
                return True
            if value.strip().lower() in _OFF:
                return False
            raise UserError(f"{PREFIX}{suffix}={value!r} is not a switch: set it to 1 (on) or 0 (off), or leave it "
                            "unset (on).")

        attention = (get("ATTENTION") or "auto").strip().lower()
        if attention == "default":  # the name it was documented under before "flash"
            attention = "flash"
        if attention not in ATTENTION_CHOICES:
            raise UserError(f"{PREFIX}ATTENTION={attention!r} is not an attention choice: use auto (cuDNN where its "
                            "self-test passes), cudnn or flash, or leave it unset (auto).")
        mask_model = (get("MASK_MODEL") or "auto").strip()
        if mask_model not in MASK_MODEL_CHOICES:
            raise UserError(f"{PREFIX}MASK_MODEL={mask_model!r} is not a background-removal model: use one of "
                            f"{', '.join(MASK_MODEL_CHOICES)}, or leave it unset (auto: u2net when installed, else "
                            "u2netp).")
        port_text = get("APP_PORT")
        try:
            port = int(port_text) if port_text is not None else 7860
            if not 0 < port < 65536:
                raise ValueError
        except ValueError:
            raise UserError(f"{PREFIX}APP_PORT={port_text!r} is not a port number: use a whole number from 1 to "
                            "65535, or leave it unset (7860).") from None
        explicit = get("DATA_DIR")
        data = Path(explicit).expanduser().resolve() if explicit else default_data_dir(environ, space_volume)
        return cls(compile=switch("COMPILE"), cuda_graphs=switch("CUDA_GRAPHS"), fp8_matmul=switch("FP8_MATMUL"),
                   attention=attention,
                   mask_model=mask_model, data_dir=data, app_host=get("APP_HOST") or "127.0.0.1", app_port=port,
                   app_username=get("APP_USERNAME") or "", app_password=get("APP_PASSWORD") or "")

    def describe(self) -> str:
        """One line for the log: every switch, and only whether a login is set (never the password)."""
        on = {True: "on", False: "off"}
        login = "set" if self.app_username and self.app_password else "none"
        return (f"compile={on[self.compile]} cuda_graphs={on[self.cuda_graphs]} fp8_matmul={on[self.fp8_matmul]} "
                f"attention={self.attention} "
                f"data_dir={self.data_dir} app={self.app_host}:{self.app_port} login={login}")


_current: Runtime | None = None
_lock = threading.Lock()


def current() -> Runtime:
    """The process's ``Runtime``: read from the environment (and logged) the first time, the same object after."""
    global _current
    runtime = _current
    if runtime is None:
        with _lock:
            if _current is None:
                _current = Runtime.from_environment(os.environ)
                log.info("runtime switches: %s", _current.describe())
            runtime = _current
    return runtime


current_runtime = current  # the name trainer.api gives it


@contextlib.contextmanager
def using(runtime: Runtime | None) -> Iterator[Runtime | None]:
    """Make ``runtime`` the process's ``Runtime`` inside the block (tests); ``None``: the next ``current()`` reads
    the environment again. Process-wide, not per thread: worker threads started inside the block see it too, as
    they would see the real one. The previous one is back after the block."""
    global _current
    with _lock:
        previous, _current = _current, runtime
    try:
        yield runtime
    finally:
        with _lock:
            _current = previous
