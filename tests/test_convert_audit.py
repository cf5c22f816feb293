"""Audit of `lytools convert` as a batch tool and as a bridge to peft: inputs listed twice, CRLF
stdin lists with spaces in names, same-named inputs from two folders, peft adapters with
per-module ranks/alphas and DoRA loaded by the real peft library, and text-encoder peft adapters
that must convert back to kohya without --arch."""

from __future__ import annotations

import io
import json
import sys

import pytest
import torch

from lytools.convert import ConvertOptions, convert_file, load_network
from lytools.io import write_safetensors
from lytools.testing import build_network
from tests.shared import read_tensors, run_lytools

ONE = ["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k"]


def test_an_input_listed_twice_is_converted_once(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "with space"
    folder.mkdir()
    source = build_network(folder / "a b.safetensors", "sd1", rank=2, modules=ONE)
    out = tmp_path / "out"
    out.mkdir()
    # CRLF line ends, blank lines, and the same file spelled two ways (find over overlapping folders)
    listing = f"{source}\r\n\r\n\n{folder}/../with space/a b.safetensors\r\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(listing))
    code, stdout, _ = run_lytools(capsys, "convert", "-", "--output-dir", out, "--to", "diffusers")
    assert code == 0 and stdout.splitlines() == [str(out / "a b.safetensors")]


def test_same_file_names_from_two_folders_are_refused_before_anything_is_written(tmp_path, capsys):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    build_network(first / "n.safetensors", "sd1", rank=2, modules=ONE)
    build_network(second / "n.safetensors", "sd1", rank=2, modules=ONE, seed=1)
    out = tmp_path / "out"
    out.mkdir()
    for extra in (["--to", "diffusers"], ["--to", "peft", "--component", "unet"]):
        code, stdout, err = run_lytools(capsys, "convert", first / "n.safetensors", second / "n.safetensors",
                                        "--output-dir", out, *extra)
        assert code == 1 and stdout == "" and "would both be written" in err and len(err.strip().splitlines()) == 1
        assert list(out.iterdir()) == []


def _varied(tmp_path, dora: bool):
    """An SD1 UNet LoCon whose modules differ in rank and alpha (rank_pattern / alpha_pattern)."""
    from tests.test_convert_loaders import FACTOR, sample_modules

    source = build_network(tmp_path / "k.safetensors", "sd1", factor=FACTOR, rank=4, alpha=2.0, conv_rank=2,
                           modules=[m for m in sample_modules("sd1") if m.startswith("lora_unet_")], dora=dora)
    tensors = read_tensors(source)
    names = sorted({key.split(".")[0] for key in tensors})
    for index, name in enumerate(names):
        if index % 3 == 0 and tensors[f"{name}.lora_down.weight"].shape[0] > 2:
            tensors[f"{name}.lora_down.weight"] = tensors[f"{name}.lora_down.weight"][:2].clone()
            tensors[f"{name}.lora_up.weight"] = tensors[f"{name}.lora_up.weight"][:, :2].clone()
        tensors[f"{name}.alpha"] = torch.tensor(float(1 + index % 5))
    varied = tmp_path / "varied.safetensors"
    write_safetensors(varied, tensors, {})
    return varied


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("fold", [False, None])
def test_peft_loads_per_module_ranks_alphas_and_dora_as_lytools_reads_them(tmp_path, dora, fold):
    peft = pytest.importorskip("peft")
    pytest.importorskip("diffusers")
    from peft.tuners.lora import LoraLayer

    from lytools.convert.names import candidates
    from tests.test_convert_loaders import assert_deltas_match, tiny_unet

    source = _varied(tmp_path, dora)
    convert_file(source, tmp_path / "adapter", ConvertOptions(target="peft", component="unet", fold=fold))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] is dora and config["rank_pattern"]
    model = peft.PeftModel.from_pretrained(tiny_unet("sd1"), str(tmp_path / "adapter"))
    net = load_network(source)
    found, ours = {}, {}
    for path, layer in model.base_model.model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        name = candidates("sd1", f"unet.{path}")[0].module
        module = net.modules[name]
        up, down = module["lora_up.weight"].float(), module["lora_down.weight"].float()
        found[name] = layer.get_delta_weight("default").detach().float()
        ours[name] = (up.flatten(1) @ down.flatten(1)) * float(module["alpha"]) / down.shape[0]
        if dora:
            magnitude = layer.lora_magnitude_vector["default"].weight.detach().flatten()
            assert torch.allclose(magnitude, module["dora_scale"].float().flatten(), rtol=1e-3, atol=1e-4), name
    assert len(found) == len(net.modules)
    assert_deltas_match(found, ours)


@pytest.mark.parametrize("arch,component", [("sd1", "te"), ("sdxl", "te1"), ("flux", "te1")])
def test_text_encoder_peft_adapter_converts_back_to_kohya_bit_exactly(tmp_path, arch, component):
    # the source holds the UNet too (a te1-only kohya file fits sdxl, sd3 and flux alike)
    source = build_network(tmp_path / "k.safetensors", arch, factor=16, rank=4, alpha=3.0, modules="lierla", dora=True)
    prefix = "lora_te_" if component == "te" else "lora_te1_"
    convert_file(source, tmp_path / "p", ConvertOptions(target="peft", component=component, fold=False))
    back = tmp_path / "back.safetensors"
    convert_file(tmp_path / "p" / "adapter_model.safetensors", back, ConvertOptions(target="kohya"))
    original, returned = load_network(source), load_network(back)
    wanted = {name: module for name, module in original.modules.items() if name.startswith(prefix)}
    assert wanted and returned.arch == arch and set(returned.modules) == set(wanted)
    for name, module in wanted.items():
        for suffix, tensor in module.tensors.items():
            assert torch.equal(returned.modules[name][suffix], tensor), (name, suffix)


def test_peft_output_folder_holding_the_input_adapter_is_refused(tmp_path, capsys):
    source = build_network(tmp_path / "k.safetensors", "sd1", rank=2, modules=ONE)
    folder = tmp_path / "adapter"
    convert_file(source, folder, ConvertOptions(target="peft", component="unet", fold=False))
    before = (folder / "adapter_model.safetensors").read_bytes(), (folder / "adapter_config.json").read_bytes()
    code, stdout, err = run_lytools(capsys, "convert", folder / "adapter_model.safetensors", "-o", folder, "--to", "peft",
                                    "--overwrite")
    assert code == 1 and stdout == "" and "replace its own input" in err
    assert ((folder / "adapter_model.safetensors").read_bytes(), (folder / "adapter_config.json").read_bytes()) == before


@pytest.mark.parametrize("fold", [False, None])
def test_diffusers_loads_per_module_ranks_and_alphas_from_the_adapter_metadata(tmp_path, fold):
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from tests.test_convert_loaders import assert_deltas_match, lora_layers, tiny_pipeline

    source = _varied(tmp_path, dora=False)
    out = tmp_path / "d.safetensors"
    convert_file(source, out, ConvertOptions(target="diffusers", fold=fold))
    pipe = tiny_pipeline("sd1")
    pipe.load_lora_weights(str(out), adapter_name="x")
    found = lora_layers(pipe.unet, "x", "unet", "sd1")
    ours = {}
    for name, module in load_network(source).modules.items():
        up, down = module["lora_up.weight"].float(), module["lora_down.weight"].float()
        ours[name] = (up.flatten(1) @ down.flatten(1)) * float(module["alpha"]) / down.shape[0]
    assert_deltas_match(found, ours)
