"""Resolving a model spec to a local diffusers folder: tiny-demo, local folders, Hub ids (offline)."""
from __future__ import annotations

import shutil

import httpx
import pytest

from trainer.errors import UserError
from trainer.model.loading import TINY_DEMO, load_parts, resolve_model


def test_tiny_demo_resolves_to_a_real_diffusers_folder_and_loads():
    folder = resolve_model(TINY_DEMO)
    assert (folder / "model_index.json").is_file()
    for part in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        assert list((folder / part).glob("*.safetensors")), part
    parts = load_parts(folder)
    assert parts.is_tiny_demo and parts.transformer.config.guidance_embeds
    assert not any(p.requires_grad for p in parts.transformer.parameters())


def test_tiny_demo_is_built_in_a_fresh_data_dir(tmp_path, use_runtime):
    use_runtime(data_dir=tmp_path)
    folder = resolve_model(TINY_DEMO)
    assert folder == tmp_path / "models" / "tiny-demo"
    assert resolve_model(TINY_DEMO) == folder  # second call reuses it


def test_local_folder_is_checked(tmp_path):
    good = tmp_path / "my model"  # a space in the path
    shutil.copytree(resolve_model(TINY_DEMO), good)
    assert resolve_model(str(good)) == good.resolve()
    (good / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    (good / "transformer" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(UserError, match="no .safetensors weights.*pickle"):
        resolve_model(str(good))
    with pytest.raises(UserError, match="no model_index.json"):
        resolve_model(str(tmp_path))


def test_garbage_spec_is_explained():
    with pytest.raises(UserError, match="neither an existing folder nor a Hugging Face id"):
        resolve_model("./not/here")


def test_hub_id_offline_and_not_cached_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(UserError, match="can't be reached.*local diffusers folder.*tiny-demo"):
        resolve_model("black-forest-labs/FLUX.1-dev", token=None)


def test_hub_id_resolves_from_the_local_hub_cache_through_snapshot_download(tmp_path, monkeypatch):
    """The real huggingface_hub code path, offline: a cache laid out as the Hub client writes it."""
    repo = tmp_path / "models--someone--tiny-flux"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(resolve_model(TINY_DEMO), repo / "snapshots" / commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    folder = resolve_model("someone/tiny-flux")
    assert folder == repo / "snapshots" / commit
    assert load_parts(folder).transformer is not None


def _hub_error(cls, status):
    response = httpx.Response(status, request=httpx.Request("GET", "https://huggingface.co/api/models/x"))
    return cls("hub said no", response=response)


@pytest.mark.parametrize("token,expected", [
    (None, "gated model: it needs a Hugging Face token.*HF_TOKEN"),
    ("hf_secret_value", "accept the license with the account the token belongs to"),
])
def test_gated_repo_messages(monkeypatch, token, expected):
    """The Hub's answer is simulated (no hub here): the real GatedRepoError class, raised by snapshot_download."""
    import huggingface_hub
    from huggingface_hub import errors

    def gated(*args, **kwargs):
        raise _hub_error(errors.GatedRepoError, 403)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    with pytest.raises(UserError, match=expected) as info:
        resolve_model("black-forest-labs/FLUX.1-dev", token=token)
    assert "hf_secret_value" not in str(info.value)


def test_unknown_repo_message(monkeypatch):
    import huggingface_hub
    from huggingface_hub import errors

    def missing(*args, **kwargs):
        raise _hub_error(errors.RepositoryNotFoundError, 404)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", missing)
    with pytest.raises(UserError, match="No model 'someone/nothing'"):
        resolve_model("someone/nothing")
