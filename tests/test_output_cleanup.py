"""A run whose --verify pass fails or is interrupted leaves no output behind (CLI.md), and extract
refuses a --report it could not write before it writes the network."""

from __future__ import annotations

import pytest

from lytools.cli import main
from lytools.errors import LytoolsError
from tests.shared import SMALL_MODULES, small_models

MODULES = SMALL_MODULES


@pytest.fixture
def models(tmp_path):
    return small_models(tmp_path)


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def _fail(*args, **kwargs):
    raise LytoolsError("verification went wrong")


@pytest.mark.parametrize("stop", [_interrupt, _fail])
@pytest.mark.parametrize("command", ["extract", "resize"])
def test_verify_that_stops_removes_the_output(models, tmp_path, monkeypatch, command, stop):
    base, lora, tuned = models
    monkeypatch.setattr(f"lytools.{command}.pipeline.verify_output", stop)
    out = tmp_path / "x.safetensors"
    inputs = [str(base), str(tuned)] if command == "extract" else [str(lora)]
    options = ["--rank", "2"] if command == "resize" else []
    with pytest.raises(SystemExit) as raised:
        main([command, *inputs, str(out), *options, "--verify", "-q"])
    assert raised.value.code == (130 if stop is _interrupt else 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors", "lora.safetensors", "tuned.safetensors"]


@pytest.mark.parametrize("target", ["verify_checkpoint", "verify_network"])
def test_merge_verify(models, tmp_path, monkeypatch, target):
    base, lora, _ = models
    monkeypatch.setattr(f"lytools.merge.verify.{target}", _interrupt)
    out = tmp_path / "m.safetensors"
    inputs = [str(base), str(lora)] if target == "verify_checkpoint" else [str(lora), str(lora)]
    with pytest.raises(SystemExit) as raised:
        main(["merge", *inputs, "-o", str(out), "--verify", "-q"])
    assert raised.value.code == 130
    assert not out.exists()


def test_extract_report_in_a_missing_folder_is_refused_first(models, tmp_path, capsys):
    base, _, tuned = models
    out = tmp_path / "x.safetensors"
    with pytest.raises(SystemExit) as raised:
        main(["extract", str(base), str(tuned), str(out), "--report", str(tmp_path / "nodir" / "r.json")])
    assert raised.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0] and "internal error" not in err[0]
    assert not out.exists()
