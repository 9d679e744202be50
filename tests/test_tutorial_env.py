"""The tutorials' environment switches (``pyro_linconstr._tutorial``): one rule everywhere."""

import re
from pathlib import Path

import pytest

from pyro_linconstr._tutorial import env_flag, env_int, env_subset, output_dir, smoke_mode

TUTORIALS = sorted((Path(__file__).resolve().parents[1] / "tutorials").glob("*.py"))


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "True", "yes", "Yes", "on", "ON", " 1 "])
def test_smoke_values(value):
    assert smoke_mode({"PLC_SMOKE": value}) is True


@pytest.mark.parametrize("value", ["0", "false", "FALSE", "no", "No", "off", "Off", "", "  "])
def test_full_values(value):
    assert smoke_mode({"PLC_SMOKE": value}) is False


def test_unset_is_full_mode():
    assert smoke_mode({}) is False


def test_reads_os_environ_by_default(monkeypatch):
    monkeypatch.setenv("PLC_SMOKE", "true")
    assert smoke_mode() is True
    monkeypatch.delenv("PLC_SMOKE")
    assert smoke_mode() is False


@pytest.mark.parametrize("value", ["2", "-1", "y", "t", "smoke", "full", "1.0", "true!", "none"])
def test_other_values_are_an_error_naming_the_variable(value):
    with pytest.raises(ValueError, match="PLC_SMOKE") as err:
        smoke_mode({"PLC_SMOKE": value})
    for accepted in ("1", "true", "yes", "on", "0", "false", "no", "off", "unset"):
        assert accepted in str(err.value)


def test_env_flag_default_and_values():
    assert env_flag("PLC_VERBOSE", environ={}) is False
    assert env_flag("PLC_VERBOSE", default=True, environ={"PLC_VERBOSE": ""}) is True
    assert env_flag("PLC_VERBOSE", default=True, environ={"PLC_VERBOSE": "off"}) is False
    assert env_flag("PLC_VERBOSE", environ={"PLC_VERBOSE": "On"}) is True
    with pytest.raises(ValueError, match="PLC_VERBOSE"):
        env_flag("PLC_VERBOSE", environ={"PLC_VERBOSE": "loud"})


def test_env_int():
    assert env_int("PLC_WORKERS", 2, minimum=1, environ={}) == 2
    assert env_int("PLC_WORKERS", 2, minimum=1, environ={"PLC_WORKERS": ""}) == 2
    assert env_int("PLC_WORKERS", 2, minimum=1, environ={"PLC_WORKERS": "3"}) == 3
    assert env_int("PLC_MOF_FIRST_SPLIT", 0, environ={"PLC_MOF_FIRST_SPLIT": "0"}) == 0
    for bad in ("0", "-2", "two", "1.5"):
        with pytest.raises(ValueError, match="PLC_WORKERS.*>= 1"):
            env_int("PLC_WORKERS", 2, minimum=1, environ={"PLC_WORKERS": bad})


def test_env_subset():
    choices = ["nn", "kkt", "likelihood"]
    assert env_subset("PLC_CHEM_METHODS", choices, {}) == choices
    assert env_subset("PLC_CHEM_METHODS", choices, {"PLC_CHEM_METHODS": "likelihood,nn"}) == [
        "nn",
        "likelihood",
    ]
    with pytest.raises(ValueError, match="PLC_CHEM_METHODS.*kktt"):
        env_subset("PLC_CHEM_METHODS", choices, {"PLC_CHEM_METHODS": "kktt"})
    # a default subset when unset; the variable still overrides it
    assert env_subset("PLC_CHEM_METHODS", choices, {}, default=["likelihood", "nn"]) == [
        "nn",
        "likelihood",
    ]
    assert env_subset("PLC_CHEM_METHODS", choices, {"PLC_CHEM_METHODS": "kkt"}, default=["nn"]) == [
        "kkt"
    ]
    with pytest.raises(ValueError, match="PLC_CHEM_METHODS.*kktt"):
        env_subset("PLC_CHEM_METHODS", choices, {}, default=["kktt"])


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.name)
def test_tutorials_parse_the_environment_only_through_the_module(path):
    """No tutorial reads PLC_SMOKE (or a count or switch) with its own rule."""
    source = path.read_text()
    assert "smoke_mode()" in source
    assert "pyro_linconstr._tutorial" in source
    # os.environ / os.getenv may only be used for free-form strings (PLC_TAG)
    for match in re.finditer(r"os\.(?:environ(?:\.get)?|getenv)\W+[\"'](\w+)", source):
        assert match.group(1) == "PLC_TAG", f"{path.name} parses {match.group(1)} ad hoc"


def test_output_dir_sits_beside_the_script_or_in_the_working_directory(tmp_path, monkeypatch):
    script = tmp_path / "tutorials" / "demo.py"
    script.parent.mkdir()
    out = output_dir(str(script))
    assert out == script.parent / "output" and out.is_dir()
    assert output_dir(str(script)) == out  # a second call finds it
    monkeypatch.chdir(tmp_path)
    interactive = output_dir(None)  # no __file__: a notebook or a console
    assert interactive == Path("output") and (tmp_path / "output").is_dir()


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.name)
def test_tutorials_write_to_one_output_folder(path):
    """Every tutorial writes into tutorials/output/ through the one helper."""
    source = path.read_text()
    assert 'OUT = output_dir(globals().get("__file__"))' in source
    assert "__file__" not in source.replace('globals().get("__file__")', "")
