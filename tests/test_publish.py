"""Publishing, tested offline two ways:

* the plan: exactly which files would be uploaded, the model card, and that no token is in any of them;
* the real ``huggingface_hub`` code path (``HfApi.create_repo``, ``repo_info``, ``create_commit``: YAML
  validation, pre-upload, the NDJSON commit) against a local fake Hub endpoint on 127.0.0.1 that records every
  request and the files committed. Nothing reaches the real Hub: the endpoint is the local server.
"""
from __future__ import annotations

import base64
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import safetensors.torch
import yaml

from trainer.review.advisor import set_star
from trainer.config import TrainingConfig
from trainer.errors import UserError
from trainer.review.publish import ADVICE_FILE, plan_publish, publish, recommended
from trainer.runs.folder import RunFolder

sys.path.insert(0, str(Path(__file__).parent))
from conftest import subject_image  # noqa: E402

TOKEN = "hf_" + "T" * 34


def _lora_file(path: Path) -> None:
    import torch

    state = {}
    for block, module in (("transformer_blocks.0", "attn.to_q"), ("transformer_blocks.0", "attn.to_k"),
                          ("transformer_blocks.0", "attn.to_v"), ("single_transformer_blocks.0", "proj_out")):
        state[f"transformer.{block}.{module}.lora_A.weight"] = torch.randn(4, 16)
        state[f"transformer.{block}.{module}.lora_B.weight"] = torch.randn(16, 4)
    safetensors.torch.save_file(state, path, metadata={"format": "pt", "step": "1"})


def _run(tmp_path: Path, model="black-forest-labs/FLUX.1-dev") -> RunFolder:
    image, mask = subject_image()
    cfg = TrainingConfig(caption="a photo of [trigger] with red hair", trigger="ohwx", model=model, rank=4,
                         steps=500, save_every=250)
    run = RunFolder.create_at(tmp_path / "run", cfg, image, mask)
    run.model, run.train_size = model, (512, 640)
    for step in (250, 500):
        _lora_file(run.checkpoint_path(step))
        run.record_checkpoint(step, run.checkpoint_path(step))
        preview = run.preview_path(step, 0)
        preview.parent.mkdir(parents=True, exist_ok=True)
        image.save(preview)
        run.record_previews(step, [{"path": preview, "prompt": cfg.training_caption, "seed": 1}])
    run.set_status("finished")
    return run


# ---------------------------------------------------------------- the plan

def test_plan_lists_the_files_and_the_card(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    run = _run(tmp_path)
    grid = tmp_path / "grid.png"
    subject_image()[0].save(grid)
    plan = plan_publish(run, "alice/ohwx-lora", grid=grid)
    assert plan.private is True  # private by default
    assert (plan.step, plan.weight) == (500, 1.0)  # no star, no advice: the last checkpoint
    assert sorted(plan.files) == ["README.md", "comfyui/ohwx-lora-comfyui.safetensors", "images/grid.png",
                                  "images/sample-0.png", "ohwx-lora.safetensors"]
    diffusers_keys = safetensors.torch.load(plan.files["ohwx-lora.safetensors"])
    assert all(k.startswith("transformer.") for k in diffusers_keys)
    kohya_keys = safetensors.torch.load(plan.files["comfyui/ohwx-lora-comfyui.safetensors"])
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in kohya_keys
    for data in plan.files.values():
        assert TOKEN.encode() not in data

    card = plan.card
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == "black-forest-labs/FLUX.1-dev"
    assert front["instance_prompt"] == "ohwx"
    assert front["license_name"] == "flux-1-dev-non-commercial-license"
    assert {"flux", "lora", "diffusers"} <= set(front["tags"])
    assert front["widget"][0]["output"]["url"] == "images/sample-0.png"
    assert "**Trigger word:** `ohwx`" in card
    assert "step 500, at LoRA weight **1**" in card
    assert "![checkpoint grid](images/grid.png)" in card
    assert "| rank / alpha | 4 / 4 |" in card and "| learning rate |" in card
    assert 'weight_name="ohwx-lora.safetensors"' in card


def test_recommendation_prefers_the_star_then_the_advice(tmp_path):
    run = _run(tmp_path)
    (run.path / ADVICE_FILE).write_text(json.dumps({"step": 250, "weight": 0.7, "scores": []}))
    assert recommended(run)[:2] == (250, 0.7)
    plan = plan_publish(run, "alice/x")
    assert (plan.step, plan.weight) == (250, 0.7) and "heuristic" in plan.card
    set_star(run.path, 500)
    assert recommended(run)[:2] == (500, 1.0)
    assert plan_publish(run, "alice/x", step=250, weight=0.5).weight == 0.5


def test_plan_errors(tmp_path):
    run = _run(tmp_path, model="tiny-demo")
    with pytest.raises(UserError, match="repo id"):
        plan_publish(run, "no-namespace")
    with pytest.raises(UserError, match="step 300"):
        plan_publish(run, "alice/x", step=300)
    front = yaml.safe_load(plan_publish(run, "alice/x").card.split("---")[1])
    assert "base_model" not in front and "license" not in front  # tiny-demo is not a Hub model
    with pytest.raises(UserError, match="token"):
        publish(plan_publish(run, "alice/x"), token=None)


# ---------------------------------------------------------------- the real client against a local fake Hub

class FakeHub:
    """Just enough of the Hub's HTTP API for create_repo / repo_info / create_commit with regular uploads."""

    def __init__(self, public_repos=()):
        self.requests: list[tuple[str, str, dict]] = []
        self.repos: dict[str, dict] = {r: {"private": False, "files": {}} for r in public_repos}
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                hub.requests.append(("GET", self.path, dict(self.headers)))
                repo = self.path.split("?")[0].removeprefix("/api/models/").split("/revision/")[0]
                if repo in hub.repos:
                    return self._reply(200, {"id": repo, "private": hub.repos[repo]["private"], "sha": "0" * 40})
                self._reply(404, {"error": "Repository not found"})

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                hub.requests.append(("POST", self.path, dict(self.headers)))
                path = self.path.split("?")[0]
                if path == "/api/repos/create":
                    payload = json.loads(body)
                    repo = f"{payload['organization'] or 'me'}/{payload['name']}"
                    if repo in hub.repos:
                        return self._reply(409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo}"})
                    hub.repos[repo] = {"private": payload.get("visibility") == "private", "files": {}}
                    return self._reply(200, {"url": f"{hub.url}/{repo}", "name": repo})
                if path == "/api/validate-yaml":
                    return self._reply(200, {"errors": [], "warnings": []})
                if path.endswith("/preupload/main"):
                    files = json.loads(body)["files"]
                    return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                        "shouldIgnore": False} for f in files]})
                if path.endswith("/commit/main"):
                    repo = path.removeprefix("/api/models/").removesuffix("/commit/main")
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item["key"] == "file":
                            value = item["value"]
                            hub.repos[repo]["files"][value["path"]] = base64.b64decode(value["content"])
                    return self._reply(200, {"commitUrl": f"{hub.url}/{repo}/commit/1",
                                             "commitOid": "1" * 40, "pullRequestUrl": None})
                self._reply(404, {"error": f"unexpected {path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_hub(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the tests' offline guard, lifted for 127.0.0.1 only
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    hubs = []

    def make(**kwargs):
        hub = FakeHub(**kwargs)
        hubs.append(hub)
        return hub

    yield make
    for hub in hubs:
        hub.close()


def test_publish_through_huggingface_hub_to_a_local_endpoint(tmp_path, fake_hub):
    hub = fake_hub()
    run = _run(tmp_path)
    plan = plan_publish(run, "alice/ohwx-lora")
    url = publish(plan, token=TOKEN, endpoint=hub.url)
    assert "alice/ohwx-lora" in url
    repo = hub.repos["alice/ohwx-lora"]
    assert repo["private"] is True
    assert repo["files"] == plan.files  # byte for byte what the plan listed
    assert all(r[1].startswith("/api/") for r in hub.requests)
    assert all(r[2].get("authorization") == f"Bearer {TOKEN}" or r[2].get("Authorization") == f"Bearer {TOKEN}"
               for r in hub.requests)  # the user's own token, sent as auth only
    assert all(TOKEN.encode() not in data for data in repo["files"].values())


def test_publish_refuses_an_existing_public_repo_when_private_was_asked(tmp_path, fake_hub):
    hub = fake_hub(public_repos=("alice/taken",))
    run = _run(tmp_path)
    with pytest.raises(UserError, match="already exists and is public"):
        publish(plan_publish(run, "alice/taken"), token=TOKEN, endpoint=hub.url)
    assert hub.repos["alice/taken"]["files"] == {}
    assert not any("/commit/" in r[1] for r in hub.requests)
