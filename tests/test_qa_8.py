"""QA of --strip-metadata, OUT rules and the metadata resize and merge write (session 8): each test pins
a bug found from the command line."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from lytools.algos import delta
from lytools.convert import load_network
from lytools.io import read_header
from lytools.testing import build_network, select_modules
from tests.shared import run_lytools as cli


def run(capsys, *args) -> None:
    code, _, err = cli(capsys, *args, "-q")
    assert code == 0, err


@pytest.fixture(scope="module")
def diffusers_lora(tmp_path_factory):
    """An SD1 UNet LoRA (alpha != rank) in diffusers names, as convert --to diffusers writes it: with the
    lora_adapter_metadata diffusers reads its LoraConfig from."""
    folder = tmp_path_factory.mktemp("qa8")
    modules = [m for m in select_modules("sd1", "c3lier", components=["unet"]) if "_1_" in m]
    kohya = build_network(folder / "k.safetensors", "sd1", factor=8, rank=6, alpha=3.0, modules=modules,
                          dtype=torch.float32)
    from lytools.convert import ConvertOptions, convert_file
    out = folder / "d.safetensors"
    convert_file(kohya, out, ConvertOptions(target="diffusers"))
    assert "lora_adapter_metadata" in read_header(out).metadata
    return out


def load_in_diffusers(path: Path) -> dict[str, torch.Tensor]:
    """Load the file as diffusers' pipelines do (metadata included) into a tiny SD1 UNet; {kohya name: ΔW}."""
    pytest.importorskip("peft")
    from tests.test_extract_loaders import tiny_sd1_unet
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from peft.tuners.lora import LoraLayer

    unet = tiny_sd1_unet()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state, alphas, metadata = StableDiffusionLoraLoaderMixin.lora_state_dict(str(path), return_lora_metadata=True)
        StableDiffusionLoraLoaderMixin.load_lora_into_unet(state, alphas, unet, adapter_name="x", metadata=metadata)
    return {"lora_unet_" + name.replace(".", "_"): module.get_delta_weight("x").float()
            for name, module in unet.named_modules() if isinstance(module, LoraLayer) and "x" in module.lora_A}


@pytest.mark.parametrize("command", [
    ("resize", "--rank", "2"), ("resize", "--rank", "2", "--strip-metadata"),
    ("merge", "--strip-metadata"), ("merge", "--rank", "3"),
])
def test_kohya_outputs_of_diffusers_inputs_drop_the_adapter_metadata(diffusers_lora, tmp_path, capsys, command):
    """resize and merge of networks write kohya factors with alpha tensors; the input's lora_adapter_metadata
    (carried, and kept by --strip-metadata) made diffusers refuse the file ('Both network_alphas and metadata
    cannot be specified') and described ranks no longer written."""
    pytest.importorskip("diffusers")
    out = tmp_path / "out.safetensors"
    if command[0] == "resize":
        run(capsys, "resize", diffusers_lora, out, *command[1:])
    else:
        run(capsys, "merge", diffusers_lora, diffusers_lora, "-o", out, *command[1:])
    metadata = read_header(out).metadata or {}
    assert not [key for key in metadata if key.endswith("lora_adapter_metadata")], sorted(metadata)
    found = load_in_diffusers(out)
    ours = load_network(out)
    assert found and set(found) == set(ours.modules)
    for name, module in ours.modules.items():
        torch.testing.assert_close(found[name], delta(module, found[name].shape).float(), rtol=1e-3, atol=1e-5)
