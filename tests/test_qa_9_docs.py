"""Claims of the README and of `--help` that did not hold (checked one by one against the CLI)."""

from __future__ import annotations

import pytest

from lytools.testing import build_network
from tests.shared import run_lytools


@pytest.mark.parametrize("command", ["info", "convert", "convert-batch"])
def test_debug_traceback_for_a_failed_file(tmp_path, capsys, monkeypatch, command):
    """README: a runtime failure is one line, 'set LYTOOLS_DEBUG=1 for a traceback'. info and
    convert report a failed file themselves (the batch goes on), and printed no traceback."""
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"GGUF" + bytes(64))
    good = build_network(tmp_path / "good.safetensors", "sd1", factor=16)
    args = {
        "info": ["info", bad],
        "convert": ["convert", bad, "-o", tmp_path / "out.safetensors", "--save-dtype", "fp16"],
        "convert-batch": ["convert", bad, good, "--output-dir", tmp_path / "out", "--save-dtype", "fp16"],
    }[command]
    code, _, err = run_lytools(capsys, *args)
    assert code == 1 and "Traceback" not in err and "GGUF" in err
    monkeypatch.setenv("LYTOOLS_DEBUG", "1")
    code, _, err = run_lytools(capsys, *args)
    assert code == 1 and "Traceback (most recent call last)" in err and "FileFormatError" in err, err
    assert "lytools: error: " in err  # the one line still follows


def test_convert_help_names_the_peft_outputs_of_o(tmp_path, capsys):
    """`convert -o OUT --to peft` writes a folder or OUT plus OUT.adapter_config.json; --help said
    only 'Output for a single INPUT', so the second file came unannounced."""
    code, out, _ = run_lytools(capsys, "convert", "--help")
    assert code == 0 and "OUT.adapter_config.json" in " ".join(out.split())
    net = build_network(tmp_path / "net.safetensors", "sd1", factor=16, components=["unet"])
    code, out, err = run_lytools(capsys, "convert", net, "-o", tmp_path / "pf.safetensors", "--to", "peft")
    assert code == 0, err
    assert out.split() == [str(tmp_path / "pf.safetensors"), str(tmp_path / "pf.adapter_config.json")]
    code, out, err = run_lytools(capsys, "convert", net, "-o", tmp_path / "folder", "--to", "peft")
    assert code == 0, err
    assert out.split() == [str(tmp_path / "folder" / "adapter_model.safetensors"),
                           str(tmp_path / "folder" / "adapter_config.json")]
