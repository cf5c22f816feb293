"""Converted files load in the real libraries and apply the weight changes lytools computes:
diffusers `load_lora_weights` (tiny SD1/SDXL-topology pipelines from configs), peft
(`PeftModel.from_pretrained`), LyCORIS (our kohya output); and networks written by diffusers
(`save_lora_weights`) and peft (`save_pretrained`, DoRA included) convert to kohya and match."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from lytools.algos import delta
from lytools.convert import ConvertOptions, convert_file, load_network
from lytools.convert.names import candidates
from lytools.testing import build_network, select_modules

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

FACTOR = 8  # lytools.testing divides every multiple-of-64 width by this


@pytest.fixture(autouse=True, scope="module")
def quiet_loaders():
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    logging.getLogger("transformers").setLevel(logging.ERROR)


def tiny_unet(arch: str):
    """diffusers' SD1 or SDXL UNet with the real block topology, widths divided by FACTOR."""
    if arch == "sd1":
        return diffusers.UNet2DConditionModel(
            sample_size=8, layers_per_block=2, block_out_channels=tuple(c // FACTOR for c in (320, 640, 1280, 1280)),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768 // FACTOR, attention_head_dim=8, norm_num_groups=8,
        )
    return diffusers.UNet2DConditionModel(
        sample_size=8, layers_per_block=2, block_out_channels=tuple(c // FACTOR for c in (320, 640, 1280)),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048 // FACTOR, attention_head_dim=(5, 10, 20),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256 // FACTOR,
        projection_class_embeddings_input_dim=2816 // FACTOR, norm_num_groups=8,
    )


def tiny_clip(width: int, layers: int, projection: bool = False):
    config = transformers.CLIPTextConfig(
        vocab_size=1000, hidden_size=width // FACTOR, intermediate_size=4 * width // FACTOR, num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=width // FACTOR, eos_token_id=2,
    )
    return (transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel)(config)


def tiny_vae():
    return diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4,
                                   down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))


def tiny_pipeline(arch: str):
    if arch == "sd1":
        return diffusers.StableDiffusionPipeline(
            vae=tiny_vae(), text_encoder=tiny_clip(768, 12), tokenizer=None, unet=tiny_unet("sd1"),
            scheduler=diffusers.DDIMScheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    return diffusers.StableDiffusionXLPipeline(
        vae=tiny_vae(), text_encoder=tiny_clip(768, 12), text_encoder_2=tiny_clip(1280, 32, projection=True),
        tokenizer=None, tokenizer_2=None, unet=tiny_unet("sdxl"), scheduler=diffusers.DDIMScheduler(),
    )


def lora_layers(model, adapter: str, prefix: str, arch: str) -> dict[str, torch.Tensor]:
    """{canonical kohya name: ΔW} of every peft LoRA layer in `model` (names through lytools' tables)."""
    from peft.tuners.lora import LoraLayer

    found = {}
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            hits = candidates(arch, f"{prefix}.{path}" if prefix else path)
            assert hits, f"{prefix}.{path}: no lytools name"
            found[hits[0].module] = module.get_delta_weight(adapter).float()
    return found


def our_deltas(path) -> dict[str, torch.Tensor]:
    net = load_network(path)
    return {name: delta(module, module["lora_up.weight"].shape[:1] + module["lora_down.weight"].shape[1:]).float()
            for name, module in net.modules.items()}


def assert_deltas_match(found: dict[str, torch.Tensor], ours: dict[str, torch.Tensor]) -> None:
    assert found and set(found) == set(ours)
    for name, change in found.items():
        expected = ours[name]
        change = change.reshape(expected.shape)
        error = float((change.detach() - expected).norm() / expected.norm())
        assert error < 2e-3, f"{name}: relative error {error:.2e}"


def sample_modules(arch: str) -> list[str]:
    """A slice of every module kind (attention, ff, proj, resnet convs, samplers, text encoders)."""
    return [m for m in select_modules(arch, "c3lier") if "_1_" in m or m.endswith(("_0_mlp_fc1", "_0_self_attn_q_proj"))]


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_diffusers_output_loads_with_load_lora_weights(tmp_path, arch):
    source = build_network(tmp_path / "k.safetensors", arch, factor=FACTOR, rank=4, alpha=3.0, conv_rank=2, conv_alpha=1.0,
                           modules=sample_modules(arch))
    out = tmp_path / "d.safetensors"
    convert_file(source, out, ConvertOptions(target="diffusers"))
    pipe = tiny_pipeline(arch)
    pipe.load_lora_weights(str(out), adapter_name="x")
    found = lora_layers(pipe.unet, "x", "unet", arch)
    found.update(lora_layers(pipe.text_encoder, "x", "text_encoder", arch))
    if arch == "sdxl":
        found.update(lora_layers(pipe.text_encoder_2, "x", "text_encoder_2", arch))
    assert_deltas_match(found, our_deltas(source))


def test_bias_difference_loads_with_load_lora_weights(tmp_path):
    """A kohya module's diff_b goes out as lora_B.bias; diffusers' loader turns on lora_bias for the
    UNet and applies it (times the scale) on fuse, exactly the bias difference. (Every UNet module
    carries one here: lora_bias is per model, and peft cannot fuse it into a layer without a bias.)"""
    from safetensors.torch import load_file, save_file

    source = build_network(tmp_path / "k.safetensors", "sd1", factor=FACTOR, rank=4, alpha=2.0,
                           modules=["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0"])
    tensors = load_file(source)
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0"
    torch.manual_seed(3)
    bias = 0.05 * torch.randn(tensors[f"{name}.lora_up.weight"].shape[0]).half()
    tensors[f"{name}.diff_b"] = bias
    save_file(tensors, source)  # (without the metadata that named the architecture)
    out = tmp_path / "d.safetensors"
    convert_file(source, out, ConvertOptions(target="diffusers", arch="sd1"))
    pipe = tiny_pipeline("sd1")
    layer = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_out[0]
    before = layer.bias.detach().clone()
    pipe.load_lora_weights(str(out), adapter_name="x")
    pipe.fuse_lora(lora_scale=1.0)
    torch.testing.assert_close(layer.base_layer.bias.detach() - before if hasattr(layer, "base_layer")
                               else layer.bias.detach() - before, bias.float(), rtol=1e-3, atol=1e-5)


def test_peft_output_loads_in_peft_model(tmp_path):
    source = build_network(tmp_path / "k.safetensors", "sd1", factor=FACTOR, rank=4, alpha=2.0, conv_rank=2,
                           modules=sample_modules("sd1"))
    convert_file(source, tmp_path / "adapter", ConvertOptions(target="peft", component="unet", fold=False))
    model = peft.PeftModel.from_pretrained(tiny_unet("sd1"), str(tmp_path / "adapter"))
    found = lora_layers(model.base_model.model, "default", "unet", "sd1")
    ours = {k: v for k, v in our_deltas(source).items() if k.startswith("lora_unet_")}
    assert_deltas_match(found, ours)


def test_lycoris_loads_our_kohya_output(tmp_path, monkeypatch):
    lycoris = pytest.importorskip("lycoris")
    import lycoris.wrapper

    # a diffusers-layout network in, kohya out: LyCORIS reads the kohya names as they are
    source = build_network(tmp_path / "d.safetensors", "sd1", factor=FACTOR, rank=4, layout="diffusers",
                           modules=sample_modules("sd1"))
    out = tmp_path / "k.safetensors"
    convert_file(source, out, ConvertOptions(target="kohya"))
    root = torch.nn.Module()
    root.unet, root.te = tiny_unet("sd1"), torch.nn.Module()
    root.te.text_model = tiny_clip(768, 12)  # kohya TE names keep the `text_model` level
    monkeypatch.setattr(lycoris.wrapper.LycorisNetwork, "LORA_PREFIX", "lora")
    logging.getLogger("lycoris").setLevel(logging.ERROR)
    network, weights = lycoris.wrapper.create_lycoris_from_weights(1.0, str(out), root)
    network.apply_to()
    _, unexpected = network.load_state_dict(weights, strict=False)
    assert not unexpected
    ours = our_deltas(source)
    found = {m.lora_name: m.get_diff_weight(multiplier=1.0)[0].float() for m in network.loras}
    assert_deltas_match(found, ours)


def _peft_unet(use_dora: bool, wrap: bool = True):
    unet = tiny_unet("sd1")
    targets = ["down_blocks.1.attentions.0.proj_in", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
               "up_blocks.1.resnets.0.conv1", "mid_block.attentions.0.transformer_blocks.0.ff.net.2"]
    config = peft.LoraConfig(r=4, lora_alpha=2, target_modules=targets, init_lora_weights=False, use_dora=use_dora,
                             rank_pattern={"up_blocks.1.resnets.0.conv1": 2}, alpha_pattern={"ff.net.2": 8})
    if wrap:
        model = peft.get_peft_model(unet, config)
    else:
        unet.add_adapter(config)  # what diffusers' training scripts do
        model = unet
    if use_dora:
        torch.manual_seed(0)
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.data.mul_(1.0 + 0.1 * torch.rand_like(param))
    return model, config


def test_diffusers_saved_network_converts_to_kohya(tmp_path):
    from peft.utils import get_peft_model_state_dict

    unet, config = _peft_unet(use_dora=False, wrap=False)
    state = get_peft_model_state_dict(unet)
    diffusers.StableDiffusionPipeline.save_lora_weights(str(tmp_path), unet_lora_layers=state,
                                                        unet_lora_adapter_metadata=config.to_dict())
    saved = tmp_path / "pytorch_lora_weights.safetensors"
    convert_file(saved, tmp_path / "k.safetensors", ConvertOptions(target="kohya"))
    assert_deltas_match(lora_layers(unet, "default", "unet", "sd1"), our_deltas(tmp_path / "k.safetensors"))


def test_peft_saved_dora_converts_to_kohya_and_back(tmp_path):
    model, _ = _peft_unet(use_dora=True)
    model.save_pretrained(str(tmp_path / "saved"))
    convert_file(tmp_path / "saved" / "adapter_model.safetensors", tmp_path / "k.safetensors", ConvertOptions(target="kohya"))
    net = load_network(tmp_path / "k.safetensors")
    lora_only = {name: m for name, m in net.modules.items()}
    assert all("dora_scale" in m for m in lora_only.values())
    magnitudes = {}
    for path, module in model.base_model.model.named_modules():
        if hasattr(module, "lora_magnitude_vector") and "default" in module.lora_magnitude_vector:
            magnitudes[candidates("sd1", "unet." + path)[0].module] = module.lora_magnitude_vector["default"].weight.detach()
    assert set(magnitudes) == set(lora_only)
    for name, magnitude in magnitudes.items():
        scale = lora_only[name]["dora_scale"]
        assert scale.shape[0] == magnitude.numel() and all(d == 1 for d in scale.shape[1:])
        assert torch.equal(scale.flatten(), magnitude.flatten())
    # the scale survives: ΔW factors of kohya = peft's lora delta (before the DoRA normalisation)
    for path, module in model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            name = candidates("sd1", "unet." + path)[0].module
            ours = net.modules[name]
            expected = module.lora_B["default"].weight.flatten(1).float() @ module.lora_A["default"].weight.flatten(1).float()
            expected = expected * module.scaling["default"]
            rank = ours["lora_down.weight"].shape[0]
            got = ours["lora_up.weight"].flatten(1).float() @ ours["lora_down.weight"].flatten(1).float() * (float(ours["alpha"]) / rank)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # and back to peft: peft loads it with the same magnitudes
    convert_file(tmp_path / "k.safetensors", tmp_path / "p", ConvertOptions(target="peft", fold=False))
    config = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    loaded = peft.PeftModel.from_pretrained(tiny_unet("sd1"), str(tmp_path / "p"))
    for path, module in loaded.base_model.model.named_modules():
        if hasattr(module, "lora_magnitude_vector") and "default" in module.lora_magnitude_vector:
            name = candidates("sd1", "unet." + path)[0].module
            assert torch.equal(module.lora_magnitude_vector["default"].weight.detach().flatten(), magnitudes[name].flatten())


# -- peft text-encoder adapters -----------------------------------------------------------------------------
TE_CASES = {  # (arch, --component): (diffusers component, width, layers, CLIPTextModelWithProjection)
    ("sd1", "te"): ("text_encoder", 768, 12, False),
    ("sdxl", "te1"): ("text_encoder", 768, 12, False),
    ("sdxl", "te2"): ("text_encoder_2", 1280, 32, True),
}


@pytest.mark.parametrize("arch, component", sorted(TE_CASES))
def test_peft_text_encoder_adapter_loads_in_transformers_model(tmp_path, arch, component):
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    prefix, width, layers, projection = TE_CASES[(arch, component)]
    source = build_network(tmp_path / "k.safetensors", arch, factor=FACTOR, rank=4, alpha=3.0, components=[component])
    out = tmp_path / "adapter"
    # CLIP-L alone fits SD1/SDXL/SD3/Flux: say which
    convert_file(source, out, ConvertOptions(target="peft", component=component, fold=False, arch=arch))
    config = json.loads((out / "adapter_config.json").read_text())
    state = load_file(out / "adapter_model.safetensors")
    model = tiny_clip(width, layers, projection)
    module_names = {name for name, _ in model.named_modules()}
    # transformers 5: CLIPTextModel has no `text_model.` level, CLIPTextModelWithProjection keeps it
    assert ("text_model.encoder.layers.0.mlp.fc1" in module_names) == projection
    wrapped = peft.get_peft_model(model, peft.LoraConfig(**config))
    loaded = set_peft_model_state_dict(wrapped, state)
    assert not loaded.unexpected_keys
    assert not [key for key in loaded.missing_keys if "lora_" in key]
    found = lora_layers(wrapped.base_model.model, "default", prefix, arch)
    ours = {name: change for name, change in our_deltas(source).items() if name.startswith(f"lora_{component}_")}
    assert len(found) == 6 * layers
    assert_deltas_match(found, ours)
    # the folder loads as a whole too, and converts back to the same kohya tensors (either spelling)
    model = peft.PeftModel.from_pretrained(tiny_clip(width, layers, projection), str(out))
    assert_deltas_match(lora_layers(model.base_model.model, "default", prefix, arch), ours)
    other = tmp_path / "other"
    other.mkdir()
    (other / "adapter_config.json").write_text(json.dumps(config))
    respelled = {(k.replace("base_model.model.encoder.", "base_model.model.text_model.encoder.") if not projection
                  else k.replace("base_model.model.text_model.", "base_model.model.")): v for k, v in state.items()}
    assert respelled != state
    from safetensors.torch import save_file

    save_file(respelled, other / "adapter_model.safetensors")
    original = load_network(source)
    for adapter in (out, other):
        back = tmp_path / f"back-{adapter.name}.safetensors"
        convert_file(adapter / "adapter_model.safetensors", back, ConvertOptions(target="kohya", arch=arch))
        net = load_network(back)
        assert set(net.modules) == set(original.modules)
        for name, module in original.modules.items():
            for suffix, tensor in module.tensors.items():
                assert torch.equal(net.modules[name][suffix], tensor), f"{adapter.name}: {name}.{suffix}"


def _module_tree(shapes: dict[str, tuple[int, int]]) -> torch.nn.Module:
    """A bare torch model with an nn.Linear(in, out) at every dotted path of `shapes`."""
    root = torch.nn.Module()
    for path, (rows, columns) in shapes.items():
        parent = root
        *outer, last = path.split(".")
        for part in outer:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        parent.add_module(last, torch.nn.Linear(columns, rows, bias=False))
    return root


@pytest.mark.parametrize("fold", [True, False])
def test_flux_mixed_ranks_load_in_peft_with_each_module_its_own_rank(tmp_path, fold):
    """Flux's top-level `proj_out` (kohya final_layer.linear) is also the tail of every single block's
    `proj_out`: a rank_pattern key for it must not reach them (peft matches keys as path tails)."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import load_file, save_file

    modules = ["lora_unet_single_blocks_0_linear2", "lora_unet_single_blocks_1_linear2", "lora_unet_final_layer_linear",
               "lora_unet_double_blocks_0_img_mlp_0"]
    source = build_network(tmp_path / "k.safetensors", "flux", factor=32, rank=4, alpha=2.0, modules=modules,
                           optional=("final_layer",))
    tensors = load_file(source)
    torch.manual_seed(1)
    final = "lora_unet_final_layer_linear"  # rank 2 and alpha 0.5 there, rank 4 / alpha 2 elsewhere
    tensors[f"{final}.lora_down.weight"] = 0.1 * torch.randn(2, tensors[f"{final}.lora_down.weight"].shape[1]).half()
    tensors[f"{final}.lora_up.weight"] = 0.1 * torch.randn(tensors[f"{final}.lora_up.weight"].shape[0], 2).half()
    tensors[f"{final}.alpha"] = torch.tensor(0.5).half()
    save_file(tensors, source)

    out = tmp_path / "d.safetensors"
    convert_file(source, out, ConvertOptions(target="diffusers", fold=fold))
    with open(out, "rb") as handle:
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    config = {key.split(".", 1)[1]: value for key, value in json.loads(header["__metadata__"]["lora_adapter_metadata"]).items()
              if key.startswith("transformer.")}
    assert "^proj_out" in config["rank_pattern"] and "proj_out" not in config["rank_pattern"]

    state = {k[len("transformer."):]: v.float() for k, v in load_file(out).items()}
    shapes = {k[: -len(".lora_A.weight")]: (state[k.replace("lora_A", "lora_B")].shape[0], v.shape[1])
              for k, v in state.items() if k.endswith(".lora_A.weight")}
    model = inject_adapter_in_model(peft.LoraConfig(**config), _module_tree(shapes))
    result = set_peft_model_state_dict(model, state)  # a wrong rank anywhere raises a size mismatch
    assert not [k for k in result.unexpected_keys if "lora_" in k]
    found = {}
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer):
            found[candidates("flux", f"transformer.{path}")[0].module] = module.get_delta_weight("default").float()
    assert set(found) == set(modules)
    assert_deltas_match(found, our_deltas(source))
    # and back to kohya: every module gets its own alpha back
    convert_file(out, tmp_path / "k2.safetensors", ConvertOptions(target="kohya"))
    assert_deltas_match(our_deltas(tmp_path / "k2.safetensors"), our_deltas(source))
