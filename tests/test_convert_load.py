"""lytools.convert.load_network: every layout into canonical kohya names, scales and parts exact."""

from __future__ import annotations

import json

import pytest
import torch

from lytools.arch import module_table
from lytools.convert import load_network
from lytools.convert.fuse import fold_scale, fuse_parts, split_fused
from lytools.errors import NetworkError
from lytools.io import open_file, write_safetensors
from lytools.testing import build_network


def _lora_delta(tensors):
    up = tensors["lora_up.weight"].float()
    down = tensors["lora_down.weight"].float()
    rank = down.shape[0]
    alpha = float(tensors["alpha"].float()) if "alpha" in tensors else rank
    return (up.reshape(up.shape[0], -1) @ down.reshape(rank, -1)) * (alpha / rank)


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl", "flux", "sd3"])
def test_kohya_layout_is_read_as_stored(tmp_path, arch):
    path = build_network(tmp_path / "k.safetensors", arch, rank=4, alpha=2.0)
    net = load_network(path)
    assert net.arch == arch and net.layout == "kohya"
    with open_file(path) as source:
        keys = set(source.keys())
        assert sum(len(v) for v in net.sources.values()) + len(net.stray) == len(keys)
        for name, module in net.modules.items():
            for suffix, tensor in module.tensors.items():
                stored = source.get(f"{name}.{suffix}")
                assert tensor.dtype == stored.dtype and torch.equal(tensor, stored)
    assert set(net.modules) <= set(module_table(arch))


@pytest.mark.parametrize("arch, layout", [
    ("sd1", "diffusers"), ("sd1", "comfy"), ("sd1", "peft"), ("sd1", "lycoris"),
    ("sdxl", "comfy"), ("sdxl", "peft"), ("flux", "lycoris"), ("flux", "comfy"),
])
def test_every_layout_lands_on_table_names(tmp_path, arch, layout):
    path = build_network(tmp_path / "n.safetensors", arch, layout=layout, rank=4,
                         components=("unet",) if layout in ("peft", "lycoris") else None)
    net = load_network(path)
    assert net.arch == arch
    assert not net.unmapped
    assert set(net.modules) <= set(module_table(arch))
    with open_file(path) as source:
        assert sum(len(v) for v in net.sources.values()) == len(source.keys())


def test_flux_parts_fuse_to_the_same_weight_change(tmp_path):
    path = build_network(tmp_path / "d.safetensors", "flux", layout="diffusers", rank=4, components=("unet",))
    net = load_network(path)
    fused = net.modules["lora_unet_single_blocks_0_linear1"]
    assert fused["lora_down.weight"].shape[0] == 16  # q, k, v, mlp parts of rank 4, stacked
    full = _lora_delta(fused.tensors)
    with open_file(path) as source:
        start = 0
        for part in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"):
            base = f"transformer.single_transformer_blocks.0.{part}"
            up = source.get(base + ".lora_B.weight").float()
            down = source.get(base + ".lora_A.weight").float()
            rows = up.shape[0]
            assert torch.equal(full[start:start + rows], up @ down)
            start += rows
        assert start == full.shape[0]


def test_diffusers_metadata_and_peft_config_give_the_scale(tmp_path):
    path = build_network(tmp_path / "adapter_model.safetensors", "sd1", layout="peft", rank=4)
    (tmp_path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 4, "lora_alpha": 2,
        "alpha_pattern": {"down_blocks.0.attentions.0.proj_in": 8}, "use_rslora": False,
    }))
    net = load_network(path)
    assert not net.notes
    proj = net.modules["lora_unet_down_blocks_0_attentions_0_proj_in"]
    other = net.modules["lora_unet_down_blocks_0_attentions_1_proj_in"]
    assert float(proj["alpha"]) == 8.0 and float(other["alpha"]) == 2.0
    # rsLoRA: scale lora_alpha / sqrt(r) -> kohya alpha = scale * r
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 4, "use_rslora": True}))
    assert float(load_network(path).modules["lora_unet_down_blocks_0_attentions_1_proj_in"]["alpha"]) == 8.0


def test_peft_without_config_is_noted(tmp_path):
    path = build_network(tmp_path / "x.safetensors", "sd1", layout="peft", rank=4)
    net = load_network(path)
    assert any("adapter_config.json" in note for note in net.notes)
    assert all("alpha" not in m for m in net.modules.values())


def test_old_processor_names_and_sdxl_diffusers_kohya_names(tmp_path):
    torch.manual_seed(0)
    tensors = {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight": torch.randn(4, 40),
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.up.weight": torch.randn(40, 4),
        "text_encoder.text_model.encoder.layers.0.self_attn.to_k_lora.down.weight": torch.randn(4, 96),
        "text_encoder.text_model.encoder.layers.0.self_attn.to_k_lora.up.weight": torch.randn(96, 4),
    }
    path = tmp_path / "old.safetensors"
    write_safetensors(path, tensors)
    net = load_network(path, arch="sd1")
    assert set(net.modules) == {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        "lora_te_text_model_encoder_layers_0_self_attn_k_proj",
    }
    sdxl = {
        "lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight": torch.randn(4, 80),
        "lora_unet_down_blocks_1_attentions_0_proj_in.lora_up.weight": torch.randn(80, 4),
        "lora_unet_down_blocks_1_attentions_0_proj_in.alpha": torch.tensor(2.0),
    }
    write_safetensors(tmp_path / "xl.safetensors", sdxl)
    net = load_network(tmp_path / "xl.safetensors", arch="sdxl")
    assert list(net.modules) == ["lora_unet_input_blocks_4_1_proj_in"]


def test_two_spellings_of_one_module_fail(tmp_path):
    tensors = {
        "lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight": torch.randn(4, 80),
        "lora_unet_down_blocks_1_attentions_0_proj_in.lora_up.weight": torch.randn(80, 4),
        "lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.randn(4, 80),
        "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.randn(80, 4),
    }
    path = tmp_path / "both.safetensors"
    write_safetensors(path, tensors)
    with pytest.raises(NetworkError, match="both.safetensors: modules .* are both lora_unet_input_blocks_4_1_proj_in"):
        load_network(path, arch="sdxl")


def test_fuse_and_split_are_exact():
    torch.manual_seed(1)
    down = torch.randn(4, 32).half()
    parts = [((0, 8), {"lora_down.weight": down, "lora_up.weight": torch.randn(8, 4).half(), "alpha": torch.tensor(2.0).half()}),
             ((8, 16), {"lora_down.weight": down.clone(), "lora_up.weight": torch.randn(8, 4).half(), "alpha": torch.tensor(2.0).half()})]
    fused = fuse_parts("m", parts, 24)
    assert fused["lora_down.weight"].shape == (4, 32) and torch.equal(fused["lora_up.weight"][16:], torch.zeros(8, 4).half())
    back = split_fused("m", fused, [(0, 8), (8, 16), (16, 24)])
    assert torch.equal(back[1]["lora_up.weight"], parts[1][1]["lora_up.weight"])
    # different downs and scales: stacked and block-diagonal, scales folded
    parts[1][1]["lora_down.weight"] = torch.randn(4, 32).half()
    parts[1][1]["alpha"] = torch.tensor(8.0).half()
    fused = fuse_parts("m", parts, 16)
    assert fused["lora_down.weight"].shape == (8, 32) and float(fused["alpha"]) == 8.0
    whole = _lora_delta(fused)
    for (start, stop), tensors in parts:
        torch.testing.assert_close(whole[start:stop], _lora_delta(tensors), rtol=2e-3, atol=2e-3)
    split = split_fused("m", fused, [(0, 8), (8, 16)])
    assert [s["lora_down.weight"].shape[0] for s in split] == [4, 4]
    assert torch.equal(split[0]["lora_down.weight"], parts[0][1]["lora_down.weight"])


def test_fold_power_of_two_is_exact():
    torch.manual_seed(2)
    module = {"lora_down.weight": torch.randn(4, 16).half(), "lora_up.weight": torch.randn(16, 4).half(), "alpha": torch.tensor(1.0)}
    folded = fold_scale("m", module)
    assert "alpha" not in folded
    assert torch.equal(_lora_delta(folded), _lora_delta(module))


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=25, deadline=None)
@given(ranks=st.lists(st.integers(1, 4), min_size=2, max_size=4), alphas=st.lists(st.sampled_from([0.5, 1.0, 2.0, 4.0]), min_size=4, max_size=4),
       share=st.booleans(), seed=st.integers(0, 1000))
def test_split_then_fuse_keeps_every_row(ranks, alphas, share, seed):
    """Property: parts -> fused -> parts (and fused -> parts -> fused) keep ΔW of every row range."""
    generator = torch.Generator().manual_seed(seed)
    rows, start = [], 0
    for _ in ranks:
        rows.append((start, start + 6))
        start += 6
    shared = torch.randn(ranks[0], 10, generator=generator)
    parts = []
    for index, ((a, b), rank) in enumerate(zip(rows, ranks)):
        down = shared if share else torch.randn(rank, 10, generator=generator)
        r = down.shape[0]
        parts.append(((a, b), {"lora_down.weight": down, "lora_up.weight": torch.randn(b - a, r, generator=generator),
                               "alpha": torch.tensor(alphas[index] * (1 if share else r))}))
    fused = fuse_parts("m", parts, start)
    whole = _lora_delta(fused)
    for (a, b), tensors in parts:
        torch.testing.assert_close(whole[a:b], _lora_delta(tensors), rtol=1e-5, atol=1e-5)
    for ((a, b), _), piece in zip(parts, split_fused("m", fused, rows)):
        torch.testing.assert_close(_lora_delta(piece), whole[a:b], rtol=1e-5, atol=1e-5)


def test_xlabs_and_onetrainer_flux_names(tmp_path):
    torch.manual_seed(3)
    tensors = {
        "double_blocks.0.processor.qkv_lora1.down.weight": torch.randn(4, 384),
        "double_blocks.0.processor.qkv_lora1.up.weight": torch.randn(1152, 4),
        "double_blocks.0.processor.proj_lora2.down.weight": torch.randn(4, 384),
        "double_blocks.0.processor.proj_lora2.up.weight": torch.randn(384, 4),
    }
    write_safetensors(tmp_path / "xlabs.safetensors", tensors)
    net = load_network(tmp_path / "xlabs.safetensors", arch="flux")
    assert set(net.modules) == {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_0_txt_attn_proj"}
    onetrainer = {
        f"lora_transformer_single_transformer_blocks_0_attn_to_{p}.{s}": t
        for p in "qkv" for s, t in (("lora_down.weight", torch.randn(4, 384)), ("lora_up.weight", torch.randn(384, 4)),
                                    ("alpha", torch.tensor(4.0)))
    }
    write_safetensors(tmp_path / "ot.safetensors", onetrainer)
    net = load_network(tmp_path / "ot.safetensors", arch="flux")
    fused = net.modules["lora_unet_single_blocks_0_linear1"]
    assert fused["lora_up.weight"].shape == (2688, 12)  # q, k, v rows filled, mlp rows zero
    assert torch.equal(fused["lora_up.weight"][1152:], torch.zeros(1536, 12))


def test_peft_loha_adapter_gets_its_scale(tmp_path):
    peft = pytest.importorskip("peft")
    model = torch.nn.Sequential(torch.nn.Linear(16, 24))
    wrapped = peft.get_peft_model(model, peft.LoHaConfig(r=4, alpha=2, target_modules=["0"], init_weights=False))
    wrapped.save_pretrained(str(tmp_path))
    net = load_network(tmp_path / "adapter_model.safetensors", arch="sd1")
    assert net.unmapped == ["base_model.model.0"]  # not an SD module, kept under its stored name
    module = net.modules["base_model.model.0"]
    assert set(module.tensors) >= {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}
    assert float(module["alpha"]) == 2.0  # scale alpha / r = 0.5, as peft applies it
    from lytools.algos import delta

    layer = wrapped.base_model.model[0]
    torch.testing.assert_close(delta(module, (24, 16)).float(), layer.get_delta_weight("default").float(), rtol=1e-4, atol=1e-6)


def test_comfy_linear1_qkv_is_the_first_rows_of_linear1(tmp_path):
    torch.manual_seed(4)
    tensors = {
        "diffusion_model.single_blocks.1.linear1_qkv.lora_down.weight": torch.randn(4, 384),
        "diffusion_model.single_blocks.1.linear1_qkv.lora_up.weight": torch.randn(1152, 4),
        "diffusion_model.single_blocks.1.linear1_qkv.alpha": torch.tensor(2.0),
    }
    write_safetensors(tmp_path / "c.safetensors", tensors)
    net = load_network(tmp_path / "c.safetensors", arch="flux")
    fused = net.modules["lora_unet_single_blocks_1_linear1"]
    assert torch.equal(fused["lora_up.weight"][:1152], tensors["diffusion_model.single_blocks.1.linear1_qkv.lora_up.weight"])
    assert not fused["lora_up.weight"][1152:].any() and float(fused["alpha"]) == 2.0


def test_peft_paths_follow_the_wrapped_model_class():
    from lytools.convert.names import peft_path

    path = "text_model.encoder.layers.0.self_attn.q_proj"
    # CLIPTextModel (transformers 5: no text_model level) for SD1/SD2/SDXL te1/Flux te1
    for arch in ("sd1", "sd2", "sdxl", "flux"):
        assert peft_path(arch, "text_encoder", path) == "encoder.layers.0.self_attn.q_proj"
    # CLIPTextModelWithProjection keeps it: SDXL te2, SD3 te1 and te2; T5 and denoiser paths never change
    assert peft_path("sdxl", "text_encoder_2", path) == path
    assert peft_path("sd3", "text_encoder", path) == peft_path("sd3", "text_encoder_2", path) == path
    assert peft_path("flux", "text_encoder_2", "encoder.block.0.layer.0.SelfAttention.q") == "encoder.block.0.layer.0.SelfAttention.q"
    assert peft_path("sd1", "unet", "down_blocks.0.attentions.0.proj_in") == "down_blocks.0.attentions.0.proj_in"


def test_config_scale_follows_peft_patterns_and_reads_ambiguous_keys_for_their_module():
    from lytools.convert.load import config_scale

    config = {"r": 4, "lora_alpha": 2, "rank_pattern": {"proj_out": 2}, "alpha_pattern": {"proj_out": 0.5}}
    assert config_scale(config, "proj_out", 2) == 0.25
    # peft would give single_transformer_blocks.N.proj_out rank 2 too (a tail match), which the file
    # contradicts (rank 4 there): the key was written for the top-level module only
    assert config_scale(config, "single_transformer_blocks.3.proj_out", 4) == 0.5
    anchored = {"r": 4, "lora_alpha": 2, "rank_pattern": {"^proj_out": 2}, "alpha_pattern": {"^proj_out": 0.5}}
    assert config_scale(anchored, "proj_out", 2) == 0.25
    assert config_scale(anchored, "single_transformer_blocks.3.proj_out", 4) == 0.5
    # a tail match of the same rank is what peft does: applied
    assert config_scale({"r": 4, "lora_alpha": 2, "alpha_pattern": {"to_q": 8}}, "blocks.0.attn.to_q", 4) == 2.0
    # a key that is not a valid expression is matched as text, not a crash
    assert config_scale({"r": 4, "lora_alpha": 2, "alpha_pattern": {"weird[": 8}}, "a.weird[", 4) == 2.0


def test_pattern_keys_anchor_only_paths_that_are_tails_of_others():
    from lytools.convert.layout import lora_config, pattern_keys

    keys = pattern_keys(["proj_out", "single_transformer_blocks.0.proj_out", "x_embedder", "attn.to_q"])
    assert keys == {"proj_out": "^proj_out", "single_transformer_blocks.0.proj_out": "single_transformer_blocks.0.proj_out",
                    "x_embedder": "x_embedder", "attn.to_q": "attn.to_q"}
    config = lora_config([("proj_out", 2, 2.0), ("single_transformer_blocks.0.proj_out", 4, 4.0),
                          ("single_transformer_blocks.1.proj_out", 4, 4.0)], False)
    assert config["rank_pattern"] == {"^proj_out": 2} and config["alpha_pattern"] == {"^proj_out": 2}
    assert config["target_modules"][0] == "proj_out"  # target_modules are plain names (peft does not read them as expressions)
