"""Resized files load in lycoris-lora and diffusers with the weights lytools meant (tiny SD1-topology
models built from configs, nothing downloaded); diffusers-layout inputs are read through convert."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from lytools.algos import NetworkModule, delta
from lytools.io import open_file, write_safetensors
from lytools.resize import ResizeOptions, resize_file
from tests.shared import lycoris_modules

diffusers = pytest.importorskip("diffusers")
lycoris = pytest.importorskip("lycoris")


def tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, norm_num_groups=8, attention_head_dim=4,
    )


def kohya_lora_for(unet, path: Path, rank: int = 8) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Write a rank-`rank` kohya LoRA/LoCon (fp32, alpha rank/2) for every Linear/Conv2d of the UNet's
    attentions and resnets; return {kohya name: (diffusers path, weight shape)}."""
    gen = torch.Generator().manual_seed(1)
    tensors, modules = {}, {}
    for path_name, layer in unet.named_modules():
        if not isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)) or not ("attentions" in path_name or "resnets" in path_name):
            continue
        name = "lora_unet_" + path_name.replace(".", "_")
        shape = tuple(layer.weight.shape)
        if len(shape) == 4:
            tensors[f"{name}.lora_down.weight"] = 0.2 * torch.randn(rank, shape[1], *shape[2:], generator=gen)
            tensors[f"{name}.lora_up.weight"] = 0.2 * torch.randn(shape[0], rank, 1, 1, generator=gen)
        else:
            tensors[f"{name}.lora_down.weight"] = 0.2 * torch.randn(rank, shape[1], generator=gen)
            tensors[f"{name}.lora_up.weight"] = 0.2 * torch.randn(shape[0], rank, generator=gen)
        tensors[f"{name}.alpha"] = torch.tensor(rank / 2)
        modules[name] = (path_name, shape)
    write_safetensors(path, tensors, {"ss_network_module": "networks.lora"})
    return modules


def file_deltas(path: Path, modules: dict[str, tuple[str, tuple[int, ...]]]) -> dict[str, torch.Tensor]:
    """Return each module's ΔW as lytools reads the file (s·up@down)."""
    with open_file(path) as reader:
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for key in reader.keys():
            name, suffix = key.split(".", 1)
            grouped.setdefault(name, {})[suffix] = reader.get(key).clone()
    return {name: delta(NetworkModule(name, grouped[name]), shape) for name, (_, shape) in modules.items()}


@pytest.fixture(scope="module")
def resized(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loaders")
    unet = tiny_unet()
    source = folder / "in.safetensors"
    modules = kohya_lora_for(unet, source)
    out = folder / "out.safetensors"
    resize_file(source, out, ResizeOptions(rank=4, conv_rank=3))
    return unet, modules, out, file_deltas(out, modules)


def test_output_loads_in_lycoris_with_matching_weights(resized):
    unet, modules, out, deltas = resized
    with open_file(out) as reader:
        loaded = lycoris_modules(unet, {key: reader.get(key).clone() for key in reader.keys()})
    assert set(loaded) == set(modules)
    for name, lora in loaded.items():
        assert type(lora).__name__ == "LoConModule"
        assert lora.lora_down.weight.shape[0] == (3 if len(modules[name][1]) == 4 and modules[name][1][2] == 3 else 4)
        change = lora.get_diff_weight(multiplier=1.0, shape=modules[name][1])[0]
        torch.testing.assert_close(change, deltas[name], rtol=1e-4, atol=1e-6)


def test_output_loads_in_diffusers_pipeline_with_matching_weights(resized):
    pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    unet, modules, out, deltas = resized
    torch.manual_seed(0)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=100,
        max_position_embeddings=16, projection_dim=32))
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                                  up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8)
    pipe = diffusers.StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=None, scheduler=diffusers.DDIMScheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    before = {name: pipe.unet.get_submodule(path).weight.detach().clone() for name, (path, _) in modules.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.load_lora_weights(str(out))
        pipe.fuse_lora(lora_scale=1.0)
    fused = 0
    for name, (path, _) in modules.items():
        layer = pipe.unet.get_submodule(path)
        weight = layer.base_layer.weight if hasattr(layer, "base_layer") else layer.weight
        torch.testing.assert_close(weight.detach() - before[name], deltas[name], rtol=1e-3, atol=1e-5)
        fused += 1
    assert fused == len(modules)


def test_diffusers_layout_input_is_read_through_convert(tmp_path):
    testing = pytest.importorskip("lytools.testing")
    source = testing.build_network(tmp_path / "d.safetensors", "sd1", factor=8, rank=6, layout="diffusers",
                                   dtype=torch.float32, components=("unet",))
    out = tmp_path / "k.safetensors"
    summary = resize_file(source, out, ResizeOptions(rank=3))
    with open_file(out) as reader:
        keys = list(reader.keys())
    assert keys and all(key.startswith("lora_unet_") for key in keys)
    assert {report.rank_out for report in summary.modules} == {3}
    assert all(report.action == "resized" for report in summary.modules)
