"""SD3.5 networks in the diffusers/peft layout: `x_block.attn2` (SD3.5 medium's dual-attention blocks) and
SD3.5 large's blocks 23-37 map both ways like SD3 medium's modules (fused qkv <-> to_q/to_k/to_v, the
[shift; scale] halves swapped only for a pre-only block's 2·width context modulation).

Checked against diffusers' own SD3Transformer2DModel (dual_attention_layers, 38 layers) and against
lytools' merge of the kohya file into an MMDiT-layout SD3.5 checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from lytools.arch.keymap import kohya_to_diffusers
from lytools.convert import ConvertOptions, convert_file
from lytools.io import write_safetensors
from lytools.merge import merge_into_checkpoint
from lytools.testing import build_checkpoint
from tests.shared import read_tensors

FACTOR = 32  # SD3 medium's width 1536 / 32 = 48 (6 heads of 8)
WIDTH = 48
UNET = "model.diffusion_model."
RANK = 2

MEDIUM = [f"joint_blocks.{b}.x_block.attn2.{p}" for b in (0, 1) for p in ("qkv", "proj")] + [
    "joint_blocks.0.x_block.attn.qkv", "joint_blocks.0.x_block.adaLN_modulation.1",
    "joint_blocks.23.context_block.adaLN_modulation.1",  # SD3.5 medium's last block: pre-only, swapped
]
LARGE = [f"joint_blocks.23.context_block.{p}" for p in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1")] + [
    f"joint_blocks.{b}.{side}.{p}" for b in (30, 37) for side in ("x_block", "context_block")
    for p in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1")
    if not (b == 37 and side == "context_block" and p in ("attn.proj", "mlp.fc1", "mlp.fc2"))
]


def _rows(path: str, blocks: int) -> int:
    """Output rows of an MMDiT block linear at WIDTH (x_block adaLN: 9 chunks with attn2, else 6)."""
    block = int(path.split(".")[1])
    if path.endswith("adaLN_modulation.1"):
        if ".context_block." in path and block == blocks - 1:
            return 2 * WIDTH
        return (9 if block in (0, 1) and blocks == 24 and ".x_block." in path else 6) * WIDTH
    if path.endswith("qkv"):
        return 3 * WIDTH
    return 4 * WIDTH if path.endswith("fc1") else WIDTH


def _kohya(path: Path, paths: list[str], blocks: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for module_path in paths:
        name = "lora_unet_" + module_path.replace(".", "_")
        inner = 4 * WIDTH if module_path.endswith("fc2") else WIDTH
        tensors[f"{name}.lora_down.weight"] = torch.randn(RANK, inner, generator=generator)
        tensors[f"{name}.lora_up.weight"] = torch.randn(_rows(module_path, blocks), RANK, generator=generator) * 0.1
        tensors[f"{name}.alpha"] = torch.tensor(float(RANK))
    write_safetensors(path, tensors, {})
    return tensors


def _checkpoint(tmp_path: Path, blocks: int) -> Path:
    """A synthetic MMDiT SD3.5 denoiser at WIDTH: medium (24 blocks, attn2 + 9-chunk adaLN in blocks 0-1)
    or large (38 blocks, block 23 full, block 37 pre-only)."""
    base = read_tensors(build_checkpoint(tmp_path / "m.safetensors", "sd3", factor=FACTOR, components=["unet"],
                                         dtype=torch.float32))
    generator = torch.Generator().manual_seed(blocks)
    if blocks == 24:
        for block in (0, 1):
            base[f"{UNET}joint_blocks.{block}.x_block.attn2.qkv.weight"] = torch.randn(3 * WIDTH, WIDTH, generator=generator)
            base[f"{UNET}joint_blocks.{block}.x_block.attn2.proj.weight"] = torch.randn(WIDTH, WIDTH, generator=generator)
            base[f"{UNET}joint_blocks.{block}.x_block.adaLN_modulation.1.weight"] = torch.randn(9 * WIDTH, WIDTH, generator=generator)
    else:
        for key in [k for k in base if ".joint_blocks.23.context_block." in k]:
            del base[key]
        for key in [k for k in base if ".joint_blocks.22." in k]:
            for block in range(23, blocks):
                if block == blocks - 1 and ".context_block." in key and (".attn.proj." in key or ".mlp." in key):
                    continue
                weight = torch.randn(base[key].shape, generator=generator)
                if block == blocks - 1 and ".context_block.adaLN_modulation.1." in key:
                    weight = weight[: 2 * WIDTH]
                base[key.replace(".joint_blocks.22.", f".joint_blocks.{block}.")] = weight
    out = tmp_path / f"sd35-{blocks}.safetensors"
    write_safetensors(out, base, {})
    return out


CASES = [pytest.param(MEDIUM, 24, id="medium-attn2"), pytest.param(LARGE, 38, id="large-38-blocks")]


@pytest.mark.parametrize("paths,blocks", CASES)
@pytest.mark.parametrize("target", ["diffusers", "peft"])
def test_sd35_kohya_round_trips_bit_exact(tmp_path, paths, blocks, target):
    kohya = _kohya(tmp_path / "k.safetensors", paths, blocks, seed=1)
    out = tmp_path / f"d.{target}.safetensors"
    convert_file(tmp_path / "k.safetensors", out, ConvertOptions(target=target, arch="sd3", fold=False))
    written = read_tensors(out)
    modules = {key.rsplit(".lora_", 1)[0] for key in written if ".lora_" in key}
    if blocks == 24:
        assert {f"transformer_blocks.{b}.attn2.{p}" for b in (0, 1) for p in ("to_q", "to_k", "to_v", "to_out.0")} <= {
            m.split("transformer.", 1)[-1].split("base_model.model.", 1)[-1] for m in modules}
    else:
        assert any(".transformer_blocks.37.norm1_context.linear" in m for m in modules)
        assert any(".transformer_blocks.30.attn.add_q_proj" in m for m in modules)
    assert not any(m.startswith(("lora_unet_", "base_model.model.lora_unet_")) for m in modules)  # every one renamed
    back = tmp_path / "back.safetensors"
    convert_file(out, back, ConvertOptions(target="kohya", arch="sd3", fold=False))
    again = read_tensors(back)
    assert set(again) == set(kohya)
    for key, value in kohya.items():
        assert torch.equal(again[key], value), key


def _expected_split(delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ΔW per diffusers module from MMDiT-keyed changes by lytools' tables (rows split, 2·width halves swapped)."""
    result = {}
    for targets in kohya_to_diffusers("sd3").values():
        for target in targets:
            if target.key not in delta:
                continue
            change = delta[target.key]
            if target.key_rows is not None:
                third = change.shape[0] // 3
                start = target.key_rows[0] // (target.key_rows[1] - target.key_rows[0])
                change = change[start * third:(start + 1) * third]
            if target.swap_halves and change.shape[0] == 2 * change.shape[1]:
                change = torch.cat([change[WIDTH:], change[:WIDTH]])
            result[target.diffusers.split(".", 1)[1] + ".weight"] = change
    return result


@pytest.mark.parametrize("paths,blocks", CASES)
def test_sd35_diffusers_layout_loads_in_diffusers_and_merges_like_kohya(tmp_path, paths, blocks):
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    _kohya(tmp_path / "k.safetensors", paths, blocks, seed=2)
    convert_file(tmp_path / "k.safetensors", tmp_path / "d.safetensors", ConvertOptions(target="diffusers", arch="sd3"))
    # (3) merge: the diffusers-layout file changes an MMDiT SD3.5 checkpoint exactly as the kohya file does
    base = _checkpoint(tmp_path, blocks)
    merge_into_checkpoint(base, [tmp_path / "k.safetensors"], tmp_path / "mk.safetensors")
    merge_into_checkpoint(base, [tmp_path / "d.safetensors"], tmp_path / "md.safetensors")
    before, by_kohya, by_diffusers = (read_tensors(p) for p in (base, tmp_path / "mk.safetensors", tmp_path / "md.safetensors"))
    changed = {k for k in before if not torch.equal(before[k], by_kohya[k])}
    assert changed == {UNET + p + ".weight" for p in paths}
    for key in before:
        assert torch.allclose(by_diffusers[key], by_kohya[key], atol=1e-6, rtol=0), key
    # (2) diffusers' own transformer applies the same ΔW, module by module, in its layout
    torch.manual_seed(0)
    model = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, num_layers=blocks, attention_head_dim=8, num_attention_heads=6,
        joint_attention_dim=128, caption_projection_dim=48, pooled_projection_dim=64, out_channels=16, pos_embed_max_size=48,
        dual_attention_layers=(0, 1) if blocks == 24 else (), qk_norm="rms_norm")
    own = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_lora_adapter(read_tensors(tmp_path / "d.safetensors"), prefix="transformer", adapter_name="x")
    model.fuse_lora(lora_scale=1.0)
    model.unload_lora()
    after = model.state_dict()
    expected = _expected_split({k: by_kohya[k].double() - before[k].double() for k in changed})
    applied = {k: after[k].double() - own[k].double() for k in own if not torch.equal(after[k], own[k])}
    assert set(applied) == set(expected)
    for key, change in expected.items():
        assert float((applied[key] - change).norm() / change.norm()) < 1e-5, key


def test_sd35_names_extend_sd3_medium_by_rule():
    """module_table stays SD3 medium's manifest; the name maps add SD3.5's modules (optional "sd35")."""
    from lytools.arch.keymap import diffusers_table, module_table, named_modules

    medium, named = module_table("sd3"), named_modules("sd3")
    assert set(medium) < set(named) and all(named[name] == target for name, target in medium.items())
    extra = {name: t for name, t in named.items() if name not in medium}
    assert {t.optional for t in extra.values()} == {"sd35"}
    assert "lora_unet_joint_blocks_23_context_block_mlp_fc1" in extra  # SD3.5 large's block 23 is full
    assert "lora_unet_joint_blocks_37_context_block_mlp_fc1" not in named  # its block 37 is pre-only
    assert named["lora_unet_joint_blocks_37_context_block_adaLN_modulation_1"].shape == (2 * 1536, 1536)
    assert named["lora_unet_joint_blocks_12_x_block_attn2_qkv"].parts == (("q", (0, 1536)), ("k", (1536, 3072)), ("v", (3072, 4608)))
    table = diffusers_table("sd3")
    swapped = sorted(name for name, t in table.items() if t.swap_halves and "transformer_blocks" in name)
    assert swapped == ["transformer.transformer_blocks.23.norm1_context.linear",
                       "transformer.transformer_blocks.37.norm1_context.linear"]
    assert table["transformer.transformer_blocks.12.attn2.to_out.0"].kohya == "lora_unet_joint_blocks_12_x_block_attn2_proj"
    assert table["transformer.transformer_blocks.37.attn.to_v"].key_rows == (3072, 4608)
