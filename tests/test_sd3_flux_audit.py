"""Audit of extract and resize on SD3 and Flux (notes: /work/notes/audit-sd3flux.md), and of convert's
fold of a non-power-of-two scale in fp16.

Each check compares with math written here: the rank rules of ALGORITHMS.md 15/16 on
torch.linalg.svdvals, the best rank-r approximation for resize, torch's `tensor * factor` for the fold,
and diffusers' own transformers for the extracted networks."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from lytools.arch import module_table
from lytools.convert import ConvertOptions, convert_file
from lytools.convert.fast import try_convert
from lytools.extract import ExtractOptions, FactorOptions, RankRule, extract
from lytools.io import read_header, write_safetensors
from lytools.merge import merge_into_checkpoint
from lytools.resize import ResizeOptions, resize_file
from lytools.testing import build_checkpoint, build_network, build_tuned
from tests.shared import read_tensors

FACTOR = 32
UNET = "model.diffusion_model."


def lora_change(tensors: dict, module: str) -> torch.Tensor:
    """ΔW of a kohya LoRA module or a full `diff`, float64, flattened to 2-D."""
    if f"{module}.diff" in tensors:
        return tensors[f"{module}.diff"].double().flatten(1)
    up = tensors[f"{module}.lora_up.weight"].double().flatten(1)
    down = tensors[f"{module}.lora_down.weight"].double().flatten(1)
    alpha = float(tensors[f"{module}.alpha"]) if f"{module}.alpha" in tensors else down.shape[0]
    return up @ down * (alpha / down.shape[0])


def modules_of(tensors: dict) -> set[str]:
    return {key.split(".", 1)[0] for key in tensors}


def pair(tmp_path: Path, arch: str, modules, *, noise: float = 0.0, keep_blocks=None, rank: int = 3):
    """(base, tuned, network) of the denoiser, float32, `FACTOR`-shrunk; the network changes `modules`."""
    base = build_checkpoint(tmp_path / f"{arch}-base.safetensors", arch, factor=FACTOR, components=["unet"],
                            dtype=torch.float32, keep_blocks=keep_blocks)
    net = build_network(tmp_path / f"{arch}-net.safetensors", arch, factor=FACTOR, rank=rank, alpha=2.0, modules=modules,
                        dtype=torch.float32, seed=1)
    tuned = build_tuned(base, tmp_path / f"{arch}-tuned.safetensors", net, noise=noise)
    return base, tuned.path, net


SD3_MODULES = sorted(
    name for name, target in module_table("sd3").items() if target.component == "unet"
    and (name.startswith(("lora_unet_joint_blocks_0_", "lora_unet_joint_blocks_22_", "lora_unet_joint_blocks_23_"))
         or target.optional == "embedders")
)
FLUX_MODULES = sorted(
    name for name, target in module_table("flux").items() if target.component == "unet"
    and (name.startswith(("lora_unet_double_blocks_0_", "lora_unet_single_blocks_0_")) or target.optional is not None)
)


# -- extract: every module, the last SD3 joint block, fused qkv / linear1 ----------------------------------------
@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_extract_recovers_every_module_of_a_low_rank_change(tmp_path, arch):
    modules = SD3_MODULES if arch == "sd3" else FLUX_MODULES
    base, tuned, net = pair(tmp_path, arch, modules, keep_blocks=None if arch == "sd3" else 1)
    out = tmp_path / "x.safetensors"
    options = ExtractOptions(linear=RankRule("fixed", 3), conv=RankRule("fixed", 3), verify=True,
                             factor=FactorOptions(save_dtype=torch.float32, full_fallback=False))
    extract(base, tuned, out, options)
    ours, source = read_tensors(out), read_tensors(net)
    assert modules_of(ours) == set(modules)  # fused qkv / linear1 stay one kohya module; block 23's context block
    for module in modules:
        expected = lora_change(source, module)
        assert float((lora_change(ours, module) - expected).norm() / expected.norm()) < 1e-4, module


SIGMA_RULES = {
    "threshold": lambda s, t: int((s > t).sum()),
    "ratio": lambda s, q: int((s > q * s[0]).sum()),
    "quantile": lambda s, q: int((torch.cumsum(s, 0) < q * s.sum()).sum()),
}


@pytest.mark.parametrize("arch", ["sd3", "flux"])
@pytest.mark.parametrize("mode,value", [("threshold", 0.02), ("ratio", 0.1), ("quantile", 0.6)])
def test_dynamic_ranks_follow_the_spectrum_rules(tmp_path, arch, mode, value):
    modules = SD3_MODULES[:12] if arch == "sd3" else FLUX_MODULES[:12]
    base, tuned, _ = pair(tmp_path, arch, modules, noise=0.002, keep_blocks=None if arch == "sd3" else 1)
    out, report = tmp_path / "x.safetensors", tmp_path / "r.json"
    extract(base, tuned, out, ExtractOptions(linear=RankRule(mode, value, 6), conv=RankRule(mode, value, 6), report=report))
    records = {r["name"]: r for r in json.loads(report.read_text())["modules"] if r["stored"] != "skipped"}
    base_t, tuned_t = read_tensors(base), read_tensors(tuned)
    table = module_table(arch)
    assert set(records) == set(modules)
    for module in modules:
        key = table[module].key
        matrix = (tuned_t[key].double() - base_t[key].double()).flatten(1)
        sigma = torch.linalg.svdvals(matrix)
        rank = min(max(1, SIGMA_RULES[mode](sigma, value)), *matrix.shape, 6)
        record = records[module]
        if rank >= matrix.shape[0] / 2:
            assert record["stored"] == "full", module
        else:
            assert record["rank"] == rank, module
            ideal = float(sigma[rank:].square().sum().sqrt() / sigma.square().sum().sqrt())
            assert abs(record["rel_error"] - ideal) < 2e-3, module


# -- SD3.5: the block linears SD3 medium's table lacks -------------------------------------------------------------
def _sd35_like(tmp_path: Path):
    """An SD3-medium-shaped file grown into SD3.5's structure: `x_block.attn2` in blocks 0-1, blocks 24-25
    (so block 23 has a full context block and 25 is the last); tuned changes each of those by rank 2."""
    base = read_tensors(build_checkpoint(tmp_path / "m.safetensors", "sd3", factor=FACTOR, components=["unet"],
                                         dtype=torch.float32, keep_blocks=None))
    generator = torch.Generator().manual_seed(0)
    width = base[UNET + "joint_blocks.0.x_block.attn.proj.weight"].shape[0]
    for key in [k for k in base if ".joint_blocks.23.context_block." in k]:
        del base[key]  # block 23 becomes a full block: a copy of block 22
    for key in [k for k in base if ".joint_blocks.22." in k]:
        for block in (23, 24, 25):
            base[key.replace(".joint_blocks.22.", f".joint_blocks.{block}.")] = base[key].clone()
    for block in (0, 1):
        base[f"{UNET}joint_blocks.{block}.x_block.attn2.qkv.weight"] = torch.randn(3 * width, width, generator=generator)
        base[f"{UNET}joint_blocks.{block}.x_block.attn2.proj.weight"] = torch.randn(width, width, generator=generator)
    changed = [f"joint_blocks.{b}.x_block.attn2.{p}" for b in (0, 1) for p in ("qkv", "proj")]
    changed += [f"joint_blocks.23.context_block.{p}" for p in ("attn.proj", "mlp.fc1", "mlp.fc2")]
    changed += [f"joint_blocks.25.{b}.attn.qkv" for b in ("x_block", "context_block")]
    tuned = dict(base)
    for path in changed:
        weight = base[UNET + path + ".weight"]
        tuned[UNET + path + ".weight"] = weight + 0.05 * (torch.randn(weight.shape[0], 2, generator=generator)
                                                          @ torch.randn(2, weight.shape[1], generator=generator))
    write_safetensors(tmp_path / "b35.safetensors", base, {})
    write_safetensors(tmp_path / "t35.safetensors", tuned, {})
    return tmp_path / "b35.safetensors", tmp_path / "t35.safetensors", changed


def test_sd35_blocks_outside_the_medium_table_are_extracted_and_merge_back(tmp_path):
    base, tuned, changed = _sd35_like(tmp_path)
    out = tmp_path / "x.safetensors"
    result = extract(base, tuned, out, ExtractOptions(linear=RankRule("fixed", 2), verify=True,
                                                      factor=FactorOptions(save_dtype=torch.float32)))
    ours = read_tensors(out)
    extracted = {r.name for r in result.records if r.stored != "skipped"}
    expected = {"lora_unet_" + path.replace(".", "_") for path in changed}
    assert extracted == expected and modules_of(ours) == expected  # before: attn2, block 23's proj/mlp, 25 silently missed
    meta = read_header(out).metadata  # attn2: SD3.5 medium (it said SD3 medium)
    assert meta["ss_base_model_version"] == "5-medium"
    assert meta["modelspec.architecture"] == "stable-diffusion-3-5-medium/lora"
    merged = tmp_path / "merged.safetensors"
    merge_into_checkpoint(base, [out], merged)
    merged_t, tuned_t = read_tensors(merged), read_tensors(tuned)
    for path in changed:
        key = UNET + path + ".weight"
        assert torch.allclose(merged_t[key], tuned_t[key], atol=1e-5), key


# -- resize: every method on fused modules and mixed ranks ---------------------------------------------------------
def _kohya_rank(sigma: torch.Tensor, method: str, param: float | None, cap: int) -> int:
    """ALGORITHMS.md 16 on the dense spectrum (len = min(out, in))."""
    n = sigma.numel()
    if sigma[0] < 1e-6:
        return 1
    if method == "fixed":
        return cap
    if method == "sv_ratio":
        index = int((sigma > sigma[0] / param).sum())
    else:
        values = sigma if method == "sv_cumulative" else sigma.square()
        target = param if method == "sv_cumulative" else param * param
        cumulative = torch.cumsum(values, 0) / values.sum()
        index = int(torch.searchsorted(cumulative, torch.tensor([target], dtype=cumulative.dtype))[0]) + 1
    return min(max(1, min(index, n - 1)) + 1, cap)


@pytest.mark.parametrize("arch", ["sd3", "flux"])
@pytest.mark.parametrize("method,param,cap", [("fixed", None, 5), ("sv_ratio", 4.0, 12), ("sv_fro", 0.9, 12),
                                              ("sv_cumulative", 0.7, 7)])
def test_resize_equals_the_truncated_svd(tmp_path, arch, method, param, cap):
    modules = (SD3_MODULES if arch == "sd3" else FLUX_MODULES)[:14]
    source = build_network(tmp_path / "n.safetensors", arch, factor=FACTOR // 2, rank=12, alpha=7.0, modules=modules,
                           dtype=torch.float32, seed=2, metadata={"ss_network_dim": "12", "ss_training_comment": "mine"})
    mixed = read_tensors(source)  # mixed ranks: every other module cut to rank 6
    for module in modules[::2]:
        mixed[f"{module}.lora_down.weight"] = mixed[f"{module}.lora_down.weight"][:6].clone()
        mixed[f"{module}.lora_up.weight"] = mixed[f"{module}.lora_up.weight"][:, :6].clone()
    write_safetensors(source, mixed, dict(read_header(source).metadata), overwrite=True)
    out = tmp_path / "r.safetensors"
    resize_file(source, out, ResizeOptions(rank=cap, method=method, method_param=param, verify=True))
    ours = read_tensors(out)
    for module in modules:
        change = lora_change(mixed, module)
        old_rank = mixed[f"{module}.lora_down.weight"].shape[0]
        u, sigma, vh = torch.linalg.svd(change, full_matrices=False)
        scale = 7.0 / old_rank
        rank = min(_kohya_rank(sigma / scale, method, param, cap), sigma.numel(), old_rank)
        assert ours[f"{module}.lora_down.weight"].shape[0] == rank, module
        best = (u[:, :rank] * sigma[:rank]) @ vh[:rank]
        assert float((lora_change(ours, module) - best).norm() / change.norm()) < 1e-4, module  # float32 math
        if rank < old_rank:  # alpha rewritten so the scale is kept: alpha' = s · r'
            assert float(ours[f"{module}.alpha"]) == pytest.approx(scale * rank, rel=1e-6)
    meta = read_header(out).metadata
    prefix = (f"dimension is resized from 12 to {cap}; " if method == "fixed"
              else f"Dynamic resize with {method}: {param} from 12; ")
    assert meta["ss_training_comment"] == prefix + "mine"
    assert meta["ss_network_dim"] == (str(cap) if method == "fixed" else "Dynamic")
    import hashlib
    import io

    import safetensors.torch
    data = safetensors.torch.save(ours, {k: v for k, v in meta.items() if k.startswith("ss_")})
    body = data[8 + int.from_bytes(data[:8], "little"):]
    assert meta["sshs_model_hash"] == hashlib.sha256(body).hexdigest()
    assert meta["sshs_legacy_hash"] == hashlib.sha256(io.BytesIO(data).getbuffer()[0x100000:0x110000]).hexdigest()[:8]


# -- convert: folding a non-power-of-two scale in fp16 -------------------------------------------------------------
def test_fold_of_alpha_7_rank_12_matches_torch_on_both_paths(tmp_path):
    source = build_network(tmp_path / "n.safetensors", "sdxl", rank=12, alpha=7.0, conv_rank=12, modules="c3lier", seed=4)
    fast_out, general_out = tmp_path / "fast.safetensors", tmp_path / "general.safetensors"
    assert try_convert(source, fast_out, ConvertOptions(target="diffusers")) is not None
    convert_file(source, general_out, ConvertOptions(target="diffusers"))
    assert fast_out.read_bytes() == general_out.read_bytes()
    ours, theirs = read_tensors(source), read_tensors(fast_out)
    module = "lora_unet_input_blocks_4_1_proj_in"  # scale 7/12 folded as 1 (down) x 7/12 (up)
    up = ours[f"{module}.lora_up.weight"]
    assert torch.equal(theirs["unet.down_blocks.1.attentions.0.proj_in.lora_B.weight"].view(torch.int16),
                       (up * (7 / 12)).view(torch.int16))


def test_fast_path_leaves_an_fp16_overflow_to_the_general_path(tmp_path):
    """alpha 64 / rank 4 folds as 4 x 4: an up value of 30000 becomes 120000, beyond fp16. The fast path wrote
    torch's inf while the general path saturates it (and says so); now the file goes the general way."""
    source = build_network(tmp_path / "n.safetensors", "sd1", rank=4, alpha=64.0, seed=5)
    tensors = read_tensors(source)
    key = next(k for k in sorted(tensors) if k.endswith("lora_up.weight"))
    tensors[key][0, 0] = 30000.0
    write_safetensors(source, tensors, {}, overwrite=True)
    fast_out, general_out = tmp_path / "fast.safetensors", tmp_path / "general.safetensors"
    assert try_convert(source, fast_out, ConvertOptions(target="diffusers")) is None
    assert not fast_out.exists()
    # below the limit the fast path still takes the file
    tensors[key][0, 0] = 100.0
    write_safetensors(source, tensors, {}, overwrite=True)
    assert try_convert(source, fast_out, ConvertOptions(target="diffusers")) is not None
    convert_file(source, general_out, ConvertOptions(target="diffusers"))
    assert fast_out.read_bytes() == general_out.read_bytes()
    assert np.isfinite(read_tensors(fast_out)[
        next(k for k in read_tensors(fast_out) if k.endswith("lora_B.weight"))].numpy()).all()


# -- the extracted networks in diffusers' own transformers ---------------------------------------------------------
def _tiny_transformer(arch: str):
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    torch.manual_seed(0)
    if arch == "sd3":
        return diffusers.SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=8, num_attention_heads=6,
            joint_attention_dim=128, caption_projection_dim=48, pooled_projection_dim=64, out_channels=16, pos_embed_max_size=48)
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=2, num_layers=1, num_single_layers=1, attention_head_dim=24, num_attention_heads=4,
        joint_attention_dim=128, pooled_projection_dim=24, guidance_embeds=True, axes_dims_rope=(8, 8, 8))


# shrinking keeps the 256-wide timestep embedding input and SD3's 64-wide patch output: not in the tiny models
NOT_SHRUNK = ("t_embedder_mlp_0", "final_layer_linear", "time_in_in_layer", "guidance_in_in_layer")


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_extracted_network_in_diffusers_layout_applies_the_tuned_change(tmp_path, arch):
    modules = [m for m in (SD3_MODULES if arch == "sd3" else FLUX_MODULES) if not m.endswith(NOT_SHRUNK)]
    keep = None if arch == "sd3" else 1
    base, tuned, net = pair(tmp_path, arch, modules, keep_blocks=keep)
    extracted = tmp_path / "x.safetensors"
    extract(base, tuned, extracted, ExtractOptions(linear=RankRule("fixed", 3), conv=RankRule("fixed", 3),
                                                   factor=FactorOptions(save_dtype=torch.float32, full_fallback=False)))
    convert_file(extracted, tmp_path / "d.safetensors", ConvertOptions(target="diffusers"))
    # the same base and tuned in diffusers names (rows split, SD3's last context adaLN / norm_out halves swapped)
    dbase = build_checkpoint(tmp_path / "db.safetensors", arch, factor=FACTOR, layout="diffusers", dtype=torch.float32,
                             keep_blocks=keep)
    dtuned = build_tuned(dbase, tmp_path / "dt.safetensors", net)
    model = _tiny_transformer(arch)
    own = model.state_dict()
    before = {k: v for k, v in read_tensors(dbase).items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(before, strict=False)
    model.load_lora_adapter(read_tensors(tmp_path / "d.safetensors"), prefix="transformer", adapter_name="x")
    model.fuse_lora(lora_scale=1.0)
    model.unload_lora()
    after, wanted = model.state_dict(), read_tensors(dtuned.path)
    checked = 0
    for key in dtuned.changed:
        change = wanted[key].double() - before[key].double()
        applied = after[key].double() - before[key].double()
        assert float((applied - change).norm() / change.norm()) < 1e-5, key
        checked += 1
    assert checked == len(dtuned.changed) and (arch != "sd3" or "transformer_blocks.23.norm1_context.linear.weight" in dtuned.changed)


def test_sd35_large_plan_covers_all_38_joint_blocks():
    """Header only: SD3.5 large (width 2432, 38 joint blocks, block 37 pre-only) gets every block linear."""
    from lytools.arch.manifests import checkpoint_manifest
    from lytools.extract import plan_extraction

    wider = {1536: 2432, 3072: 4864, 4608: 7296, 6144: 9728, 9216: 14592}
    medium = {key: tuple(wider.get(d, d) if i < 2 else d for i, d in enumerate(shape))
              for key, (shape, _) in checkpoint_manifest("sd3")["tensors"].items() if key.startswith(UNET)}
    shapes = {k: v for k, v in medium.items() if ".joint_blocks.23." not in k}
    for block in range(23, 38):
        for key, shape in medium.items():
            if ".joint_blocks.22." in key and not (block == 37 and ".context_block." in key
                                                   and (".attn.proj." in key or ".mlp." in key)):
                shapes[key.replace(".joint_blocks.22.", f".joint_blocks.{block}.")] = shape
    shapes[UNET + "joint_blocks.37.context_block.adaLN_modulation.1.weight"] = (2 * 2432, 2432)
    plan = plan_extraction(shapes, shapes, base_path=Path("b"), tuned_path=Path("t"))
    names = {module.name for module in plan.modules}
    assert plan.base_arch.variant == "3.5-large" and not plan.skipped
    assert {n for n in names if n.startswith("lora_unet_joint_blocks_")} == {
        f"lora_unet_joint_blocks_{b}_{side}_{part}" for b in range(38) for side in ("x_block", "context_block")
        for part in ("attn_qkv", "attn_proj", "mlp_fc1", "mlp_fc2", "adaLN_modulation_1")
        if not (b == 37 and side == "context_block" and part in ("attn_proj", "mlp_fc1", "mlp_fc2"))}


@pytest.mark.parametrize("variant,architecture", [("schnell", "flux-1-schnell/lora"), ("dev", "flux-1-dev/lora")])
def test_extract_names_the_flux_variant_in_its_metadata(tmp_path, variant, architecture):
    base = build_checkpoint(tmp_path / "b.safetensors", "flux", factor=FACTOR, components=["unet"], dtype=torch.float32,
                            keep_blocks=1, variant=variant)
    net = build_network(tmp_path / "n.safetensors", "flux", factor=FACTOR, rank=2, modules=["lora_unet_double_blocks_0_img_attn_qkv"])
    tuned = build_tuned(base, tmp_path / "t.safetensors", net)
    out = tmp_path / "x.safetensors"
    extract(base, tuned.path, out, ExtractOptions(linear=RankRule("fixed", 2)))
    meta = read_header(out).metadata
    assert meta["modelspec.architecture"] == architecture and meta["ss_base_model_version"] == "flux1"


def test_sd35_large_block_23_context_modulation_is_not_swapped(tmp_path):
    """SD3 medium's last block (23) stores its context adaLN as [shift; scale] (2 chunks, swapped in diffusers);
    in SD3.5 large block 23 is a full block (6 chunks, same order in both layouts). convert swapped those rows
    too, and the resolver placed a diffusers-named one swapped: wrong ΔW, silently."""
    from lytools.convert import load_network

    name = "lora_unet_joint_blocks_23_context_block_adaLN_modulation_1"
    generator = torch.Generator().manual_seed(3)
    width = 48
    kohya = {}
    for module, rows in ((name, 6 * width), ("lora_unet_joint_blocks_0_x_block_attn_qkv", 3 * width)):
        kohya[f"{module}.lora_down.weight"] = torch.randn(2, width, generator=generator)
        kohya[f"{module}.lora_up.weight"] = torch.randn(rows, 2, generator=generator)
        kohya[f"{module}.alpha"] = torch.tensor(2.0)
    write_safetensors(tmp_path / "k.safetensors", kohya, {})
    convert_file(tmp_path / "k.safetensors", tmp_path / "d.safetensors", ConvertOptions(target="diffusers", arch="sd3", fold=False))
    written = read_tensors(tmp_path / "d.safetensors")
    up = written["transformer.transformer_blocks.23.norm1_context.linear.lora_B.weight"]
    assert torch.equal(up, kohya[f"{name}.lora_up.weight"])  # rows kept in order
    back = load_network(tmp_path / "d.safetensors", arch="sd3")
    assert torch.equal(back.modules[name]["lora_up.weight"], kohya[f"{name}.lora_up.weight"])
    # diffusers' own SD3 transformer with 26 blocks: block 23 is a full block, block 25 the last
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    model = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, num_layers=26, attention_head_dim=8, num_attention_heads=6,
        joint_attention_dim=128, caption_projection_dim=48, pooled_projection_dim=64, out_channels=16, pos_embed_max_size=48)
    layer = model.transformer_blocks[23].norm1_context.linear
    before = layer.weight.detach().clone()
    model.load_lora_adapter({k: v for k, v in written.items() if ".transformer_blocks.23." in k}, prefix="transformer",
                            adapter_name="x")
    model.fuse_lora(lora_scale=1.0)
    applied = model.transformer_blocks[23].norm1_context.linear.weight.detach() - before
    expected = kohya[f"{name}.lora_up.weight"] @ kohya[f"{name}.lora_down.weight"]
    assert torch.allclose(applied, expected, atol=1e-5)
    # merging the diffusers-named module into an MMDiT checkpoint whose block 23 is full: rows in order
    base, _, _ = _sd35_like(tmp_path)
    merged = tmp_path / "merged.safetensors"
    merge_into_checkpoint(base, [tmp_path / "d.safetensors"], merged, allow_unmatched=True)
    key = UNET + "joint_blocks.23.context_block.adaLN_modulation.1.weight"
    change = read_tensors(merged)[key] - read_tensors(base)[key]
    assert torch.allclose(change, expected, atol=1e-5)


def test_diffusers_layout_sd35_modules_without_kohya_names_are_reported_not_dropped(tmp_path):
    """SD3.5 `attn2` and blocks from 24 in a diffusers-layout file were left out silently, then listed as
    skipped; now the name tables know them and they are extracted under their kohya names."""
    from lytools.extract import plan_extraction

    base = build_checkpoint(tmp_path / "d.safetensors", "sd3", factor=FACTOR, layout="diffusers", dtype=torch.float32)
    shapes = {name: info.shape for name, info in read_header(base).tensors.items()}
    assert not plan_extraction(shapes, shapes, base_path=Path("b"), tuned_path=Path("t")).skipped  # medium: all named
    for key, shape in list(shapes.items()):
        if key.startswith("transformer_blocks.22."):
            shapes[key.replace(".22.", ".24.")] = shape
    shapes["transformer_blocks.0.attn2.to_q.weight"] = (48, 48)
    shapes["transformer_blocks.0.attn2.to_k.weight"] = (48, 48)
    shapes["transformer_blocks.0.attn2.to_v.weight"] = (48, 48)
    shapes["transformer_blocks.0.attn2.to_out.0.weight"] = (48, 48)
    plan = plan_extraction(shapes, shapes, base_path=Path("b"), tuned_path=Path("t"))
    # SD3.5 names are in the tables now (tests/test_sd35_layouts.py): attn2 and block 24 extract under kohya names
    names = {module.name for module in plan.modules}
    assert {"lora_unet_joint_blocks_0_x_block_attn2_qkv", "lora_unet_joint_blocks_0_x_block_attn2_proj",
            "lora_unet_joint_blocks_24_context_block_mlp_fc2", "lora_unet_joint_blocks_24_context_block_adaLN_modulation_1",
            "lora_unet_joint_blocks_24_x_block_attn_qkv"} <= names
    assert not plan.skipped
