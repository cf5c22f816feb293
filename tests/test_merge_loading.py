"""Loading proof: a network merged from two LoRAs loads in diffusers (`load_lora_weights`) and in
lycoris-lora, and gives the same weights as loading both inputs with their ratios.

The models are an SD1-topology UNet and CLIP text encoder built from configs shrunk by 8 (the
shapes of `lytools.testing` networks at factor 8); nothing is downloaded.
"""

from __future__ import annotations

import copy

import pytest
import torch

from lytools.merge import merge_networks
from lytools.testing import build_network

diffusers = pytest.importorskip("diffusers")
lycoris_wrapper = pytest.importorskip("lycoris.wrapper")

RATIOS = (0.5, -0.3)


@pytest.fixture(scope="module")
def models():
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(40, 80, 160, 160), layers_per_block=2, cross_attention_dim=96, attention_head_dim=8,
        norm_num_groups=8, sample_size=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=96, intermediate_size=384, num_hidden_layers=12, num_attention_heads=12, vocab_size=1000,
        max_position_embeddings=77,
    ))
    return unet.eval(), text_encoder.eval()


@pytest.fixture(scope="module")
def networks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("load")
    a = build_network(folder / "a.safetensors", "sd1", factor=8, rank=4, alpha=2.0, modules="lierla", seed=1,
                      dtype=torch.float32)
    b = build_network(folder / "b.safetensors", "sd1", factor=8, rank=2, alpha=1.0, modules="lierla", seed=2,
                      dtype=torch.float32)
    merged = folder / "ab.safetensors"
    merge_networks([a, b], merged, ratios=list(RATIOS))
    return a, b, merged


def weights(*modules: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Return every plain weight of the models (peft wrappers' base layers under their plain names)."""
    result = {}
    for index, module in enumerate(modules):
        for name, tensor in module.state_dict().items():
            if "lora_" in name:
                continue
            result[f"{index}.{name.replace('.base_layer', '')}"] = tensor.detach().clone()
    return result


def compare(original: dict, from_inputs: dict, from_merged: dict) -> int:
    """Assert both routes changed the same tensors by the same amount; return how many changed."""
    assert from_inputs.keys() == from_merged.keys() == original.keys()
    changed = 0
    for name, before in original.items():
        change = from_inputs[name] - before
        if not change.abs().max() > 0:
            assert torch.equal(from_merged[name], before), name
            continue
        changed += 1
        error = float((from_merged[name] - from_inputs[name]).norm() / change.norm())
        assert error < 1e-4, (name, error)
    return changed


def fused_with_diffusers(models, files_and_ratios) -> dict[str, torch.Tensor]:
    """Return the models' weights after diffusers' load_lora_weights + fuse_lora of the files at their ratios."""
    unet, text_encoder = (copy.deepcopy(m) for m in models)
    pipe = diffusers.StableDiffusionPipeline(
        vae=diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4,
                                    down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",)),
        text_encoder=text_encoder, tokenizer=None, unet=unet, scheduler=diffusers.DDIMScheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    names = []
    for index, (path, _) in enumerate(files_and_ratios):
        pipe.load_lora_weights(str(path), adapter_name=f"n{index}")
        names.append(f"n{index}")
    pipe.set_adapters(names, adapter_weights=[ratio for _, ratio in files_and_ratios])
    pipe.fuse_lora(adapter_names=names)
    return weights(pipe.unet, pipe.text_encoder)


def test_merged_network_loads_in_diffusers(models, networks):
    a, b, merged = networks
    from_inputs = fused_with_diffusers(models, [(a, RATIOS[0]), (b, RATIOS[1])])
    from_merged = fused_with_diffusers(models, [(merged, 1.0)])
    assert compare(weights(*models), from_inputs, from_merged) == 264  # every LierLa module


def test_merged_network_loads_in_lycoris(models, networks):
    from safetensors.torch import load_file

    a, b, merged = networks

    def merge_with_lycoris(files_and_ratios):
        unet, text_encoder = (copy.deepcopy(m) for m in models)
        with torch.no_grad():
            for path, ratio in files_and_ratios:
                state = load_file(str(path))
                loaded = 0
                # LyCORIS' standalone wrapper names modules lycoris_<path inside the wrapped model>; this
                # transformers' CLIPTextModel holds the encoder at its top level (no `text_model.`)
                for prefix, model in (("lora_unet_", unet), ("lora_te_text_model_", text_encoder)):
                    part = {"lycoris_" + k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
                    network, _ = lycoris_wrapper.create_lycoris_from_weights(ratio, "", model, weights_sd=part)
                    for module in network.loras:
                        module.merge_to(ratio)
                    loaded += len(network.loras)
                assert loaded == 264
        return weights(unet, text_encoder)

    original = weights(*models)
    from_inputs = merge_with_lycoris([(a, RATIOS[0]), (b, RATIOS[1])])
    from_merged = merge_with_lycoris([(merged, 1.0)])
    assert compare(original, from_inputs, from_merged) == 264
