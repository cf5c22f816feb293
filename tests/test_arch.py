"""lytools.arch: checkpoint detection, kohya/diffusers tables and the resolver, against the manifests."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lytools import testing
from lytools.arch import (
    Resolver,
    alias_table,
    checkpoint_manifest,
    detect_checkpoint,
    diffusers_table,
    kohya_to_diffusers,
    module_table,
)
from lytools.arch.keymap import named_modules
from lytools.io import read_header

SHARED = Path(os.environ.get("LYTOOLS_SHARED") or Path(__file__).resolve().parents[1].parent / "shared")
MANIFESTS = SHARED / "fixtures" / "manifests"


def full_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v[0]) for k, v in checkpoint_manifest(arch)["tensors"].items()}


# -- shipped data equals the shared manifests ----------------------------------------------------
@pytest.mark.parametrize("name", sorted(p.stem for p in MANIFESTS.glob("*.json")) if MANIFESTS.is_dir() else [])
def test_shipped_tables_equal_the_shared_manifests(name):
    from lytools.arch.manifests import _load

    assert _load(name) == json.loads((MANIFESTS / f"{name}.json").read_text())


# -- detection on full-size key sets ------------------------------------------------------------
@pytest.mark.parametrize(
    "arch,layout,variant",
    [("sd1", "ldm", None), ("sd2", "ldm", None), ("sdxl", "sgm", "base"), ("sd3", "mmdit", "medium"), ("flux", "bfl", "dev")],
)
def test_detect_full_manifest(arch, layout, variant):
    found = detect_checkpoint(full_shapes(arch))
    assert (found.arch, found.layout, found.variant, found.scale) == (arch, layout, variant, 1)
    assert found.prefix == "model.diffusion_model."
    assert found.prediction == "unknown"


def test_detect_bare_flux_and_schnell_and_chroma():
    bare = {k[len("model.diffusion_model."):]: v for k, v in full_shapes("flux").items() if k.startswith("model.")}
    found = detect_checkpoint(bare)
    assert (found.arch, found.prefix, found.variant, found.blocks) == ("flux", "", "dev", {"double_blocks": 19, "single_blocks": 38})
    schnell = {k: v for k, v in bare.items() if not k.startswith("guidance_in.")}
    assert detect_checkpoint(schnell).variant == "schnell"
    wrapped = {"diffusion_model." + k: v for k, v in schnell.items()}
    assert detect_checkpoint(wrapped).prefix == "diffusion_model."
    chroma = dict(schnell)
    chroma["distilled_guidance_layer.in_proj.weight"] = (3072, 64)
    assert detect_checkpoint(chroma).arch == "chroma"


def test_detect_text_encoder_only_and_unknown():
    sd2 = {k: v for k, v in full_shapes("sd2").items() if k.startswith("cond_stage_model.")}
    found = detect_checkpoint(sd2)
    assert (found.arch, found.text_encoder_only, found.prefix) == ("sd2", True, None)
    sd3_te = {k: v for k, v in full_shapes("sd3").items() if k.startswith("text_encoders.")}
    assert detect_checkpoint(sd3_te).arch == "sd3"
    flux_te = {k: v for k, v in full_shapes("flux").items() if k.startswith("text_encoders.")}
    assert detect_checkpoint(flux_te).arch == "flux"
    nothing = detect_checkpoint({"foo.weight": (3, 3), "bar": (1,)})
    assert (nothing.arch, nothing.layout) == ("unknown", "unknown")


def test_detect_prediction_from_metadata_only():
    shapes = full_shapes("sd2")
    assert detect_checkpoint(shapes).prediction == "unknown"
    assert detect_checkpoint(shapes, {"modelspec.prediction_type": "v"}).prediction == "v"
    assert detect_checkpoint(shapes, {"ss_v_parameterization": "True"}).prediction == "v"
    assert detect_checkpoint(shapes, {"modelspec.prediction_type": "epsilon"}).prediction == "epsilon"
    conflict = detect_checkpoint(shapes, {"modelspec.prediction_type": "epsilon", "ss_v_parameterization": "True"})
    assert conflict.prediction == "unknown" and conflict.notes
    claimed = detect_checkpoint(shapes, {"modelspec.architecture": "stable-diffusion-xl-v1-base"})
    assert claimed.arch == "sd2" and any("metadata says sdxl" in n for n in claimed.notes)


def test_detect_sdxl_refiner_like_and_inpaint():
    shapes = full_shapes("sdxl")
    shapes["model.diffusion_model.input_blocks.0.0.weight"] = (320, 9, 3, 3)
    assert detect_checkpoint(shapes).variant == "inpaint"
    sd1 = full_shapes("sd1")
    sd1["model.diffusion_model.input_blocks.0.0.weight"] = (320, 8, 3, 3)
    assert detect_checkpoint(sd1).variant == "instruct-pix2pix"
    refiner = {k: v for k, v in full_shapes("sdxl").items()}
    refiner["model.diffusion_model.input_blocks.0.0.weight"] = (384, 4, 3, 3)
    for key in [k for k in refiner if k.endswith("attn2.to_k.weight")]:
        refiner[key] = (refiner[key][0], 1280)
    assert (detect_checkpoint(refiner).arch, detect_checkpoint(refiner).variant) == ("sdxl", "refiner")


# -- tables ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,count", [("sd1", 350), ("sd2", 416), ("sdxl", 1052), ("flux", 552)])
def test_module_table_matches_lora_names(arch, count):
    table = module_table(arch)
    # Flux adds its two final_layer modules by rule (optional "final_layer"), beside the manifest's 552
    extra = {name for name, target in table.items() if target.optional == "final_layer"}
    assert extra == ({"lora_unet_final_layer_linear", "lora_unet_final_layer_adaLN_modulation_1"} if arch == "flux" else set())
    assert len(table) - len(extra) == count
    shapes = full_shapes(arch)
    for name, target in table.items():
        full = shapes[target.key]
        if target.rows is not None:
            assert target.fused_shape == full
            assert target.shape == (target.rows[1] - target.rows[0],) + full[1:]
        else:
            assert target.shape == full, name


def test_fused_rows():
    sd2 = module_table("sd2")
    rows = [sd2[f"lora_te_text_model_encoder_layers_5_self_attn_{p}_proj"].rows for p in "qkv"]
    assert rows == [(0, 1024), (1024, 2048), (2048, 3072)]
    te2 = module_table("sdxl")["lora_te2_text_model_encoder_layers_31_self_attn_v_proj"]
    assert (te2.key, te2.rows, te2.part) == ("conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight", (2560, 3840), "v")
    linear1 = module_table("flux")["lora_unet_single_blocks_7_linear1"]
    assert linear1.parts == (("q", (0, 3072)), ("k", (3072, 6144)), ("v", (6144, 9216)), ("mlp", (9216, 21504)))
    parts = kohya_to_diffusers("flux")["lora_unet_single_blocks_7_linear1"]
    assert [p.diffusers for p in parts] == [
        "transformer.single_transformer_blocks.7.attn.to_q", "transformer.single_transformer_blocks.7.attn.to_k",
        "transformer.single_transformer_blocks.7.attn.to_v", "transformer.single_transformer_blocks.7.proj_mlp",
    ]
    assert [p.module_rows for p in parts] == [(0, 3072), (3072, 6144), (6144, 9216), (9216, 21504)]


def test_sd3_table_by_rule():
    table = module_table("sd3")
    qkv = table["lora_unet_joint_blocks_0_x_block_attn_qkv"]
    assert qkv.key == "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"
    assert qkv.parts == (("q", (0, 1536)), ("k", (1536, 3072)), ("v", (3072, 4608)))
    assert "lora_unet_joint_blocks_23_context_block_mlp_fc1" not in table  # the last context block has no mlp
    assert table["lora_te2_text_model_encoder_layers_0_self_attn_q_proj"].key.startswith("text_encoders.clip_g.")
    assert sum(1 for t in table.values() if t.component == "unet" and t.optional is None) == 24 * 10 - 3
    split = diffusers_table("sd3")["transformer.transformer_blocks.3.attn.add_k_proj"]
    assert (split.kohya, split.key_rows) == ("lora_unet_joint_blocks_3_context_block_attn_qkv", (1536, 3072))


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl", "flux", "sd3"])
def test_every_kohya_module_resolves_to_its_key_and_back(arch):
    resolver = Resolver(full_shapes(arch))
    for name, target in module_table(arch).items():
        found = resolver.resolve(name)
        assert found is not None, name
        assert (found.module, found.key, found.rows, found.shape) == (name, target.key, target.rows, target.shape)
    shapes = full_shapes(arch)
    for diffusers, entry in diffusers_table(arch).items():
        if entry.key not in shapes:
            assert arch == "sd3" and named_modules(arch)[entry.kohya].optional == "sd35", diffusers
            continue  # SD3.5 names (attn2, blocks 24-37) have no key in SD3 medium
        found = resolver.resolve(diffusers)
        assert found is not None, diffusers
        assert (found.key, found.rows) == (entry.key, entry.key_rows)
        if entry.kohya:
            assert found.module == entry.kohya


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl", "flux"])
def test_every_alias_lands_on_a_real_key(arch):
    resolver = Resolver(full_shapes(arch))
    for alias, target in alias_table(arch).items():
        found = resolver.resolve(alias)
        assert found is not None and found.key == target.key, alias


def test_sdxl_diffusers_named_aliases():
    resolver = Resolver(full_shapes("sdxl"))
    found = resolver.resolve("lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn2_to_k")
    assert found.module == "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k"
    assert found.key == "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight"
    up = resolver.resolve("lora_unet_up_blocks_0_upsamplers_0_conv")
    assert up.key == "model.diffusion_model.output_blocks.2.2.conv.weight"


def test_spellings_and_full_preset_names_sd1():
    resolver = Resolver(full_shapes("sd1"))
    key = "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"
    for name in (
        "lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_k",
        "unet.down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k",
        "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k",
        "lycoris_down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_k",
        "diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k",
        "lora_unet_input_blocks_2_1_transformer_blocks_0_attn2_to_k",
    ):
        found = resolver.resolve(name)
        assert found is not None and found.key == key and found.shape == (320, 768), name
    examples = {
        "lora_unet_up_blocks_1_attentions_2_proj_out": "output_blocks.5.1.proj_out.weight",
        "lora_unet_down_blocks_1_resnets_0_conv_shortcut": "input_blocks.4.0.skip_connection.weight",
        "lora_unet_up_blocks_0_upsamplers_0_conv": "output_blocks.2.1.conv.weight",
        "lora_unet_down_blocks_2_downsamplers_0_conv": "input_blocks.9.0.op.weight",
        "lora_unet_mid_block_resnets_1_time_emb_proj": "middle_block.2.emb_layers.1.weight",
        "lora_unet_conv_in": "input_blocks.0.0.weight",
        "lora_unet_conv_out": "out.2.weight",
        "lora_unet_time_embedding_linear_1": "time_embed.0.weight",
        "lora_unet_down_blocks_0_resnets_0_norm1": "input_blocks.1.0.in_layers.0.weight",
    }
    for name, key in examples.items():
        assert resolver.resolve(name).key == "model.diffusion_model." + key, name
    norm = resolver.resolve("lora_te_text_model_final_layer_norm")
    assert norm.key == "cond_stage_model.transformer.text_model.final_layer_norm.weight" and not norm.in_table
    assert resolver.resolve("lora_unet_not_a_module") is None


def test_openclip_full_preset_names_sd2():
    resolver = Resolver(full_shapes("sd2"))
    assert resolver.resolve("lora_te_text_model_encoder_layers_3_layer_norm2").key == "cond_stage_model.model.transformer.resblocks.3.ln_2.weight"
    q23 = resolver.resolve("lora_te_text_model_encoder_layers_23_self_attn_k_proj")
    assert (q23.key, q23.rows) == ("cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight", (1024, 2048))


def test_flux_split_names_on_bare_and_diffusers_files(tmp_path):
    bare = {k[len("model.diffusion_model."):]: v for k, v in full_shapes("flux").items() if k.startswith("model.")}
    resolver = Resolver(bare)
    to_k = resolver.resolve("transformer.single_transformer_blocks.2.attn.to_k")
    assert (to_k.key, to_k.rows, to_k.shape) == ("single_blocks.2.linear1.weight", (3072, 6144), (3072, 3072))
    mlp = resolver.resolve("lora_transformer_single_transformer_blocks_2_proj_mlp")
    assert (mlp.rows, mlp.shape) == ((9216, 21504), (12288, 3072))
    # a fused kohya module on a diffusers-layout (split) file: four placements, rows of the module
    path = testing.build_checkpoint(tmp_path / "flux-diffusers.safetensors", "flux", layout="diffusers", factor=32, keep_blocks=1)
    split = Resolver(read_header(path).tensors)
    assert split.checkpoint.layout == "diffusers"
    fused = split.resolve("lora_unet_single_blocks_0_linear1")
    assert [p.key for p in fused.placements] == [
        "single_transformer_blocks.0.attn.to_q.weight", "single_transformer_blocks.0.attn.to_k.weight",
        "single_transformer_blocks.0.attn.to_v.weight", "single_transformer_blocks.0.proj_mlp.weight",
    ]
    assert [p.module_rows for p in fused.placements] == [(0, 96), (96, 192), (192, 288), (288, 672)]
    assert fused.shape == (672, 96)


def test_resolver_on_shrunk_checkpoints_scales_rows(tmp_path):
    path = testing.build_checkpoint(tmp_path / "sdxl.safetensors", "sdxl", components=["unet", "clip_g"], factor=16)
    resolver = Resolver(read_header(path).tensors)
    assert resolver.checkpoint.scale == 16
    v = resolver.resolve("lora_te2_text_model_encoder_layers_0_self_attn_v_proj")
    assert (v.rows, v.shape) == ((160, 240), (80, 80))
    for name, target in module_table("sdxl").items():
        if target.component in ("unet", "te2"):
            found = resolver.resolve(name)
            assert found is not None and found.shape == testing.shrink_shape(target.shape, 16), name


def test_resolver_on_diffusers_unet_file(tmp_path):
    path = testing.build_checkpoint(tmp_path / "unet.safetensors", "sdxl", layout="diffusers", factor=16)
    resolver = Resolver(read_header(path).tensors)
    found = resolver.resolve("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q")
    assert found.key == "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    assert resolver.resolve("lora_unet_conv_in").key == "conv_in.weight"


def test_generic_table_for_unknown_arch():
    shapes = {"model.diffusion_model.blocks.0.attn.qkv.weight": (96, 32), "model.diffusion_model.blocks.0.attn.qkv.bias": (96,)}
    resolver = Resolver(shapes)
    assert resolver.checkpoint.arch == "unknown"
    found = resolver.resolve("lora_unet_blocks_0_attn_qkv")
    assert found.key == "model.diffusion_model.blocks.0.attn.qkv.weight"
    assert resolver.resolve("diffusion_model.blocks.0.attn.qkv").key == "model.diffusion_model.blocks.0.attn.qkv.weight"


def test_old_sd1_text_encoder_names_resolve():
    shapes = full_shapes("sd1")
    aliases = checkpoint_manifest("sd1")["aliases"]
    old = {(next((o for o, n in aliases.items() if n == key), key)): shape for key, shape in shapes.items()}
    assert "cond_stage_model.transformer.encoder.layers.0.mlp.fc1.weight" in old
    resolver = Resolver(old)
    assert resolver.checkpoint.arch == "sd1"
    found = resolver.resolve("lora_te_text_model_encoder_layers_0_mlp_fc1")
    assert found.key == "cond_stage_model.transformer.encoder.layers.0.mlp.fc1.weight"


def test_sd3_variants_from_blocks():
    shapes = full_shapes("sd3")
    assert detect_checkpoint(shapes).variant == "medium"
    with_attn2 = dict(shapes)
    with_attn2["model.diffusion_model.joint_blocks.0.x_block.attn2.qkv.weight"] = (4608, 1536)
    assert detect_checkpoint(with_attn2).variant == "3.5-medium"
    deeper = {k: v for k, v in shapes.items() if "joint_blocks" not in k}
    width = 64 * 38
    for index in range(38):
        deeper[f"model.diffusion_model.joint_blocks.{index}.x_block.attn.qkv.weight"] = (3 * width, width)
    found = detect_checkpoint(deeper)
    assert (found.variant, found.blocks["joint_blocks"], found.scale) == ("3.5-large", 38, 1)


def test_scaled_fp8_markers_are_reported():
    shapes = full_shapes("flux")
    shapes["scaled_fp8"] = (0,)
    shapes["model.diffusion_model.double_blocks.0.img_attn.qkv.scale_weight"] = ()
    found = detect_checkpoint(shapes)
    assert found.arch == "flux" and any("scaled fp8" in note for note in found.notes)


def test_resolver_with_given_arch_finds_the_prefix():
    # a Flux transformer lacking the keys detection needs still resolves when the caller names the arch
    shapes = {k[len("model.diffusion_model."):]: v for k, v in full_shapes("flux").items()
              if k.startswith("model.diffusion_model.") and "single_blocks.0." not in k}
    resolver = Resolver(shapes, arch="flux")
    assert resolver.checkpoint.arch == "unknown"
    assert resolver.resolve("lora_unet_double_blocks_3_img_mlp_0").key == "double_blocks.3.img_mlp.0.weight"


def test_text_encoder_path_rules():
    from lytools.arch import openclip_key, text_encoder_path

    assert text_encoder_path("text_model_encoder_layers_7_self_attn_out_proj", "hf") == "text_model.encoder.layers.7.self_attn.out_proj"
    assert text_encoder_path("text_model_final_layer_norm", "hf") == "text_model.final_layer_norm"
    assert text_encoder_path("encoder_block_3_layer_1_DenseReluDense_wi_0", "t5") == "encoder.block.3.layer.1.DenseReluDense.wi_0"
    assert text_encoder_path("not_a_path", "hf") is None
    assert openclip_key("text_model.encoder.layers.2.self_attn.v_proj", 1280) == ("transformer.resblocks.2.attn.in_proj_weight", (2560, 3840))
    assert openclip_key("text_model.encoder.layers.2.mlp.fc2", 1024) == ("transformer.resblocks.2.mlp.c_proj.weight", None)
    assert openclip_key("text_model.embeddings.position_embedding", 1024) == ("positional_embedding", None)
    # the rule agrees with the manifest for every SD2 text-encoder module
    for name, target in module_table("sd2").items():
        if target.component == "te":
            key, rows = openclip_key(target.path, 1024)
            assert ("cond_stage_model.model." + key, rows) == (target.key, target.rows), name


def test_flux_fill_and_control_from_img_in():
    shapes = full_shapes("flux")
    shapes["model.diffusion_model.img_in.weight"] = (3072, 384)
    assert detect_checkpoint(shapes).variant == "dev-fill"
    shapes["model.diffusion_model.img_in.weight"] = (3072, 128)
    assert detect_checkpoint(shapes).variant == "dev-control"


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sd3", "flux"])
def test_detect_diffusers_layout_files(tmp_path, arch):
    path = testing.build_checkpoint(tmp_path / "d.safetensors", arch, layout="diffusers", factor=32, keep_blocks=1)
    found = detect_checkpoint(read_header(path).tensors)
    # the synthetic diffusers Flux transformer has its guidance embedder (time_text_embed.guidance_embedder): dev
    variant = "dev" if arch == "flux" else None
    assert (found.arch, found.layout, found.prefix, found.scale, found.variant) == (arch, "diffusers", "", 32, variant)
    schnell = testing.build_checkpoint(tmp_path / "s.safetensors", arch, layout="diffusers", factor=32, keep_blocks=1,
                                       variant="schnell") if arch == "flux" else None
    if schnell is not None:
        assert detect_checkpoint(read_header(schnell).tensors).variant == "schnell"
    prefixed = testing.build_checkpoint(tmp_path / "p.safetensors", arch, layout="diffusers", prefix="unet." if arch in ("sd1", "sd2") else "transformer.", factor=32, keep_blocks=1)
    assert detect_checkpoint(read_header(prefixed).tensors).prefix in ("unet.", "transformer.")


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl", "flux", "sd3"])
def test_key_table_is_the_inverse_of_module_table(arch):
    from lytools.arch import key_table

    table = module_table(arch)
    back = key_table(arch)
    assert sum(len(v) for v in back.values()) == len(table)
    for name, target in table.items():
        assert (name, target.rows) in back[target.key]
    for key, modules in back.items():
        if len(modules) > 1:  # fused q/k/v slices tile the tensor
            rows = [r for _, r in modules]
            assert rows[0][0] == 0 and all(a[1] == b[0] for a, b in zip(rows, rows[1:]))
            assert rows[-1][1] == table[modules[0][0]].fused_shape[0]


def test_swapped_modulations_are_flagged():
    sd3 = diffusers_table("sd3")
    assert not sd3["transformer.transformer_blocks.22.norm1_context.linear"].swap_halves
    last = sd3["transformer.transformer_blocks.23.norm1_context.linear"]
    assert (last.kohya, last.swap_halves) == ("lora_unet_joint_blocks_23_context_block_adaLN_modulation_1", True)
    for arch in ("sd3", "flux"):
        table = diffusers_table(arch)
        assert table["transformer.norm_out.linear"].kohya == "lora_unet_final_layer_adaLN_modulation_1"
        assert table["transformer.norm_out.linear"].swap_halves
        assert (table["transformer.proj_out"].kohya, table["transformer.proj_out"].swap_halves) == ("lora_unet_final_layer_linear", False)
        swapped = {name for name, entry in table.items() if entry.swap_halves}
        assert swapped == ({"transformer.norm_out.linear", "transformer.transformer_blocks.23.norm1_context.linear",
                            "transformer.transformer_blocks.37.norm1_context.linear"}  # SD3.5 large's pre-only last
                           if arch == "sd3" else {"transformer.norm_out.linear"})
        aliases = alias_table(arch)
        assert aliases["lora_transformer_norm_out_linear"].swap_halves and aliases["norm_out.linear"].swap_halves
        assert not aliases["lora_unet_final_layer_adaLN_modulation_1"].swap_halves
        assert not aliases["diffusion_model.final_layer.adaLN_modulation.1"].swap_halves
    flux = diffusers_table("flux")
    assert flux["transformer.time_text_embed.guidance_embedder.linear_1"].kohya == "lora_unet_guidance_in_in_layer"
    assert flux["transformer.x_embedder"].kohya == "lora_unet_img_in"
    assert sd3["transformer.pos_embed.proj"].kohya == "lora_unet_x_embedder_proj"


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_resolver_places_swapped_halves_on_both_layouts(arch):
    native = full_shapes(arch)
    diffusers = {entry.name: entry.shape for entry, _ in testing.checkpoint_plan(arch, factor=1, layout="diffusers")}
    half = native["model.diffusion_model.final_layer.adaLN_modulation.1.weight"][0] // 2
    swapped = (((half, 2 * half), (0, half)), ((0, half), (half, 2 * half)))
    for shapes, key in ((native, "model.diffusion_model.final_layer.adaLN_modulation.1.weight"), (diffusers, "norm_out.linear.weight")):
        resolver = Resolver(shapes)
        plain_name, swapped_name = "lora_unet_final_layer_adaLN_modulation_1", "transformer.norm_out.linear"
        if key == "norm_out.linear.weight":  # the diffusers file holds diffusers' order
            plain_name, swapped_name = swapped_name, plain_name
        plain = resolver.resolve(plain_name)
        assert [(p.key, p.rows, p.module_rows) for p in plain.placements] == [(key, None, None)]
        crossed = resolver.resolve(swapped_name)
        assert [(p.key, p.rows, p.module_rows) for p in crossed.placements] == [(key, *rows) for rows in swapped]
        assert crossed.shape == plain.shape == shapes[key]
