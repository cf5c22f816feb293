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


def _delta(path, module: str):
    from safetensors.torch import load_file

    tensors = load_file(path)
    up, down = tensors[f"{module}.lora_up.weight"].double(), tensors[f"{module}.lora_down.weight"].double()
    alpha = float(tensors[f"{module}.alpha"]) if f"{module}.alpha" in tensors else down.shape[0]
    return up.flatten(1) @ down.flatten(1) * alpha / down.shape[0]


@pytest.mark.parametrize("strip", [False, True])
def test_cast_of_a_peft_adapter_keeps_its_scale(tmp_path, capsys, strip):
    """README: without --to, --save-dtype casts any network. A peft adapter's scale (lora_alpha / r)
    is in its adapter_config.json; the cast wrote the adapter file alone, so every loader read it at
    scale 1 (here twice the change)."""
    import json

    import torch
    from safetensors.torch import load_file, save_file

    net = build_network(tmp_path / "n.safetensors", "sd1", factor=16, components=["unet"])
    tensors = load_file(net)
    for key in [k for k in tensors if k.endswith(".alpha")]:
        tensors[key] = torch.full_like(tensors[key], 2.0)  # rank 4: scale 0.5
    save_file(tensors, tmp_path / "a2.safetensors")
    code, _, err = run_lytools(capsys, "convert", tmp_path / "a2.safetensors", "-o", tmp_path / "adapter",
                               "--to", "peft", "--no-fold")
    assert code == 0, err
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["lora_alpha"] == 2 and config["r"] == 4
    args = ["--strip-metadata"] if strip else []
    code, out, err = run_lytools(capsys, "convert", tmp_path / "adapter", "-o", tmp_path / "cast.safetensors",
                                 "--save-dtype", "fp32", *args)
    assert code == 0, err
    written = tmp_path / "cast.adapter_config.json"
    assert out.split() == [str(tmp_path / "cast.safetensors"), str(written)]
    assert json.loads(written.read_text())["lora_alpha"] == 2
    code, _, err = run_lytools(capsys, "convert", tmp_path / "cast.safetensors", "-o", tmp_path / "back.safetensors",
                               "--to", "kohya")
    assert code == 0, err
    module = "lora_unet_down_blocks_0_attentions_0_proj_in"
    assert torch.allclose(_delta(tmp_path / "back.safetensors", module), _delta(tmp_path / "a2.safetensors", module),
                          rtol=1e-3, atol=1e-6)
    # without --overwrite an existing config is refused like the adapter, and nothing is replaced
    before = written.read_text()
    (tmp_path / "cast.safetensors").unlink()
    code, _, err = run_lytools(capsys, "convert", tmp_path / "adapter", "-o", tmp_path / "cast.safetensors",
                               "--save-dtype", "fp16")
    assert code == 1 and "already exists" in err and str(written) in err
    assert written.read_text() == before and not (tmp_path / "cast.safetensors").exists()


def test_cast_of_a_peft_adapter_never_replaces_its_own_config(tmp_path, capsys):
    """The config written beside a cast may not be the input's own (with --overwrite and
    --strip-metadata it would have rewritten the input's adapter_config.json)."""
    net = build_network(tmp_path / "n.safetensors", "sd1", factor=16, components=["unet"])
    code, _, err = run_lytools(capsys, "convert", net, "-o", tmp_path / "a", "--to", "peft")
    assert code == 0, err
    (tmp_path / "a" / "adapter_model.safetensors").rename(tmp_path / "a" / "foo.safetensors")
    before = (tmp_path / "a" / "adapter_config.json").read_bytes()
    code, _, err = run_lytools(capsys, "convert", tmp_path / "a" / "foo.safetensors", "-o",
                               tmp_path / "a" / "adapter_model.safetensors", "--save-dtype", "fp32", "--overwrite",
                               "--strip-metadata")
    assert code == 1 and "the input's own" in err
    assert (tmp_path / "a" / "adapter_config.json").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapter_config.json", "foo.safetensors"]
