"""Exposure: 127.0.0.1 by default; all interfaces or share=True only with a password; a patched Gradio.

``app.main`` is called in-process with ``gradio.Blocks.launch`` replaced by a recorder, so nothing listens: the
tests see exactly the arguments the app would launch with, and the exit code when it refuses.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import gradio
import gradio_client
import pytest

from trainer import runtime
from trainer.errors import UserError
from trainer.dataset.images import MAX_FILE_BYTES
from trainer.runtime import Runtime
from ui.launch import PASSWORD_ENV, USER_ENV, exposure

ROOT = Path(__file__).resolve().parent.parent
# Security advisories that matter here: GHSA-j36p-7w88-g82j is fixed in gradio 6.16.0, CVE-2026-28414 in 6.7.0.
MIN_GRADIO = (6, 16, 0)


def version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


@pytest.fixture
def no_auth_env(use_runtime):
    """The app's Runtime read from an environment without a login, a host or a port (only the data folder)."""
    use_runtime({})


@pytest.fixture
def launches(monkeypatch, no_auth_env):
    """Record Blocks.launch calls instead of listening."""
    calls = []

    def fake_launch(self, *args, **kwargs):
        calls.append(kwargs)
        return None

    monkeypatch.setattr(gradio.Blocks, "launch", fake_launch)
    return calls


def test_exposure_rules():
    assert exposure("127.0.0.1", 7860, False, runtime=Runtime()).auth is None
    assert exposure("localhost", 7860, False, runtime=Runtime()).host == "localhost"
    assert exposure("::1", 7860, False, runtime=Runtime()).host == "::1"
    for host, share in (("0.0.0.0", False), ("::", False), ("192.168.1.5", False), ("127.0.0.1", True)):
        with pytest.raises(UserError, match=f"without a password: set {USER_ENV} and {PASSWORD_ENV}"):
            exposure(host, 7860, share, runtime=Runtime())
        with pytest.raises(UserError):  # half a login is no login
            exposure(host, 7860, share, runtime=Runtime(app_username="me"))
    open_ = exposure("0.0.0.0", 7860, True, runtime=Runtime(app_username="me", app_password="s3cret"))
    assert open_.auth == ("me", "s3cret") and open_.share


def test_app_binds_loopback_by_default_with_upload_cap(launches, isolated_data_dir):
    import app

    assert app.main([]) == 0
    (kwargs,) = launches
    assert kwargs["server_name"] == "127.0.0.1"
    assert kwargs["share"] is False and kwargs["auth"] is None
    assert kwargs["max_file_size"] == MAX_FILE_BYTES
    runs = (isolated_data_dir / "runs").resolve()
    assert [Path(p).resolve() for p in kwargs["allowed_paths"]] == [runs]  # only the runs folder is served
    assert not runs.is_relative_to(ROOT)  # job files live outside the working directory


@pytest.mark.parametrize("argv,env", [(["--host", "0.0.0.0"], {}), (["--share"], {}),
                                      ([], {"ONE_IMAGE_LORA_APP_HOST": "0.0.0.0"}),
                                      ([], {"LORA_APP_HOST": "0.0.0.0"}),  # the old name is still read
                                      (["--host", "0.0.0.0"], {USER_ENV: "only-a-user"})])
def test_app_refuses_open_exposure_without_auth(launches, use_runtime, capsys, argv, env):
    import app

    use_runtime(env)
    assert app.main(argv) == 2
    assert launches == []  # it never started listening
    err = capsys.readouterr().err
    assert err.startswith("error: Refusing to listen") and "Traceback" not in err


def test_app_opens_up_only_with_a_password(launches, use_runtime):
    import app

    use_runtime({USER_ENV: "me", PASSWORD_ENV: "s3cret"})
    assert app.main(["--host", "0.0.0.0", "--port", "7999"]) == 0
    (kwargs,) = launches
    assert kwargs["server_name"] == "0.0.0.0" and kwargs["server_port"] == 7999
    assert kwargs["auth"] == ("me", "s3cret")

    launches.clear()  # host and port from the Runtime when not given on the command line
    use_runtime({USER_ENV: "me", PASSWORD_ENV: "s3cret", "ONE_IMAGE_LORA_APP_HOST": "0.0.0.0",
                 "ONE_IMAGE_LORA_APP_PORT": "7998"})
    assert app.main([]) == 0
    (kwargs,) = launches
    assert kwargs["server_name"] == "0.0.0.0" and kwargs["server_port"] == 7998


def test_app_reads_and_logs_its_switches_at_start_up_and_refuses_a_bad_one(launches, monkeypatch, capsys, caplog):
    import app

    for name in [n for n in os.environ if n.startswith(("ONE_IMAGE_LORA_", "LORA_"))]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("ONE_IMAGE_LORA_DATA_DIR", str(runtime.current().data_dir))
    monkeypatch.setenv(PASSWORD_ENV, "s3cret-canary")
    caplog.set_level("INFO", logger="trainer.runtime")
    with runtime.using(None):  # the app reads the environment itself, as it does outside the tests
        assert app.main([]) == 0
        assert runtime.current().app_password == "s3cret-canary"
    (line,) = [r.getMessage() for r in caplog.records if r.name == "trainer.runtime"]
    assert line.startswith("runtime switches: compile=on cuda_graphs=on fp8_matmul=on attention=auto") and "s3cret" not in line

    monkeypatch.setenv("ONE_IMAGE_LORA_ATTENTION", "foo")
    with runtime.using(None):
        assert app.main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ONE_IMAGE_LORA_ATTENTION='foo' is not an attention choice") and "Traceback" not in err


def test_gradio_is_pinned_past_the_file_route_advisories():
    pins = dict(re.findall(r"^(gradio(?:_client)?)==([\w.]+)", (ROOT / "requirements.txt").read_text(), re.M))
    assert version(pins["gradio"]) >= MIN_GRADIO
    assert version(pins["gradio_client"]) >= (2, 6, 0)
    assert version(gradio.__version__) == version(pins["gradio"])  # what is installed is what is pinned
    assert version(gradio_client.__version__) == version(pins["gradio_client"])


def test_app_starts_loading_the_mask_network_at_start_up(launches, isolated_data_dir, monkeypatch):
    # The first upload used to pay for loading the background-removal network (36-108 s on a busy 2-core
    # machine): the app starts loading it in the background before the page is built.
    import app
    from trainer import api

    order = []
    monkeypatch.setattr(api, "warm_up", lambda *a, **k: order.append("warm_up"), raising=False)
    real_build = __import__("ui.app", fromlist=["build_app"]).build_app
    monkeypatch.setattr("ui.app.build_app", lambda *a, **k: order.append("build_app") or real_build(*a, **k))
    assert app.main([]) == 0
    assert order == ["warm_up", "build_app"]
