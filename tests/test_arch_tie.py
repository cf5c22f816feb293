"""A network whose modules fit several architectures equally (CLIP-L + CLIP-G text encoders only:
SDXL or SD3): detection states the tie without advice, and each command says what it can do."""

from __future__ import annotations

import json

import pytest

from lytools.arch import detect_network
from lytools.io import read_header
from lytools.testing import build_network
from tests.shared import run_lytools


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    root = tmp_path_factory.mktemp("tie")
    return {
        "kohya": build_network(root / "te.safetensors", "sdxl", components=["te1", "te2"], factor=8),
        "diffusers": build_network(root / "te-diffusers.safetensors", "sdxl", components=["te1", "te2"], factor=8,
                                   layout="diffusers"),
    }


def test_detection_states_the_tie_without_advice(tied):
    found = detect_network(read_header(tied["kohya"]).tensors)
    assert (found.arch, found.tied) == ("unknown", ("sdxl", "sd3"))
    assert found.notes == ["modules fit sdxl and sd3 equally"]
    picked = detect_network(read_header(tied["kohya"]).tensors, {"ss_base_model_version": "sdxl_base_v1-0"})
    assert (picked.arch, picked.tied, picked.notes) == ("sdxl", (), [])


def test_info_names_the_candidates_and_the_command_that_takes_arch(tied, capsys):
    code, out, err = run_lytools(capsys, "info", "--json", tied["kohya"])
    [report] = json.loads(out)
    assert code == 0 and report["architecture"] == "unknown" and report["architecture_candidates"] == ["sdxl", "sd3"]
    assert "modules fit sdxl and sd3 equally" in report["notes"]
    assert "lytools convert takes --arch (sdxl or sd3) to read it as one of them" in report["notes"]
    code, out, _ = run_lytools(capsys, "info", tied["kohya"])
    assert code == 0 and "unknown (sdxl or sd3: the modules fit each)" in out
    assert "say which with --arch" not in out  # info has no --arch
    code, out, _ = run_lytools(capsys, "info", "--json", build_network(tied["kohya"].with_name("sd1.safetensors"), "sd1", factor=8))
    assert json.loads(out)[0]["architecture_candidates"] == []


def test_convert_asks_for_arch_and_takes_it(tied, capsys):
    out = tied["kohya"].with_name("out.safetensors")
    code, _, err = run_lytools(capsys, "convert", tied["kohya"], "-o", out, "--to", "kohya")
    assert code == 0 and "say which with --arch (sdxl or sd3)" in err
    code, _, err = run_lytools(capsys, "convert", tied["kohya"], "-o", out.with_name("d.safetensors"), "--to", "diffusers")
    assert code == 1 and "modules fit sdxl and sd3 equally; diffusers names need one: say which with --arch" in err
    code, _, err = run_lytools(capsys, "convert", tied["kohya"], "-o", out.with_name("d.safetensors"), "--to", "diffusers",
                               "--arch", "sd3")
    assert code == 0 and "read as sd3 as asked" in err and "--arch" not in err


def test_commands_without_arch_give_no_advice_about_it(tied, capsys):
    """resize and merge read the tied network as it is: neither has --arch, so neither mentions it."""
    source = tied["diffusers"]
    code, _, err = run_lytools(capsys, "resize", source, source.with_name("r.safetensors"), "--rank", "2")
    assert code == 0 and "modules fit sdxl and sd3 equally" in err and "--arch" not in err
    code, _, err = run_lytools(capsys, "merge", tied["kohya"], source, "-o", source.with_name("m.safetensors"))
    assert code == 0 and "--arch" not in err
