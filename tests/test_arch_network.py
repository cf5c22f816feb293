"""lytools.arch.network: key layouts and the architecture of network files."""

from __future__ import annotations

import pytest

from lytools import testing
from lytools.arch import detect_network, layout_of_module, split_network_key
from lytools.io import read_header


@pytest.mark.parametrize(
    "key,expected",
    [
        ("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", ("lora_unet_down_blocks_0_attentions_0_proj_in", "lora_down.weight")),
        ("lycoris_transformer_blocks_0_attn_to_q.lokr_w1", ("lycoris_transformer_blocks_0_attn_to_q", "lokr_w1")),
        ("unet.down_blocks.0.attentions.0.proj_in.lora_A.weight", ("unet.down_blocks.0.attentions.0.proj_in", "lora_down.weight")),
        ("unet.mid_block.attentions.0.proj_in.lora.up.weight", ("unet.mid_block.attentions.0.proj_in", "lora_up.weight")),
        ("text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.down.weight",
         ("text_encoder.text_model.encoder.layers.0.mlp.fc1", "lora_down.weight")),
        ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight",
         ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0", "lora_up.weight")),
        ("text_encoder.text_model.encoder.layers.3.self_attn.to_v_lora.down.weight",
         ("text_encoder.text_model.encoder.layers.3.self_attn.v_proj", "lora_down.weight")),
        ("base_model.model.down_blocks.1.attentions.0.proj_out.lora_B.default.weight",
         ("base_model.model.down_blocks.1.attentions.0.proj_out", "lora_up.weight")),
        ("transformer.transformer_blocks.0.attn.to_q.lora_magnitude_vector", ("transformer.transformer_blocks.0.attn.to_q", "dora_scale")),
        ("diffusion_model.double_blocks.0.img_attn.qkv.hada_w2_b", ("diffusion_model.double_blocks.0.img_attn.qkv", "hada_w2_b")),
        ("double_blocks.3.processor.qkv_lora2.down.weight", ("double_blocks.3.processor.qkv_lora2", "lora_down.weight")),
        ("text_projection.bias", None),
        ("noperiod", None),
    ],
)
def test_split_network_key(key, expected):
    assert split_network_key(key) == expected


def test_layout_of_module():
    assert layout_of_module("lora_te2_text_model_encoder_layers_0_mlp_fc1") == "kohya"
    assert layout_of_module("lora_transformer_single_transformer_blocks_0_proj_mlp") == "kohya"
    assert layout_of_module("lycoris_down_blocks_1_attentions_0_proj_in") == "lycoris"
    assert layout_of_module("base_model.model.down_blocks.1") == "peft"
    assert layout_of_module("text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1") == "comfy"
    assert layout_of_module("double_blocks.0.processor.proj_lora1") == "xlabs"
    assert layout_of_module("transformer.single_transformer_blocks.0.attn.to_q") == "diffusers"


@pytest.mark.parametrize("factor", [1, 16])
@pytest.mark.parametrize(
    "arch,options,layout",
    [
        ("sd1", {"modules": "c3lier"}, "kohya"), ("sd2", {}, "kohya"), ("sdxl", {"layout": "diffusers"}, "diffusers"),
        ("sdxl", {"layout": "lycoris"}, "lycoris"), ("flux", {"layout": "peft"}, "peft"), ("flux", {"layout": "comfy"}, "comfy"),
        ("sd3", {"optional": ["embedders"]}, "kohya"), ("sd3", {"layout": "diffusers", "components": ["unet"]}, "diffusers"), ("sd1", {"algo": "loha"}, "kohya"), ("sd2", {"components": ["te"]}, "kohya"),
    ],
)
def test_detect_synthetic_networks(tmp_path, arch, options, layout, factor):
    if factor == 1 and arch in ("flux", "sd3", "sdxl"):
        options = {**options, "components": options.get("components", ["unet"]) if layout not in ("peft",) else ["unet"]}
    path = testing.build_network(tmp_path / "n.safetensors", arch, factor=factor, rank=2, **options)
    found = detect_network(read_header(path).tensors)
    assert (found.arch, found.layout, found.scale) == (arch, layout, factor)
    assert found.matched == len(found.modules) and not found.stray


def test_sdxl_diffusers_named_kohya_and_xlabs():
    shapes = {
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn2_to_k.lora_down.weight": (4, 2048),
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn2_to_k.lora_up.weight": (640, 4),
    }
    assert detect_network(shapes).arch == "sdxl"
    xlabs = {
        "double_blocks.0.processor.qkv_lora1.down.weight": (16, 3072), "double_blocks.0.processor.qkv_lora1.up.weight": (9216, 16),
        "double_blocks.0.processor.proj_lora2.down.weight": (16, 3072), "double_blocks.0.processor.proj_lora2.up.weight": (3072, 16),
    }
    found = detect_network(xlabs)
    assert (found.arch, found.layout, found.matched) == ("flux", "xlabs", 2)


def test_sd1_vs_sd2_by_width_and_metadata_tie_break():
    def te(width):
        name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
        return {f"{name}.lora_down.weight": (4, width), f"{name}.lora_up.weight": (width, 4)}

    assert detect_network(te(768)).arch == "sd1"
    assert detect_network(te(1024)).arch == "sd2"
    clip_l = {k.replace("lora_te_", "lora_te1_"): v for k, v in te(768).items()}
    tie = detect_network(clip_l)
    assert tie.arch == "unknown" and any("equally" in note for note in tie.notes)
    assert detect_network(clip_l, {"ss_base_model_version": "sdxl_base_v1-0"}).arch == "sdxl"
    contradiction = detect_network(te(1024), {"ss_base_model_version": "sd_v1"})
    assert contradiction.arch == "sd2" and any("metadata says sd1" in note for note in contradiction.notes)


def test_unknown_and_mixed():
    found = detect_network({"lora_unet_foo_bar.lora_down.weight": (4, 8), "lora_unet_foo_bar.lora_up.weight": (8, 4)})
    assert found.arch == "unknown" and found.layout == "kohya"
    assert detect_network({"a.b": (3,)}).notes == ["no network modules found"]
    mixed = detect_network({
        "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": (4, 1280, 1, 1),
        "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": (1280, 4, 1, 1),
        "unet.mid_block.attentions.0.proj_out.lora_A.weight": (4, 1280),
        "unet.mid_block.attentions.0.proj_out.lora_B.weight": (1280, 4),
    })
    assert mixed.layout == "mixed" and mixed.layouts == {"kohya": 1, "diffusers": 1}


def test_bundled_embeddings_and_stable_cascade_are_named():
    shapes = {
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": (4, 768),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": (768, 4),
        "bundle_emb.mychar.string_to_param.*": (2, 768),
    }
    found = detect_network(shapes)
    assert found.arch == "sd1" and found.stray == ["bundle_emb.mychar.string_to_param.*"]
    assert any("1 bundled textual-inversion" in note for note in found.notes)
    cascade = detect_network({"lora_prior_unet_down_levels_0.lora_down.weight": (4, 64), "lora_prior_unet_down_levels_0.lora_up.weight": (64, 4)})
    assert cascade.arch == "unknown" and any("Stable Cascade" in note for note in cascade.notes)


def test_bare_peft_text_encoder_paths_are_matched_by_shape(tmp_path):
    """A peft adapter of SDXL's second text encoder (CLIP-G, 32 layers of width 1280) shares its
    layer paths with CLIP-L and SD2's OpenCLIP: its shapes rule SD2 out (it was detected as sd2),
    and SD3's CLIP-G fits it exactly as well, so detection says so instead of guessing."""
    from lytools.testing import build_network

    te2 = build_network(tmp_path / "te2.safetensors", "sdxl", layout="peft", components=["te2"], factor=8)
    found = detect_network(read_header(te2).tensors)
    assert found.arch == "unknown" and any("fit sdxl and sd3 equally" in note for note in found.notes)
    assert detect_network(read_header(te2).tensors, {"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}).arch == "sdxl"
    sd2 = build_network(tmp_path / "sd2.safetensors", "sd2", layout="peft", components=["te"], factor=8)
    assert detect_network(read_header(sd2).tensors).arch == "sd2"


@pytest.mark.parametrize("algo", ["ia3", "oft"])
def test_one_width_modules_are_placed_by_that_width(algo):
    """IA3 vectors and OFT blocks give one width of their layer, not (out, in): it still tells SD1
    from SD2, whose kohya names are the same (such files were 'unknown')."""
    import torch

    from lytools.arch import module_table
    from lytools.testing import shrink_shape

    table = module_table("sd1")
    names = [n for n, target in table.items() if target.kind in ("linear", "conv3x3")][:30]
    tensors = {}
    for name in names:
        out = shrink_shape(table[name].shape, 8)[0]
        if algo == "ia3":
            tensors[f"{name}.weight"] = torch.ones(out)
        else:
            tensors[f"{name}.oft_blocks"] = torch.zeros(out // 4, 4, 4)
    found = detect_network(tensors)
    assert (found.arch, found.scale) == ("sd1", 8), found.notes


def _text_encoders(arch: str, components: list[str], rename: tuple[str, str] | None = None) -> dict:
    """Shapes of a kohya network of `arch`'s text encoders only (factor 8; `rename` a prefix)."""
    plan = testing.network_plan(arch, components=components, factor=8, optional=("train_t5xxl",))
    shapes = {entry.name: entry.shape for entry in plan.entries}
    if rename:
        shapes = {name.replace(rename[0], rename[1], 1): shape for name, shape in shapes.items()}
    return shapes


@pytest.mark.parametrize(
    "arch,components,rename,expected,tied",
    [
        # OneTrainer's Flux T5 is lora_te2_ with T5 module names: no CLIP-G has those
        ("flux", ["te1", "te3"], ("lora_te3_", "lora_te2_"), "flux", ()),
        ("sd3", ["te1", "te2", "te3"], None, "sd3", ()),
        # CLIP-L and CLIP-G are the same models in SDXL and SD3; T5 (sd-scripts' lora_te3_) in SD3 and Flux
        ("sdxl", ["te1", "te2"], None, "unknown", ("sdxl", "sd3")),
        ("sd3", ["te1", "te2"], None, "unknown", ("sdxl", "sd3")),
        ("flux", ["te1", "te3"], None, "unknown", ("sd3", "flux")),
        ("sdxl", ["te1"], None, "unknown", ("sdxl", "sd3", "flux")),
    ],
)
def test_text_encoder_only_networks(arch, components, rename, expected, tied):
    found = detect_network(_text_encoders(arch, components, rename))
    assert (found.arch, found.tied) == (expected, tied)
    assert found.matched == (len(found.modules) if expected != "unknown" else 0)


@pytest.mark.parametrize(
    "components,metadata,expected",
    [
        (["te1", "te2"], {"modelspec.architecture": "stable-diffusion-3-medium/lora"}, "sd3"),
        (["te1", "te2"], {"ss_base_model_version": "sdxl_base_v1-0"}, "sdxl"),
        (["te1", "te2"], {"ss_base_model_version": "5-large"}, "sd3"),
        (["te1", "te3"], {"ss_base_model_version": "flux1"}, "flux"),
        (["te1", "te3"], {"modelspec.architecture": "stable-diffusion-3-5-large/lora"}, "sd3"),
        # Chroma networks use Flux's names: its claim picks flux (it was left a tie)
        (["te3"], {"ss_base_model_version": "chroma"}, "flux"),
        (["te1"], {"modelspec.architecture": "flux-1-dev/lora"}, "flux"),
    ],
)
def test_metadata_breaks_text_encoder_ties(components, metadata, expected):
    found = detect_network(_text_encoders("sd3", components), metadata)
    assert (found.arch, found.tied, found.notes) == (expected, (), [])


def test_metadata_outside_a_tie_leaves_it_and_chroma_is_not_a_contradiction(tmp_path):
    tie = detect_network(_text_encoders("sdxl", ["te1", "te2"]), {"ss_base_model_version": "sd_v1"})
    assert (tie.arch, tie.tied) == ("unknown", ("sdxl", "sd3"))
    flux = testing.build_network(tmp_path / "flux.safetensors", "flux", factor=16, components=["unet"])
    found = detect_network(read_header(flux).tensors, {"ss_base_model_version": "chroma"})
    assert (found.arch, found.notes) == ("flux", [])
    assert "metadata says sd3" in detect_network(read_header(flux).tensors, {"ss_base_model_version": "medium"}).notes[0]
