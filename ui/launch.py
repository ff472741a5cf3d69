"""How the app is exposed: loopback by default; any wider exposure only with a password.

Listening on all interfaces (Docker, a rented GPU) or ``share=True`` without authentication would put
the GPU and every upload in the hands of anyone who finds the port, so the app refuses to start that way.
"""
from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from trainer import api
from trainer.errors import UserError

LOOPBACK = ("127.0.0.1", "localhost", "::1")
# the login's variables, read by trainer/runtime.py into Runtime.app_username / app_password
USER_ENV, PASSWORD_ENV = "ONE_IMAGE_LORA_APP_USERNAME", "ONE_IMAGE_LORA_APP_PASSWORD"


@dataclass(frozen=True)
class Exposure:
    host: str
    port: int
    share: bool
    auth: tuple[str, str] | None


def exposure(host: str, port: int, share: bool, runtime: "api.Runtime | None" = None) -> Exposure:
    """How to listen, with the login from ``runtime`` (default: the process's); ``UserError`` if that is unsafe."""
    runtime = runtime or api.current_runtime()
    user, password = runtime.app_username, runtime.app_password
    auth = (user, password) if user and password else None
    if (host not in LOOPBACK or share) and auth is None:
        where = "a public share link" if share else f"all interfaces ({host})"
        raise UserError(f"Refusing to listen on {where} without a password: set {USER_ENV} and {PASSWORD_ENV} "
                        "(or keep the default 127.0.0.1 and reach it through an SSH tunnel).")
    return Exposure(host=host, port=port, share=share, auth=auth)


def state_secret(data_dir: Path) -> str:
    """A per-installation secret that encrypts the browser-stored owner id (kept across server restarts)."""
    path = data_dir / "browser_state_secret"
    if path.is_file():
        return path.read_text().strip()
    data_dir.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret)
    return secret
