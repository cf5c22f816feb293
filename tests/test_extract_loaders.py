"""The extracted file loads unchanged in LyCORIS (kohya wrapper) and diffusers, and the weight
changes they build equal ours (tiny SD1-topology models from configs, nothing downloaded)."""

from __future__ import annotations

import logging

import pytest
import torch

from lytools.algos import delta, group_keys, load_module
from lytools.extract import ExtractOptions, RankRule, extract
from lytools.io import open_file
from lytools.testing import build_checkpoint, build_network, build_tuned, select_modules

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
lycoris = pytest.importorskip("lycoris")

FACTOR = 8  # lytools.testing shrinks every multiple-of-64 dimension by this


def tiny_sd1_unet():
    """diffusers' SD1 UNet with every width divided by FACTOR (module names unchanged)."""
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=tuple(c // FACTOR for c in (320, 640, 1280, 1280)),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768 // FACTOR, attention_head_dim=8, norm_num_groups=8,
    )


def tiny_clip_l():
    config = transformers.CLIPTextConfig(
        vocab_size=1000, hidden_size=768 // FACTOR, intermediate_size=3072 // FACTOR, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77,
    )
    return transformers.CLIPTextModel(config)


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("extract-loaders")
    base = build_checkpoint(folder / "base.safetensors", "sd1", factor=FACTOR, components=("unet", "clip_l"))
    modules = [m for m in select_modules("sd1", "c3lier") if "_1_" in m or m.endswith("_0_mlp_fc1")]
    network = build_network(folder / "net.safetensors", "sd1", factor=FACTOR, rank=4, modules=modules)
    tuned = build_tuned(base, folder / "tuned.safetensors", network, noise=1e-4)
    result = extract(base, tuned.path, folder / "lora.safetensors",
                     ExtractOptions(linear=RankRule("fixed", 6), conv=RankRule("fixed", 6)))
    ours = {}
    with open_file(result.output) as lora:
        groups = group_keys(lora.keys())
        for name, keys in groups.modules.items():
            module = load_module(lora, name, keys)
            shape = next(r.shape for r in result.records if r.name == name)
            ours[name] = delta(module, shape).clone()
    return result.output, ours


def test_lycoris_loads_every_module_with_our_weights(extracted, monkeypatch):
    path, ours = extracted
    import lycoris.wrapper

    # kohya names are "lora_" + the module path in a tree whose children are `unet` and `te`:
    # LyCORIS's standalone loader with that prefix reads our file as it is
    root = torch.nn.Module()
    root.unet, root.te = tiny_sd1_unet(), torch.nn.Module()
    root.te.text_model = tiny_clip_l()  # transformers 5 dropped the `text_model` level kohya names keep
    monkeypatch.setattr(lycoris.wrapper.LycorisNetwork, "LORA_PREFIX", "lora")
    logging.getLogger("lycoris").setLevel(logging.ERROR)
    network, weights = lycoris.wrapper.create_lycoris_from_weights(1.0, str(path), root)
    network.apply_to()
    missing, unexpected = network.load_state_dict(weights, strict=False)
    assert not unexpected
    loaded = {m.lora_name: m for m in network.loras}
    assert set(loaded) == set(ours)
    for name, module in loaded.items():
        diff, _ = module.get_diff_weight(multiplier=1.0)
        diff = diff.float().reshape(ours[name].shape)
        assert torch.allclose(diff, ours[name], atol=2e-3 * float(ours[name].abs().max()) + 1e-6), name


def test_diffusers_loads_unet_and_text_encoder_with_our_weights(extracted):
    path, ours = extracted
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from peft.tuners.lora import LoraLayer

    unet, text_encoder = tiny_sd1_unet(), tiny_clip_l()
    state_dict, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(str(path))
    StableDiffusionLoraLoaderMixin.load_lora_into_unet(state_dict, alphas, unet, adapter_name="x")
    StableDiffusionLoraLoaderMixin.load_lora_into_text_encoder(state_dict, alphas, text_encoder, adapter_name="x")
    found = {}
    for prefix, model in (("lora_unet_", unet), ("lora_te_", text_encoder)):
        for module_name, module in model.named_modules():
            if isinstance(module, LoraLayer) and "x" in module.lora_A:
                if prefix == "lora_te_" and not module_name.startswith("text_model."):
                    module_name = "text_model." + module_name  # transformers 5 has no `text_model` level
                found[prefix + module_name.replace(".", "_")] = module.get_delta_weight("x").float()
    assert set(found) == set(ours)
    for name, change in found.items():
        assert torch.allclose(change.reshape(ours[name].shape), ours[name], atol=2e-3 * float(ours[name].abs().max()) + 1e-6), name
