"""A peft adapter folder (adapter_model.safetensors + adapter_config.json, as peft's save_pretrained and
`convert --to peft` write it) is an input every command takes, read exactly as its adapter file is;
convert names outputs after the folder, as peft names the adapter."""

from __future__ import annotations

import json

import pytest
import torch

from lytools.convert import ConvertOptions, convert_file
from lytools.testing import build_checkpoint, build_network
from tests.shared import read_tensors, run_lytools


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A peft folder `style/` whose config carries a scale other than 1 (lora_alpha = r / 2, not folded)."""
    folder = tmp_path_factory.mktemp("peftdir")
    source = build_network(folder / "src.safetensors", "sd1", factor=16, rank=4, alpha=2.0, modules="lierla",
                           components=("unet",), seed=5)
    convert_file(source, folder / "style", ConvertOptions(target="peft", fold=False))
    config = json.loads((folder / "style" / "adapter_config.json").read_text())
    assert config["lora_alpha"] != config["r"]  # the scale lives only in the config
    return folder, source, folder / "style"


def test_convert_reads_the_folder_as_its_adapter_file(adapter, capsys, tmp_path):
    folder, source, style = adapter
    code, out, err = run_lytools(capsys, "convert", style, "-o", tmp_path / "a.safetensors", "--to", "kohya", "--verify")
    assert code == 0, err
    code, _, err = run_lytools(capsys, "convert", style / "adapter_model.safetensors", "-o", tmp_path / "b.safetensors",
                               "--to", "kohya")
    assert code == 0, err
    a, b = read_tensors(tmp_path / "a.safetensors"), read_tensors(tmp_path / "b.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the config's scale was applied: alpha / rank of the kohya output equals lora_alpha / r, 2 / 4
    alphas = {float(v) for k, v in a.items() if k.endswith(".alpha")}
    ranks = {v.shape[0] for k, v in a.items() if k.endswith("lora_down.weight")}
    assert alphas == {2.0} and ranks == {4}


def test_output_dir_names_the_output_after_the_folder(adapter, capsys, tmp_path):
    _, _, style = adapter
    code, out, err = run_lytools(capsys, "convert", style, "--output-dir", tmp_path / "out", "--to", "diffusers", "-q")
    assert code == 0, err
    assert out.split() == [str(tmp_path / "out" / "style.safetensors")]
    code, out, err = run_lytools(capsys, "convert", style / "adapter_model.safetensors", "--output-dir",
                                 tmp_path / "out2", "--to", "kohya", "-q")
    assert code == 0, err
    assert out.split() == [str(tmp_path / "out2" / "style.safetensors")]


def test_info_resize_and_merge_take_the_folder(adapter, capsys, tmp_path):
    folder, source, style = adapter
    code, out, err = run_lytools(capsys, "info", style, "--json")
    assert code == 0, err
    assert json.loads(out)[0]["layout"] == "peft"
    code, out, err = run_lytools(capsys, "resize", style, tmp_path / "r.safetensors", "--rank", "2", "-q")
    assert code == 0, err
    assert {v.shape[0] for k, v in read_tensors(tmp_path / "r.safetensors").items() if k.endswith("lora_down.weight")} == {2}
    base = build_checkpoint(tmp_path / "base.safetensors", "sd1", factor=16, components=("unet",))
    for name, network in (("folder", style), ("kohya", source)):
        code, _, err = run_lytools(capsys, "merge", base, network, "-o", tmp_path / f"m-{name}.safetensors", "-q")
        assert code == 0, err
    by_folder, by_kohya = read_tensors(tmp_path / "m-folder.safetensors"), read_tensors(tmp_path / "m-kohya.safetensors")
    assert max(float((by_folder[k].float() - by_kohya[k].float()).abs().max()) for k in by_kohya) < 1e-3


def test_a_folder_that_is_not_an_adapter_is_still_an_error(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    code, _, err = run_lytools(capsys, "convert", tmp_path / "empty", "-o", tmp_path / "x.safetensors", "--to", "kohya")
    assert code == 1
    assert err.count("\n") == 1 and "empty" in err


def test_convert_never_replaces_a_peft_input_config(adapter, capsys, tmp_path):
    _, _, style = adapter
    config = style / "adapter_config.json"
    before = config.read_bytes()
    for args in (("--to", "kohya", "-o", config), ("--to", "peft", "-o", style), ("--save-dtype", "fp16", "-o", config)):
        code, _, err = run_lytools(capsys, "convert", style, *args, "--overwrite")
        assert code == 1 and "would replace its own input" in err, err
    assert config.read_bytes() == before
