"""The adaLN modulations diffusers stores with swapped halves: Flux/SD3 `final_layer.adaLN_modulation.1`
= `norm_out.linear` and SD3's last `context_block.adaLN_modulation.1` = `norm1_context.linear`
([shift; scale] in BFL/SD3, [scale; shift] in diffusers; FORMATS.md 2.1, 3.5).

Converting there and back is exact, the diffusers module's ΔW is the BFL ΔW with its halves
exchanged, merging a diffusers-named file equals merging the kohya file (into BFL/MMDiT and into
diffusers-layout checkpoints), and diffusers itself applies our output to the right rows."""

from __future__ import annotations

import logging

import pytest
import torch

from lytools.algos import delta
from lytools.convert import ConvertOptions, convert_file, convert_network, load_network
from lytools.convert.fuse import swap_halves
from lytools.errors import UnsupportedError
from lytools.merge import merge_into_checkpoint
from lytools.testing import build_checkpoint, build_network
from tests.shared import read_tensors

FACTOR = 32
SD3_LAST = "lora_unet_joint_blocks_23_context_block_adaLN_modulation_1"
FINAL = "lora_unet_final_layer_adaLN_modulation_1"
MODULES = {
    "sd3": [FINAL, SD3_LAST, "lora_unet_joint_blocks_22_context_block_adaLN_modulation_1",
            "lora_unet_joint_blocks_23_context_block_attn_qkv", "lora_unet_final_layer_linear", "lora_unet_x_embedder_proj"],
    "flux": [FINAL, "lora_unet_final_layer_linear", "lora_unet_double_blocks_0_txt_mod_lin",
             "lora_unet_single_blocks_0_linear1", "lora_unet_guidance_in_in_layer", "lora_unet_img_in"],
}
SWAPPED = {"sd3": {FINAL: "transformer.norm_out.linear", SD3_LAST: "transformer.transformer_blocks.23.norm1_context.linear"},
           "flux": {FINAL: "transformer.norm_out.linear"}}


def halves_swapped(tensor: torch.Tensor) -> torch.Tensor:
    half = tensor.shape[0] // 2
    return torch.cat([tensor[half:], tensor[:half]])


def lora_change(up: torch.Tensor, down: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    return (up.double().reshape(up.shape[0], -1) @ down.double().reshape(down.shape[0], -1)) * scale


def network(tmp_path, arch: str, *, dora: bool = False, name: str = "k.safetensors"):
    return build_network(tmp_path / name, arch, factor=FACTOR, rank=4, alpha=3.0, modules=MODULES[arch], dora=dora, seed=5)


def assert_bit_identical(first, second) -> None:
    assert set(first.modules) == set(second.modules)
    for name, module in first.modules.items():
        other = second.modules[name]
        assert set(module.tensors) == set(other.tensors), name
        for suffix, tensor in module.tensors.items():
            assert other[suffix].dtype == tensor.dtype and torch.equal(other[suffix], tensor), f"{name}.{suffix}"


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("target", ["diffusers", "peft"])
@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_round_trip_is_bit_identical(tmp_path, arch, target, dora):
    source = network(tmp_path, arch, dora=dora)
    middle = tmp_path / ("d.safetensors" if target == "diffusers" else "adapter")
    component = "unet" if target == "peft" else None
    convert_file(source, middle, ConvertOptions(target=target, fold=False, component=component))
    stored = middle if target == "diffusers" else middle / "adapter_model.safetensors"
    written = read_tensors(stored)
    prefix = "transformer." if target == "diffusers" else "base_model.model."
    for diffusers_name in SWAPPED[arch].values():
        assert f"{prefix}{diffusers_name.removeprefix('transformer.')}.lora_B.weight" in written
    convert_file(stored, tmp_path / "back.safetensors", ConvertOptions(target="kohya"))
    assert_bit_identical(load_network(source), load_network(tmp_path / "back.safetensors"))


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_diffusers_rows_are_the_bfl_rows_with_halves_swapped(tmp_path, arch):
    net = load_network(network(tmp_path, arch, dora=True))
    written = convert_network(net, "diffusers", fold=False).tensors
    for kohya, diffusers_name in SWAPPED[arch].items():
        module = net.modules[kohya]
        down, up = written[f"{diffusers_name}.lora_A.weight"], written[f"{diffusers_name}.lora_B.weight"]
        assert torch.equal(down, module["lora_down.weight"])  # the input side does not move
        assert torch.equal(lora_change(up, down), halves_swapped(lora_change(module["lora_up.weight"], module["lora_down.weight"])))
        assert torch.equal(written[f"{diffusers_name}.lora_magnitude_vector"], halves_swapped(module["dora_scale"]).reshape(-1))
    if arch == "sd3":  # the block before the last keeps its order
        kept = net.modules["lora_unet_joint_blocks_22_context_block_adaLN_modulation_1"]
        up = written["transformer.transformer_blocks.22.norm1_context.linear.lora_B.weight"]
        assert torch.equal(up, kept["lora_up.weight"])


def test_swap_halves_reorders_rows_only():
    generator = torch.Generator().manual_seed(0)
    lora = {"lora_down.weight": torch.randn(2, 6, generator=generator), "lora_up.weight": torch.randn(8, 2, generator=generator),
            "alpha": torch.tensor(1.0), "dora_scale": torch.randn(8, 1, generator=generator)}
    swapped = swap_halves("m", lora)
    assert torch.equal(swapped["lora_up.weight"][:4], lora["lora_up.weight"][4:])
    assert torch.equal(swapped["dora_scale"][4:], lora["dora_scale"][:4])
    assert swapped["lora_down.weight"] is lora["lora_down.weight"]
    assert all(torch.equal(a, b) for a, b in zip(swap_halves("m", swapped).values(), lora.values()))
    input_axis = dict(lora, dora_scale=torch.randn(1, 6, generator=generator))  # column norms: row order does not matter
    assert torch.equal(swap_halves("m", input_axis)["dora_scale"], input_axis["dora_scale"])
    loha = {f"hada_w{i}_{s}": torch.randn(*((8, 2) if s == "a" else (2, 6)), generator=generator) for i in (1, 2) for s in "ab"}
    changed = swap_halves("m", loha)
    product = lambda t: (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])  # noqa: E731
    assert torch.equal(product(changed), halves_swapped(product(loha)))
    kron = lambda t: torch.kron(t.get("lokr_w1", t.get("lokr_w1_a")), t["lokr_w2"])  # noqa: E731
    for first_rows in (2, 4, 1):  # even row blocks in w1, or one row in w1: the rows of w2 turn
        lokr = {"lokr_w1": torch.randn(first_rows, 2, generator=generator), "lokr_w2": torch.randn(6, 3, generator=generator)}
        assert torch.equal(kron(swap_halves("m", lokr)), halves_swapped(kron(lokr)))
    with pytest.raises(UnsupportedError, match="3 x 6 row blocks"):
        swap_halves("m", {"lokr_w1": torch.ones(3, 2), "lokr_w2": torch.ones(6, 3)})
    with pytest.raises(UnsupportedError, match="oft_blocks"):
        swap_halves("m", {"oft_blocks": torch.ones(2, 4, 4), "alpha": torch.tensor(1.0)})
    with pytest.raises(UnsupportedError, match="7 output rows"):
        swap_halves("m", {"lora_down.weight": torch.ones(1, 3), "lora_up.weight": torch.ones(7, 1)})


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_merging_a_diffusers_named_file_equals_merging_the_kohya_file(tmp_path, arch):
    keep = {"keep_blocks": 1} if arch == "flux" else {}
    base = build_checkpoint(tmp_path / "base.safetensors", arch, factor=FACTOR, components=("unet",), dtype=torch.float32, **keep)
    kohya = network(tmp_path, arch)
    convert_file(kohya, tmp_path / "d.safetensors", ConvertOptions(target="diffusers", fold=False))
    merge_into_checkpoint(base, [kohya], tmp_path / "from-kohya.safetensors")
    merge_into_checkpoint(base, [tmp_path / "d.safetensors"], tmp_path / "from-diffusers.safetensors")
    before, from_kohya = read_tensors(base), read_tensors(tmp_path / "from-kohya.safetensors")
    from_diffusers = read_tensors(tmp_path / "from-diffusers.safetensors")
    assert from_kohya.keys() == from_diffusers.keys()
    for key, tensor in from_kohya.items():
        assert torch.equal(from_diffusers[key], tensor), key
    # and the change sits on the BFL/MMDiT rows in their own [shift; scale] order
    net = load_network(kohya)
    module = net.modules[FINAL]
    expected = lora_change(module["lora_up.weight"], module["lora_down.weight"], 3.0 / 4)
    key = "model.diffusion_model.final_layer.adaLN_modulation.1.weight"
    torch.testing.assert_close((from_kohya[key].double() - before[key].double()), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_merging_into_a_diffusers_layout_checkpoint_swaps_the_rows(tmp_path, arch):
    keep = {"keep_blocks": 1} if arch == "flux" else {}
    native = build_checkpoint(tmp_path / "native.safetensors", arch, factor=FACTOR, components=("unet",), dtype=torch.float32, **keep)
    split = build_checkpoint(tmp_path / "split.safetensors", arch, factor=FACTOR, layout="diffusers", dtype=torch.float32, **keep)
    before = read_tensors(split)
    assert torch.equal(before["norm_out.linear.weight"],
                       halves_swapped(read_tensors(native)["model.diffusion_model.final_layer.adaLN_modulation.1.weight"]))
    kohya = network(tmp_path, arch)
    convert_file(kohya, tmp_path / "d.safetensors", ConvertOptions(target="diffusers", fold=False))
    merge_into_checkpoint(native, [kohya], tmp_path / "native-out.safetensors")
    merge_into_checkpoint(split, [kohya], tmp_path / "split-out.safetensors")
    merge_into_checkpoint(split, [tmp_path / "d.safetensors"], tmp_path / "split-out-d.safetensors")
    bfl, from_kohya, from_diffusers = (read_tensors(tmp_path / f"{n}.safetensors") for n in ("native-out", "split-out", "split-out-d"))
    pairs = [("model.diffusion_model.final_layer.adaLN_modulation.1", "norm_out.linear")]
    if arch == "sd3":
        pairs.append(("model.diffusion_model.joint_blocks.23.context_block.adaLN_modulation.1", "transformer_blocks.23.norm1_context.linear"))
    for native_key, diffusers_key in pairs:
        assert not torch.equal(from_kohya[diffusers_key + ".weight"], before[diffusers_key + ".weight"])
        expected = halves_swapped(bfl[native_key + ".weight"])
        torch.testing.assert_close(from_kohya[diffusers_key + ".weight"], expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(from_diffusers[diffusers_key + ".weight"], expected, rtol=1e-5, atol=1e-6)


# -- diffusers applies our output to the right rows ---------------------------------------------------------
def tiny_transformer(arch: str):
    """diffusers' SD3 (24 joint blocks, so block 23 is the last) or Flux transformer, widths / FACTOR."""
    diffusers = pytest.importorskip("diffusers")
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    torch.manual_seed(0)
    if arch == "sd3":
        return diffusers.SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=8, num_attention_heads=6,
            joint_attention_dim=128, caption_projection_dim=48, pooled_projection_dim=64, out_channels=16, pos_embed_max_size=48,
        )
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=2, num_layers=1, num_single_layers=1, attention_head_dim=24, num_attention_heads=4,
        joint_attention_dim=128, pooled_projection_dim=24, guidance_embeds=True, axes_dims_rope=(8, 8, 8),
    )


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_diffusers_applies_the_swapped_rows(tmp_path, arch):
    pytest.importorskip("peft")
    modules = {"sd3": [FINAL, SD3_LAST, "lora_unet_joint_blocks_22_context_block_adaLN_modulation_1"],
               "flux": [FINAL, "lora_unet_double_blocks_0_txt_mod_lin", "lora_unet_single_blocks_0_modulation_lin"]}[arch]
    kohya = build_network(tmp_path / "k.safetensors", arch, factor=FACTOR, rank=4, alpha=3.0, modules=modules, seed=3)
    convert_file(kohya, tmp_path / "d.safetensors", ConvertOptions(target="diffusers"))
    model = tiny_transformer(arch)
    paths = {FINAL: "norm_out.linear", SD3_LAST: "transformer_blocks.23.norm1_context.linear",
             "lora_unet_joint_blocks_22_context_block_adaLN_modulation_1": "transformer_blocks.22.norm1_context.linear",
             "lora_unet_double_blocks_0_txt_mod_lin": "transformer_blocks.0.norm1_context.linear",
             "lora_unet_single_blocks_0_modulation_lin": "single_transformer_blocks.0.norm.linear"}
    before = {path: model.get_submodule(paths[m]).weight.detach().clone() for m in modules for path in [paths[m]]}
    model.load_lora_adapter(read_tensors(tmp_path / "d.safetensors"), prefix="transformer", adapter_name="x")
    model.fuse_lora(lora_scale=1.0)
    net = load_network(kohya)
    for name in modules:
        module = net.modules[name]
        change = delta(module, module["lora_up.weight"].shape[:1] + module["lora_down.weight"].shape[1:]).double()
        if name in SWAPPED[arch]:
            change = halves_swapped(change)
        path = paths[name]
        applied = model.get_submodule(path).base_layer.weight if hasattr(model.get_submodule(path), "base_layer") else model.get_submodule(path).weight
        applied_change = applied.detach().double() - before[path].double()
        # fp16 factors folded by a non-power-of-two scale: one rounding each (relative 2^-11)
        assert float((applied_change - change).norm() / change.norm()) < 2e-3, name
        if name in SWAPPED[arch]:  # and the unswapped reading would be far off
            assert float((applied_change - halves_swapped(change)).norm() / change.norm()) > 0.5, name


def test_extract_from_diffusers_layout_files_gives_bfl_rows(tmp_path):
    from lytools.extract import ExtractOptions, RankRule, extract
    from lytools.testing import build_tuned

    modules = [FINAL, SD3_LAST]
    kohya = build_network(tmp_path / "k.safetensors", "sd3", factor=FACTOR, rank=2, alpha=2.0, modules=modules, seed=4)
    base = build_checkpoint(tmp_path / "base.safetensors", "sd3", factor=FACTOR, layout="diffusers", dtype=torch.float32)
    tuned = build_tuned(base, tmp_path / "tuned.safetensors", kohya)  # placed through the resolver: rows swapped
    assert set(tuned.changed) == {"norm_out.linear.weight", "transformer_blocks.23.norm1_context.linear.weight"}
    result = extract(base, tuned.path, tmp_path / "x.safetensors", ExtractOptions(linear=RankRule("fixed", 2)))
    extracted, source = load_network(result.output), load_network(kohya)
    for name in modules:
        ours = source.modules[name]
        found = extracted.modules[name]
        expected = lora_change(ours["lora_up.weight"], ours["lora_down.weight"])
        got = lora_change(found["lora_up.weight"], found["lora_down.weight"], float(found["alpha"]) / found["lora_down.weight"].shape[0])
        assert float((got - expected).norm() / expected.norm()) < 1e-3, name


def test_flux_output_equals_diffusers_own_kohya_conversion(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    modules = [FINAL, "lora_unet_final_layer_linear", "lora_unet_double_blocks_0_txt_mod_lin"]
    kohya = build_network(tmp_path / "k.safetensors", "flux", factor=FACTOR, rank=4, alpha=4.0, modules=modules, seed=1,
                          dtype=torch.float32)  # alpha = rank: diffusers' converter then keeps the factors as they are
    theirs = diffusers.FluxPipeline.lora_state_dict(str(kohya))
    theirs = theirs[0] if isinstance(theirs, tuple) else theirs
    convert_file(kohya, tmp_path / "d.safetensors", ConvertOptions(target="diffusers", fold=False))
    ours = read_tensors(tmp_path / "d.safetensors")
    assert len(ours) == 6
    for key, tensor in ours.items():
        # diffusers 0.42 leaves the `transformer.` prefix off the final-layer keys it converts
        other = theirs.get(key, theirs.get(key.removeprefix("transformer.")))
        assert other is not None and torch.equal(other, tensor), key
