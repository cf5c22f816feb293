"""Merging networks into checkpoints: every architecture, fused rows, ratios, layouts, failures.

Expected results are computed here by direct math (ΔW = up @ down · alpha / rank placed at the
manifest's key and rows), independently of the resolver and the algos package.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lytools.arch import module_table
from lytools.errors import LytoolsError, MatchError, OutputExistsError
from lytools.io import file_hashes, open_file, write_safetensors
from lytools.merge import merge_into_checkpoint, run_merge
from lytools.testing import build_checkpoint, build_network
from tests.shared import read_tensors as read_all


def lora_modules(path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Return {module: (up, down, alpha)} of a kohya-layout LoRA file, float32."""
    tensors = read_all(path)
    modules = {}
    for key in tensors:
        if key.endswith(".lora_down.weight"):
            name = key[: -len(".lora_down.weight")]
            down = tensors[key].float()
            up = tensors[f"{name}.lora_up.weight"].float()
            alpha = float(tensors[f"{name}.alpha"]) if f"{name}.alpha" in tensors else float(down.shape[0])
            modules[name] = (up, down, alpha)
    return modules


def lora_delta(up: torch.Tensor, down: torch.Tensor, alpha: float) -> torch.Tensor:
    rank = down.shape[0]
    scale = alpha / rank if alpha else 1.0
    return (up.reshape(up.shape[0], -1) @ down.reshape(rank, -1)) * scale


def expected_changes(arch: str, factor: int, base: dict[str, torch.Tensor], networks: list[tuple[Path, float]],
                     key_of=None) -> dict[str, torch.Tensor]:
    """Return {checkpoint key: summed ratio·ΔW (float32, full tensor shape)} from the manifest table."""
    table = module_table(arch)
    changes: dict[str, torch.Tensor] = {}
    for path, ratio in networks:
        for name, (up, down, alpha) in lora_modules(path).items():
            target = table[name]
            key = key_of(target.key) if key_of else target.key
            shape = base[key].shape
            rows = slice(None)
            if target.rows is not None:
                rows = slice(target.rows[0] // factor, target.rows[1] // factor)
            change = changes.setdefault(key, torch.zeros(shape))
            change[rows] += ratio * lora_delta(up, down, alpha).reshape(change[rows].shape)
    return changes


def check_merged(out: dict[str, torch.Tensor], base: dict[str, torch.Tensor], changes: dict[str, torch.Tensor]) -> None:
    """Changed tensors equal base + change (to the dtype's rounding); every other tensor is bit-identical."""
    assert set(out) == set(base)
    for key, tensor in base.items():
        if key in changes:
            expected = (tensor.float() + changes[key]).to(tensor.dtype)
            assert out[key].dtype == tensor.dtype
            tolerance = dict(rtol=1e-2, atol=1e-3) if tensor.dtype == torch.bfloat16 else dict(rtol=2e-3, atol=2e-4)
            torch.testing.assert_close(out[key].float(), expected.float(), **tolerance, msg=key)
            assert not torch.equal(out[key], tensor), key
        else:
            assert out[key].dtype == tensor.dtype and torch.equal(out[key], tensor), key


ARCHES = {
    # arch: (factor, checkpoint components, network options)
    "sd1": (16, ("unet", "clip_l"), {"modules": "c3lier"}),
    "sd2": (16, ("unet", "clip_h"), {"modules": "c3lier"}),
    "sdxl": (32, ("unet", "clip_l", "clip_g"), {"modules": "c3lier"}),
    "sd3": (32, ("unet",), {"components": ("unet",)}),
    "flux": (32, ("unet", "clip_l"), {"components": ("unet", "te1")}),
}


@pytest.mark.parametrize("arch", sorted(ARCHES))
def test_merge_every_architecture(tmp_path, arch):
    factor, components, options = ARCHES[arch]
    keep = {"keep_blocks": 3} if arch in ("sd3", "flux") else {}
    ckpt = build_checkpoint(tmp_path / "base.safetensors", arch, factor=factor, components=components, **keep)
    base = read_all(ckpt)
    table = module_table(arch)
    modules = [n for n in build_modules(arch, options) if table[n].key in base]
    net = build_network(tmp_path / "lora.safetensors", arch, factor=factor, rank=4, alpha=2.0, modules=modules, seed=3)
    out_path = tmp_path / "out.safetensors"
    result = merge_into_checkpoint(ckpt, [net], out_path, ratios=[0.7])
    assert result.plan.arch == arch and result.plan.unmatched_count == 0
    changes = expected_changes(arch, factor, base, [(net, 0.7)])
    assert len(changes) == len(result.plan.touched)
    check_merged(read_all(out_path), base, changes)


def build_modules(arch: str, options: dict) -> list[str]:
    from lytools.testing import select_modules

    return select_modules(arch, options.get("modules", "lierla"), components=options.get("components"))


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd1")
    ckpt = build_checkpoint(folder / "base.safetensors", "sd1", factor=16, components=("unet", "clip_l"),
                            dtype=torch.float16, metadata={"modelspec.title": "base model", "sshs_model_hash": "stale"})
    a = build_network(folder / "a.safetensors", "sd1", factor=16, rank=4, alpha=2.0, modules="c3lier", seed=1)
    b = build_network(folder / "b.safetensors", "sd1", factor=16, rank=8, alpha=0.0, modules="lierla", seed=2,
                      dtype=torch.float32)
    return folder, ckpt, a, b


def test_two_networks_with_ratios(sd1, tmp_path):
    folder, ckpt, a, b = sd1
    out = tmp_path / "out.safetensors"
    merge_into_checkpoint(ckpt, [a, b], out, ratios=[0.5, -0.3])
    base = read_all(ckpt)
    check_merged(read_all(out), base, expected_changes("sd1", 16, base, [(a, 0.5), (b, -0.3)]))


def test_metadata_keeps_base_and_records_sources(sd1, tmp_path):
    folder, ckpt, a, b = sd1
    out = tmp_path / "out.safetensors"
    merge_into_checkpoint(ckpt, [a, b], out, ratios=[0.5, -0.3])
    with open_file(out) as handle:
        meta = handle.metadata
    assert "sshs_model_hash" not in meta  # stale hashes are never copied forward
    sources = json.loads(meta["lytools.sources"])
    assert [s["name"] for s in sources] == ["base.safetensors", "a.safetensors", "b.safetensors"]
    assert sources[0]["autov3"] == file_hashes(ckpt).autov3
    assert sources[1]["autov3"] == file_hashes(a).autov3
    assert [s.get("ratio") for s in sources] == [None, "0.5", "-0.3"]


def test_ratio_for_scales_matching_modules(sd1, tmp_path):
    folder, ckpt, a, _ = sd1
    out = tmp_path / "out.safetensors"
    merge_into_checkpoint(ckpt, [a], out, ratios=[1.0], ratio_for=["attn2=0", r"_resnets_\d+_conv1$=-2"])
    base = read_all(ckpt)
    changes = expected_changes("sd1", 16, base, [(a, 1.0)])
    table = module_table("sd1")
    for name in lora_modules(a):
        key = table[name].key
        if "attn2" in name:
            changes.pop(key)  # ratio 0: no change at all
        elif name.endswith("conv1") and "_resnets_" in name:
            changes[key] *= -2
    out_tensors = read_all(out)
    for name in lora_modules(a):
        if "attn2" in name:
            assert torch.equal(out_tensors[table[name].key], base[table[name].key])
    check_changed = {k: v for k, v in changes.items()}
    for key, tensor in base.items():
        if key in check_changed:
            expected = (tensor.float() + check_changed[key]).to(tensor.dtype)
            torch.testing.assert_close(out_tensors[key].float(), expected.float(), rtol=2e-3, atol=2e-4)


def test_fused_rows_change_only_their_rows(tmp_path):
    ckpt = build_checkpoint(tmp_path / "sd2.safetensors", "sd2", factor=8, components=("clip_h",))
    name = "lora_te_text_model_encoder_layers_3_self_attn_k_proj"
    net = build_network(tmp_path / "k.safetensors", "sd2", factor=8, rank=4, modules=[name], seed=5)
    out = tmp_path / "out.safetensors"
    merge_into_checkpoint(ckpt, [net], out)
    base, merged = read_all(ckpt), read_all(out)
    key = "cond_stage_model.model.transformer.resblocks.3.attn.in_proj_weight"
    width = base[key].shape[0] // 3
    assert torch.equal(merged[key][:width], base[key][:width])
    assert torch.equal(merged[key][2 * width:], base[key][2 * width:])
    up, down, alpha = lora_modules(net)[name]
    expected = (base[key][width:2 * width].float() + lora_delta(up, down, alpha)).to(base[key].dtype)
    torch.testing.assert_close(merged[key][width:2 * width].float(), expected.float(), rtol=2e-3, atol=2e-4)
    check_merged(merged, base, expected_changes("sd2", 8, base, [(net, 1.0)]))


def test_flux_fused_module_into_diffusers_layout(tmp_path):
    """A kohya module on BFL's fused qkv/linear1 lands split over diffusers to_q/to_k/to_v/proj_mlp."""
    native = build_checkpoint(tmp_path / "native.safetensors", "flux", factor=16, components=("unet",), keep_blocks=2)
    split = build_checkpoint(tmp_path / "diffusers.safetensors", "flux", factor=16, layout="diffusers", keep_blocks=2)
    names = ["lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_1_linear1", "lora_unet_double_blocks_1_txt_mlp_0"]
    net = build_network(tmp_path / "lora.safetensors", "flux", factor=16, rank=4, alpha=1.0, modules=names, seed=9)
    merge_into_checkpoint(native, [net], tmp_path / "native-out.safetensors", ratios=[0.8])
    merge_into_checkpoint(split, [net], tmp_path / "split-out.safetensors", ratios=[0.8])
    native_out, split_out, split_base = (read_all(tmp_path / f"{n}.safetensors") for n in ("native-out", "split-out", "diffusers"))
    prefix = "model.diffusion_model."
    q = split_out["transformer_blocks.0.attn.to_q.weight"]
    k = split_out["transformer_blocks.0.attn.to_k.weight"]
    v = split_out["transformer_blocks.0.attn.to_v.weight"]
    # same math; the fused route adds in place (addmm), the split one through apply_module: bf16 rounding apart
    bf16 = dict(rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(torch.cat([q, k, v]), native_out[prefix + "double_blocks.0.img_attn.qkv.weight"], **bf16)
    parts = [split_out[f"single_transformer_blocks.1.{p}.weight"] for p in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")]
    torch.testing.assert_close(torch.cat(parts), native_out[prefix + "single_blocks.1.linear1.weight"], **bf16)
    changed = {k for k in split_out if not torch.equal(split_out[k], split_base[k])}
    assert len(changed) == 3 + 4 + 1


def test_sd1_diffusers_layout_checkpoint(sd1, tmp_path):
    folder, _, a, _ = sd1
    ckpt = build_checkpoint(tmp_path / "unet.safetensors", "sd1", factor=16, layout="diffusers")
    out = tmp_path / "out.safetensors"
    result = merge_into_checkpoint(ckpt, [a], out, allow_unmatched=True)
    assert result.plan.layout == "diffusers"
    unet_modules = [n for n in lora_modules(a) if n.startswith("lora_unet_")]
    assert len(result.plan.inputs[0].unmatched) == len(lora_modules(a)) - len(unet_modules)  # text encoder absent
    base, merged = read_all(ckpt), read_all(out)
    for name in unet_modules[:40]:
        key = name[len("lora_unet_"):]
        candidates = [k for k in base if k.replace(".", "_") == key + "_weight"]
        assert len(candidates) == 1, name
        up, down, alpha = lora_modules(a)[name]
        expected = (base[candidates[0]].float() + lora_delta(up, down, alpha).reshape(base[candidates[0]].shape))
        torch.testing.assert_close(merged[candidates[0]].float(), expected.to(torch.float16).float(), rtol=2e-3, atol=2e-4)


def test_unmatched_modules_fail_or_warn(sd1, tmp_path):
    folder, ckpt, a, _ = sd1
    tensors = read_all(a)
    tensors["lora_unet_no_such_block_proj.lora_down.weight"] = torch.zeros(4, 20, dtype=torch.float16)
    tensors["lora_unet_no_such_block_proj.lora_up.weight"] = torch.zeros(20, 4, dtype=torch.float16)
    extra = tmp_path / "extra.safetensors"
    write_safetensors(extra, tensors)
    out = tmp_path / "out.safetensors"
    with pytest.raises(MatchError, match="lora_unet_no_such_block_proj"):
        merge_into_checkpoint(ckpt, [extra], out)
    assert not out.exists()
    result = merge_into_checkpoint(ckpt, [extra], out, allow_unmatched=True)
    assert result.plan.unmatched_count == 1
    base = read_all(ckpt)
    check_merged(read_all(out), base, expected_changes("sd1", 16, base, [(a, 1.0)]))


def test_shape_mismatch_is_an_error(sd1, tmp_path):
    folder, ckpt, _, _ = sd1
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    bad = tmp_path / "bad.safetensors"
    write_safetensors(bad, {f"{name}.lora_down.weight": torch.zeros(4, 21), f"{name}.lora_up.weight": torch.zeros(20, 4)})
    with pytest.raises(MatchError, match=name):
        merge_into_checkpoint(ckpt, [bad], tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_failure_midway_leaves_no_output(sd1, tmp_path, monkeypatch):
    folder, ckpt, a, _ = sd1
    import lytools.merge.checkpoint as engine

    calls = {"n": 0}
    real = engine._Engine.compute

    def failing(self, group):
        calls["n"] += 1
        if calls["n"] == 50:
            raise LytoolsError("simulated failure")
        return real(self, group)

    monkeypatch.setattr(engine._Engine, "compute", failing)
    out = tmp_path / "out.safetensors"
    with pytest.raises(LytoolsError, match="simulated"):
        merge_into_checkpoint(ckpt, [a], out)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_refused_without_overwrite(sd1, tmp_path):
    folder, ckpt, a, _ = sd1
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(OutputExistsError):
        run_merge([ckpt, a], out)
    assert out.read_bytes() == b"keep me"
    run_merge([ckpt, a], out, overwrite=True)
    assert out.stat().st_size > 1000


def test_dry_run_writes_nothing(sd1, tmp_path):
    folder, ckpt, a, b = sd1
    out = tmp_path / "out.safetensors"
    result = run_merge([ckpt, a, b], out, ratios=[0.5, -0.3], dry_run=True)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    text = "\n".join(result.plan.lines())
    assert "a.safetensors x 0.5: 350/350 modules matched" in text
    assert "b.safetensors x -0.3: 264/264 modules matched" in text
    assert result.plan.output_bytes == (ckpt.stat().st_size - read_header_len(ckpt))


def read_header_len(path: Path) -> int:
    from lytools.io import read_header

    return read_header(path).data_start


def test_save_dtype_casts_floats_only(sd1, tmp_path):
    folder, ckpt, a, _ = sd1
    out = tmp_path / "out.safetensors"
    merge_into_checkpoint(ckpt, [a], out, save_dtype=torch.float32)
    base, merged = read_all(ckpt), read_all(out)
    for key, tensor in base.items():
        if tensor.is_floating_point():
            assert merged[key].dtype == torch.float32
        else:
            assert merged[key].dtype == tensor.dtype and torch.equal(merged[key], tensor)
    changes = expected_changes("sd1", 16, base, [(a, 1.0)])
    key = next(iter(changes))
    # computed in float32 from the fp16 base and cast once: no fp16 rounding of the sum
    torch.testing.assert_close(merged[key], base[key].float() + changes[key], rtol=1e-5, atol=1e-6)


def test_inpainting_conv_in_is_zero_padded(tmp_path):
    ckpt = build_checkpoint(tmp_path / "inpaint.safetensors", "sd1", factor=16, components=("unet",), in_channels=9,
                            dtype=torch.float16)
    name = "lora_unet_conv_in"
    down = torch.randn(4, 4, 3, 3, generator=torch.Generator().manual_seed(0)) * 0.1
    up = torch.randn(20, 4, 1, 1, generator=torch.Generator().manual_seed(1)) * 0.1
    net = tmp_path / "conv_in.safetensors"
    write_safetensors(net, {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(2.0)})
    out = tmp_path / "out.safetensors"
    result = merge_into_checkpoint(ckpt, [net], out)
    assert result.plan.inputs[0].padded == [name]
    key = "model.diffusion_model.input_blocks.0.0.weight"
    base, merged = read_all(ckpt)[key], read_all(out)[key]
    assert base.shape[1] == 9
    change = (up.reshape(20, 4) @ down.reshape(4, -1) * 0.5).reshape(20, 4, 3, 3)
    torch.testing.assert_close(merged[:, :4].float(), (base[:, :4].float() + change).half().float(), rtol=2e-3, atol=2e-4)
    assert torch.equal(merged[:, 4:], base[:, 4:])


def test_dora_and_lora_apply_in_order(tmp_path):
    """Non-additive networks are applied to the result of the previous one (ALGORITHMS.md 1.5)."""
    ckpt = build_checkpoint(tmp_path / "base.safetensors", "sd1", factor=16, components=("clip_l",), dtype=torch.float32)
    name = "lora_te_text_model_encoder_layers_0_mlp_fc1"
    plain = build_network(tmp_path / "plain.safetensors", "sd1", factor=16, rank=4, modules=[name], seed=1, dtype=torch.float32)
    dora = build_network(tmp_path / "dora.safetensors", "sd1", factor=16, rank=4, modules=[name], seed=2, dora=True,
                         dtype=torch.float32)
    key = module_table("sd1")[name].key
    weight = read_all(ckpt)[key]
    p_up, p_down, p_alpha = lora_modules(plain)[name]
    d_up, d_down, d_alpha = lora_modules(dora)[name]
    magnitude = read_all(dora)[f"{name}.dora_scale"].float()

    def apply_dora(w, m):
        adapted = w + lora_delta(d_up, d_down, d_alpha)
        norm = adapted.norm(dim=1, keepdim=True) + 1.1920929e-07
        return adapted * (m * (magnitude / norm - 1) + 1)

    for order, expected in (
        ([plain, dora], apply_dora(weight + 0.5 * lora_delta(p_up, p_down, p_alpha), 0.8)),
        ([dora, plain], apply_dora(weight, 0.8) + 0.5 * lora_delta(p_up, p_down, p_alpha)),
    ):
        out = tmp_path / "out.safetensors"
        ratios = [0.5, 0.8] if order[0] == plain else [0.8, 0.5]
        merge_into_checkpoint(ckpt, order, out, ratios=ratios, overwrite=True)
        torch.testing.assert_close(read_all(out)[key], expected, rtol=1e-5, atol=1e-6)


def test_verify_passes_on_a_good_merge(sd1, tmp_path):
    folder, ckpt, a, b = sd1
    result = run_merge([ckpt, a, b], tmp_path / "out.safetensors", ratios=[0.5, -0.3], verify=True)
    report = result.verification
    assert report.failures == [] and report.checked == len(result.plan.out_dtypes)
    assert 0 < report.worst_relative_error < 0.5  # fp16 rounding of the changed weights


def test_tlora_is_refused_before_writing(sd1, tmp_path):
    folder, ckpt, _, _ = sd1
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    tlora = tmp_path / "t.safetensors"
    write_safetensors(tlora, {f"{name}.q_layer.weight": torch.zeros(2, 20), f"{name}.p_layer.weight": torch.zeros(20, 2),
                              f"{name}.lambda_layer": torch.ones(1, 2)})
    from lytools.errors import UnsupportedError

    with pytest.raises(UnsupportedError, match=name):
        merge_into_checkpoint(ckpt, [tlora], tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_pickled_base_merges_like_safetensors(sd1, tmp_path):
    folder, ckpt, a, _ = sd1
    pickled = tmp_path / "base.ckpt"
    torch.save({"state_dict": read_all(ckpt), "global_step": 10}, pickled)
    merge_into_checkpoint(pickled, [a], tmp_path / "from-ckpt.safetensors")
    merge_into_checkpoint(ckpt, [a], tmp_path / "from-st.safetensors")
    from_ckpt, from_st = read_all(tmp_path / "from-ckpt.safetensors"), read_all(tmp_path / "from-st.safetensors")
    assert from_ckpt.keys() == from_st.keys()
    assert all(torch.equal(from_ckpt[k], from_st[k]) for k in from_st)


def test_dora_mode_comfy_interpolates_between_base_and_full_result(tmp_path):
    """--dora-mode comfy: W + m·(W_dora − W), with W_dora the ratio-1 result (ALGORITHMS.md 7)."""
    ckpt = build_checkpoint(tmp_path / "base.safetensors", "sd1", factor=16, components=("clip_l",), dtype=torch.float32)
    name = "lora_te_text_model_encoder_layers_0_mlp_fc1"
    dora = build_network(tmp_path / "dora.safetensors", "sd1", factor=16, rank=4, modules=[name], seed=2, dora=True,
                         dtype=torch.float32)
    key = module_table("sd1")[name].key
    weight = read_all(ckpt)[key]
    merged = {}
    for mode, ratio in (("lycoris", 1.0), ("comfy", 1.0), ("lycoris", 0.7), ("comfy", 0.7)):
        out = tmp_path / f"{mode}-{ratio}.safetensors"
        result = run_merge([ckpt, dora], out, ratios=[ratio], dora_mode=mode, verify=True)
        assert result.verification.failures == [] and result.plan.as_dict()["dora_mode"] == mode
        merged[mode, ratio] = read_all(out)[key]
    full = merged["lycoris", 1.0]
    torch.testing.assert_close(merged["comfy", 1.0], full, rtol=1e-6, atol=1e-6)  # the same up to rounding
    torch.testing.assert_close(merged["comfy", 0.7], weight + 0.7 * (full - weight), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(merged["lycoris", 0.7], merged["comfy", 0.7], rtol=1e-4, atol=1e-5)


def test_dora_mode_is_refused_for_network_merges(tmp_path, sd1):
    _, _, a, b = sd1
    with pytest.raises(LytoolsError, match="--dora-mode applies when merging into a checkpoint"):
        run_merge([a, b], tmp_path / "out.safetensors", dora_mode="comfy")
    with pytest.raises(LytoolsError, match="unknown DoRA mode"):
        merge_into_checkpoint(sd1[1], [a], tmp_path / "o.safetensors", dora_mode="a1111")


def test_dora_mode_on_the_command_line(tmp_path, sd1, capsys):
    from tests.test_convert import run_cli

    _, ckpt, a, b = sd1
    code, _, err = run_cli(capsys, "merge", str(a), str(b), "-o", str(tmp_path / "n.safetensors"), "--dora-mode", "comfy")
    assert code == 2 and "--dora-mode applies when merging into a checkpoint" in err
    code, out, _ = run_cli(capsys, "merge", str(ckpt), str(a), "--dry-run", "--json", "--dora-mode", "comfy")
    assert code == 0 and json.loads(out)["dora_mode"] == "comfy"


def test_dora_mode_without_dora_warns_and_dora_sums_point_to_a_checkpoint(tmp_path, sd1, capsys):
    from tests.test_convert import run_cli

    _, ckpt, a, _ = sd1
    code, _, err = run_cli(capsys, "merge", str(ckpt), str(a), "--dry-run", "--dora-mode", "comfy")
    assert code == 0 and "--dora-mode comfy: no network holds DoRA modules" in err
    code, _, err = run_cli(capsys, "merge", str(ckpt), str(a), "--dry-run")
    assert code == 0 and "--dora-mode" not in err
    name = "lora_te_text_model_encoder_layers_0_mlp_fc1"
    plain = build_network(tmp_path / "plain.safetensors", "sd1", factor=16, rank=4, modules=[name], seed=1)
    dora = build_network(tmp_path / "dora.safetensors", "sd1", factor=16, rank=4, modules=[name], seed=2, dora=True)
    code, _, err = run_cli(capsys, "merge", str(dora), str(plain), "-o", str(tmp_path / "x.safetensors"))
    assert code == 1 and "merge them into a checkpoint" in err and "--rank" not in err


def test_ratio_zero_warns_naming_the_input(sd1, tmp_path, capsys):
    """A network at ratio 0 changes nothing: said on stderr (exit 0); all at 0 into a checkpoint is a plain copy."""
    from tests.shared import run_lytools

    _, ckpt, a, b = sd1
    out = tmp_path / "zero.safetensors"
    code, _, err = run_lytools(capsys, "merge", ckpt, a, "--ratios", "0", "-o", out)
    assert code == 0
    assert "warning: ratio 0 for a.safetensors: it changes nothing" in err
    assert "every ratio is 0: the output is a plain copy of base.safetensors" in err
    merged, base = read_all(out), read_all(ckpt)
    assert merged.keys() == base.keys() and all(torch.equal(merged[k], base[k]) for k in base)
    code, _, err = run_lytools(capsys, "merge", ckpt, a, b, "--ratios", "1", "0", "--dry-run")
    assert code == 0 and "ratio 0 for b.safetensors: it changes nothing" in err
    assert "a.safetensors" not in err and "every ratio is 0" not in err
    code, _, err = run_lytools(capsys, "merge", ckpt, a, b, "--dry-run")
    assert code == 0 and "ratio 0" not in err


def test_ratio_for_that_zeroes_every_module_warns(sd1, tmp_path, capsys):
    """--ratio-for can bring every module to 0 with every --ratios at 1: the merge changes nothing, said as for
    ratio 0 (it was silent); a rule that leaves one module is not warned."""
    from tests.shared import run_lytools

    _, ckpt, a, b = sd1
    code, _, err = run_lytools(capsys, "merge", ckpt, a, b, "--ratio-for", "lora_=0", "-o", tmp_path / "c.safetensors")
    assert code == 0 and "--ratio-for brings every module to ratio 0: the output is a plain copy of base.safetensors" in err
    merged, base = read_all(tmp_path / "c.safetensors"), read_all(ckpt)
    assert all(torch.equal(merged[k], base[k]) for k in base)
    code, _, err = run_lytools(capsys, "merge", a, b, "--ratio-for", "_te_=0", "--ratio-for", "_unet_=-0", "--dry-run")
    assert code == 0 and "--ratio-for brings every module to ratio 0: the merged network changes nothing" in err
    code, _, err = run_lytools(capsys, "merge", a, b, "--ratio-for", "_te_=0", "--dry-run")
    assert code == 0 and "every module" not in err


def test_ratio_zero_dora_under_the_lycoris_rule_still_changes_the_weight(sd1, tmp_path, capsys):
    """LyCORIS scales only a DoRA module's magnitude by the ratio: at 0 its direction change still lands,
    so the warning says so instead of "changes nothing" (and no "plain copy")."""
    from tests.shared import run_lytools

    _, ckpt, _, _ = sd1
    name = "lora_te_text_model_encoder_layers_0_mlp_fc1"
    dora = build_network(tmp_path / "dora.safetensors", "sd1", factor=16, rank=4, modules=[name], seed=2, dora=True)
    out = tmp_path / "dora0.safetensors"
    code, _, err = run_lytools(capsys, "merge", ckpt, dora, "--ratios", "0", "-o", out)
    assert code == 0 and "ratio 0 for dora.safetensors" in err and "1 DoRA module(s) still apply" in err
    assert "changes nothing\n" not in err and "plain copy" not in err
    key = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
    assert not torch.equal(read_all(out)[key], read_all(ckpt)[key])
    code, _, err = run_lytools(capsys, "merge", ckpt, dora, "--ratios", "0", "--dora-mode", "comfy", "--dry-run")
    assert code == 0 and "ratio 0 for dora.safetensors: it changes nothing" in err and "plain copy" in err


def test_checkpoint_modelspec_is_dated_titled_and_lists_what_was_merged(sd1, tmp_path):
    """FORMATS.md 5.3: a base's modelspec gets date now, the output's title and merged_from (sd-scripts'
    merge lists the base first); a base without a modelspec gets none; other keys are kept."""
    from datetime import datetime

    _, ckpt, a, b = sd1
    dated = tmp_path / "dated.safetensors"
    old = {"modelspec.sai_model_spec": "1.0.0", "modelspec.title": "base model", "modelspec.date": "2023-01-01T00:00:00",
           "modelspec.architecture": "stable-diffusion-v1", "modelspec.author": "someone"}
    write_safetensors(dated, read_all(ckpt), old)
    out = tmp_path / "my merge.safetensors"
    before = datetime.now().replace(microsecond=0)
    merge_into_checkpoint(dated, [a, b], out, ratios=[0.5, -0.3])
    with open_file(out) as handle:
        meta = handle.metadata
    assert meta["modelspec.title"] == "my merge"
    assert before <= datetime.fromisoformat(meta["modelspec.date"]) <= datetime.now()
    assert len(meta["modelspec.date"]) == len("2023-01-01T00:00:00")
    assert meta["modelspec.merged_from"] == "dated.safetensors, a.safetensors, b.safetensors"
    assert meta["modelspec.author"] == "someone" and meta["modelspec.architecture"] == "stable-diffusion-v1"
    plain = tmp_path / "plain.safetensors"
    write_safetensors(plain, read_all(ckpt), {"format": "pt"})
    merge_into_checkpoint(plain, [a], tmp_path / "plain-out.safetensors")
    with open_file(tmp_path / "plain-out.safetensors") as handle:
        assert not [key for key in handle.metadata if key.startswith("modelspec.")]
        assert handle.metadata["format"] == "pt"


def _count_unpicklings(monkeypatch) -> list[str]:
    """Record the name of every file lytools unpickles from now on (the list fills as they are read)."""
    import lytools.io.pickled as pickled

    opened: list[str] = []
    original = pickled.load_pickled_state_dict

    def counting(path):
        opened.append(Path(path).name)
        return original(path)

    monkeypatch.setattr(pickled, "load_pickled_state_dict", counting)
    return opened


def test_pickled_base_is_unpickled_once(sd1, tmp_path, monkeypatch):
    """run_merge reads the first input's kind, merges and --verify's from one opening: a pickled base (slow,
    possibly read whole into memory) is unpickled once, not once per step."""
    _, ckpt, a, _ = sd1
    base = tmp_path / "base.ckpt"
    torch.save({"state_dict": read_all(ckpt), "global_step": 10}, base)
    opened = _count_unpicklings(monkeypatch)
    run_merge([base, a], tmp_path / "dry.safetensors", dry_run=True)
    assert opened == ["base.ckpt"]
    opened.clear()
    out = tmp_path / "out.safetensors"
    result = run_merge([base, a], out, verify=True)
    assert opened == ["base.ckpt"]
    assert result.verification.checked and not result.verification.failures
    merge_into_checkpoint(ckpt, [a], tmp_path / "from-st.safetensors")
    from_st = read_all(tmp_path / "from-st.safetensors")
    assert all(torch.equal(tensor, from_st[key]) for key, tensor in read_all(out).items())


def test_pickled_network_is_unpickled_once(sd1, tmp_path, monkeypatch):
    """A pickled network after the first input is unpickled once per merge (for its kind, the merge and
    --verify), into a checkpoint and into a network, and merges as its .safetensors twin does."""
    _, ckpt, a, b = sd1
    pickled_b = tmp_path / "b.pt"
    torch.save(read_all(b), pickled_b)
    opened = _count_unpicklings(monkeypatch)
    for inputs in ([ckpt, a, pickled_b], [a, pickled_b]):
        opened.clear()
        run_merge(inputs, tmp_path / "dry.safetensors", dry_run=True)
        assert opened == ["b.pt"]
        opened.clear()
        out = tmp_path / f"from-pt-{len(inputs)}.safetensors"
        result = run_merge(inputs, out, verify=True)
        assert opened == ["b.pt"]
        assert result.verification.checked and not result.verification.failures
        twin = tmp_path / f"from-st-{len(inputs)}.safetensors"
        run_merge([b if p == pickled_b else p for p in inputs], twin)
        from_st = read_all(twin)
        assert all(torch.equal(tensor, from_st[key]) for key, tensor in read_all(out).items())


def test_output_naming_an_input_is_refused_even_with_overwrite(sd1, tmp_path):
    _, ckpt, a, b = sd1
    base = tmp_path / "base.safetensors"
    base.write_bytes(ckpt.read_bytes())
    network = tmp_path / "a.safetensors"
    network.write_bytes(a.read_bytes())
    before = base.read_bytes(), network.read_bytes()
    for inputs, out in (([base, a], base), ([network, b], network), ([ckpt, network], tmp_path / "." / "a.safetensors")):
        for dry_run in (False, True):
            with pytest.raises(LytoolsError, match="would replace the input"):
                run_merge(inputs, out, overwrite=True, dry_run=dry_run)
    assert (base.read_bytes(), network.read_bytes()) == before


def test_output_folder_holding_an_input_is_refused_even_with_overwrite(sd1, tmp_path):
    """Into a diffusers folder, --overwrite replaces the output folder whole: a network inside it was deleted."""
    from tests.test_container_audit import write_diffusers_folder

    _, ckpt, a, _ = sd1
    source = write_diffusers_folder(ckpt, tmp_path / "pipeline", extra_files=False)
    old = write_diffusers_folder(ckpt, tmp_path / "old", extra_files=False)
    network = old / "a.safetensors"
    network.write_bytes(a.read_bytes())
    for dry_run in (False, True):
        with pytest.raises(LytoolsError, match="would delete the input"):
            run_merge([source, network], old, overwrite=True, dry_run=dry_run)
    assert network.read_bytes() == a.read_bytes()
    run_merge([source, a], old, overwrite=True)  # an input outside it: replaced as asked
    assert not network.exists() and (old / "model_index.json").is_file()


def test_dry_run_checks_the_output_as_the_real_run_would(sd1, tmp_path):
    from lytools.errors import UsageError

    _, ckpt, a, _ = sd1
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(OutputExistsError):
        run_merge([ckpt, a], out, dry_run=True)
    assert run_merge([ckpt, a], out, dry_run=True, overwrite=True).plan.inputs
    with pytest.raises(UsageError, match="--verify checks a written output"):
        run_merge([ckpt, a], None, dry_run=True, verify=True)
    assert out.read_bytes() == b"keep me"


def test_keep_ema_without_an_ema_copy_says_it_changes_nothing(sd1, tmp_path, capsys):
    from tests.test_convert import run_cli

    _, ckpt, a, _ = sd1
    code, _, err = run_cli(capsys, "merge", str(ckpt), str(a), "--dry-run", "--keep-ema")
    assert code == 0 and "--keep-ema changes nothing" in err and ckpt.name in err
    pickled = tmp_path / "ema.ckpt"
    tensors = read_all(ckpt)
    tensors["model_ema.decay"] = torch.tensor(0.9999)
    torch.save({"state_dict": tensors}, pickled)
    code, _, err = run_cli(capsys, "merge", str(pickled), str(a), "--dry-run", "--keep-ema")
    assert code == 0 and "--keep-ema changes nothing" not in err
