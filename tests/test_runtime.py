"""trainer.runtime: the process's switches, read from the environment once, one prefix, old names with a notice."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from trainer import runtime
from trainer.errors import UserError
from trainer.runtime import Runtime


def test_defaults_and_every_variable(tmp_path):
    home = Path.home() / ".cache" / "one-image-lora"
    assert Runtime.from_environment({}) == Runtime(data_dir=home) == Runtime()
    rt = Runtime.from_environment({
        "ONE_IMAGE_LORA_COMPILE": "0", "ONE_IMAGE_LORA_CUDA_GRAPHS": "off", "ONE_IMAGE_LORA_ATTENTION": " CuDNN ",
        "ONE_IMAGE_LORA_DATA_DIR": str(tmp_path / "d"), "ONE_IMAGE_LORA_APP_HOST": "0.0.0.0",
        "ONE_IMAGE_LORA_APP_PORT": "7999", "ONE_IMAGE_LORA_APP_USERNAME": "me", "ONE_IMAGE_LORA_APP_PASSWORD": "pw"})
    assert rt == Runtime(compile=False, cuda_graphs=False, attention="cudnn", data_dir=(tmp_path / "d").resolve(),
                         app_host="0.0.0.0", app_port=7999, app_username="me", app_password="pw")
    for value, expected in (("1", True), ("true", True), ("Yes", True), ("on", True), ("", True),
                            ("0", False), ("FALSE", False), ("no", False), ("off", False)):
        assert Runtime.from_environment({"ONE_IMAGE_LORA_COMPILE": value}).compile is expected, value
    assert Runtime.from_environment({"ONE_IMAGE_LORA_ATTENTION": "default"}).attention == "flash"  # its old spelling
    with pytest.raises(dataclasses_frozen()):
        rt.compile = True


def dataclasses_frozen():
    import dataclasses

    return dataclasses.FrozenInstanceError


def test_the_new_name_wins_and_an_old_name_is_read_with_a_notice(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="trainer.runtime")
    old = Runtime.from_environment({"LORA_DATA_DIR": str(tmp_path / "old"), "LORA_APP_HOST": "0.0.0.0",
                                    "LORA_APP_PORT": "7001", "LORA_APP_USERNAME": "me", "LORA_APP_PASSWORD": "pw"})
    assert old == Runtime(data_dir=(tmp_path / "old").resolve(), app_host="0.0.0.0", app_port=7001,
                          app_username="me", app_password="pw")
    notices = [r.getMessage() for r in caplog.records]
    assert len(notices) == 5
    for name in ("DATA_DIR", "APP_HOST", "APP_PORT", "APP_USERNAME", "APP_PASSWORD"):
        assert f"LORA_{name} is read as ONE_IMAGE_LORA_{name}: rename it (the old name will stop working)" in notices
    assert not any("pw" in n or "/old" in n for n in notices)  # names only, never a value

    caplog.clear()
    both = Runtime.from_environment({"LORA_DATA_DIR": str(tmp_path / "old"),
                                     "ONE_IMAGE_LORA_DATA_DIR": str(tmp_path / "new"), "LORA_APP_PORT": "7001"})
    assert both.data_dir == (tmp_path / "new").resolve() and both.app_port == 7001
    assert "LORA_DATA_DIR is ignored: ONE_IMAGE_LORA_DATA_DIR is set and takes its place" in caplog.messages
    caplog.clear()
    Runtime.from_environment({"ONE_IMAGE_LORA_DATA_DIR": str(tmp_path)})
    assert caplog.messages == []  # nothing to say when only new names are used


@pytest.mark.parametrize("name,value,says", [
    ("ONE_IMAGE_LORA_ATTENTION", "foo", "ONE_IMAGE_LORA_ATTENTION='foo' is not an attention choice: use auto"),
    ("ONE_IMAGE_LORA_COMPILE", "maybe", "ONE_IMAGE_LORA_COMPILE='maybe' is not a switch: set it to 1 (on) or 0"),
    ("ONE_IMAGE_LORA_CUDA_GRAPHS", "2", "ONE_IMAGE_LORA_CUDA_GRAPHS='2' is not a switch"),
    ("ONE_IMAGE_LORA_APP_PORT", "http", "ONE_IMAGE_LORA_APP_PORT='http' is not a port number"),
    ("ONE_IMAGE_LORA_APP_PORT", "70000", "ONE_IMAGE_LORA_APP_PORT='70000' is not a port number"),
    ("LORA_APP_PORT", "x", "ONE_IMAGE_LORA_APP_PORT='x' is not a port number"),  # an old name: told the new one
])
def test_an_invalid_value_is_a_sentence_not_a_silent_default(name, value, says):
    with pytest.raises(UserError) as err:
        Runtime.from_environment({name: value})
    assert str(err.value).startswith(says) and str(err.value).endswith(".")


def test_the_password_is_never_in_the_repr_or_the_log(monkeypatch, caplog):
    rt = Runtime(app_username="me", app_password="s3cret-canary")
    assert "s3cret" not in repr(rt) and "s3cret" not in str(rt) and "s3cret" not in rt.describe()
    assert "app_username='me'" in repr(rt) and "login=set" in rt.describe()
    assert "login=none" in Runtime().describe()

    for name in ("ONE_IMAGE_LORA_APP_PASSWORD", "ONE_IMAGE_LORA_APP_USERNAME", "ONE_IMAGE_LORA_ATTENTION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LORA_APP_PASSWORD", "s3cret-canary")  # the old name: a notice, without the value
    monkeypatch.setenv("ONE_IMAGE_LORA_APP_USERNAME", "me")
    caplog.set_level(logging.DEBUG)
    with runtime.using(None):
        first = runtime.current()
        assert first.app_password == "s3cret-canary"
        assert runtime.current() is first  # read once: later calls don't look at the environment again
        monkeypatch.setenv("ONE_IMAGE_LORA_ATTENTION", "flash")
        assert runtime.current() is first and first.attention == "auto"
    assert "s3cret" not in caplog.text
    lines = [m for m in caplog.messages if m.startswith("runtime switches:")]
    assert len(lines) == 1 and "login=set" in lines[0]


def test_the_app_names_the_variables_the_runtime_reads():
    from ui.launch import PASSWORD_ENV, USER_ENV

    assert (USER_ENV, PASSWORD_ENV) == (runtime.PREFIX + "APP_USERNAME", runtime.PREFIX + "APP_PASSWORD")
    assert Runtime.from_environment({USER_ENV: "me", PASSWORD_ENV: "pw"}).app_password == "pw"


def test_using_installs_a_runtime_for_the_block_and_puts_the_previous_one_back():
    before = runtime.current()
    mine = Runtime(attention="flash")
    with runtime.using(mine):
        assert runtime.current() is mine
    assert runtime.current() is before


def test_the_data_dir_comes_from_the_runtime(tmp_path, isolated_data_dir):
    from trainer import paths

    assert paths.data_dir() == isolated_data_dir.resolve() and paths.runs_dir() == isolated_data_dir.resolve() / "runs"
    with runtime.using(Runtime(data_dir=tmp_path)):
        assert paths.data_dir() == tmp_path and paths.tiny_model_dir("tiny-demo") == tmp_path / "models" / "tiny-demo"
    assert paths.data_dir(runtime=Runtime(data_dir=tmp_path / "x")) == tmp_path / "x"
    assert paths.data_dir({"ONE_IMAGE_LORA_DATA_DIR": str(tmp_path / "y")}) == (tmp_path / "y").resolve()
