"""Merging into fp8 checkpoints: plain and scaled (per-tensor scale + `scaled_fp8` marker)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lytools.arch import module_table
from lytools.io import open_file, write_safetensors
from lytools.merge import merge_into_checkpoint, run_merge
from lytools.merge.fp8 import detect_fp8, requantize
from lytools.testing import build_checkpoint, build_network
from tests.shared import read_tensors as read_all

FP8 = torch.float8_e4m3fn
NAME = "lora_te_text_model_encoder_layers_1_mlp_fc2"
OTHER = "lora_te_text_model_encoder_layers_2_self_attn_q_proj"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fp8")
    source = read_all(build_checkpoint(folder / "fp32.safetensors", "sd1", factor=16, components=("clip_l",), dtype=torch.float32))
    plain, scaled = {}, {}
    for key, tensor in source.items():
        if tensor.dim() == 2 and key.endswith(".weight") and "embedding" not in key:
            plain[key] = tensor.to(FP8)
            scale = tensor.abs().max() / 200.0  # headroom: small changes keep the scale
            scaled[key] = (tensor / scale).to(FP8)
            scaled[key[: -len(".weight")] + ".scale_weight"] = scale.reshape(())
        else:
            plain[key] = scaled[key] = tensor
    scaled["scaled_fp8"] = torch.empty(0, dtype=FP8)
    write_safetensors(folder / "plain.safetensors", plain)
    write_safetensors(folder / "scaled.safetensors", scaled)
    net = build_network(folder / "lora.safetensors", "sd1", factor=16, rank=4, alpha=4.0, modules=[NAME, OTHER],
                        seed=4, dtype=torch.float32)
    return folder, net


def change_of(net: Path, name: str) -> torch.Tensor:
    tensors = read_all(net)
    up, down = tensors[f"{name}.lora_up.weight"], tensors[f"{name}.lora_down.weight"]
    return up @ down * (float(tensors[f"{name}.alpha"]) / down.shape[0])


def test_layout_detection(files):
    folder, _ = files
    with open_file(folder / "scaled.safetensors") as handle:
        layout = detect_fp8({i.name: i for i in handle.infos()})
    assert layout.kind == "scaled" and layout.markers == ["scaled_fp8"]
    key = module_table("sd1")[NAME].key
    assert layout.scale_of[key] == key[: -len(".weight")] + ".scale_weight"
    with open_file(folder / "plain.safetensors") as handle:
        assert detect_fp8({i.name: i for i in handle.infos()}).kind == "plain"


def test_plain_fp8_dequantize_add_requantize(files, tmp_path):
    folder, net = files
    out = tmp_path / "out.safetensors"
    merge_into_checkpoint(folder / "plain.safetensors", [net], out, ratios=[2.0])
    base, merged = read_all(folder / "plain.safetensors"), read_all(out)
    key = module_table("sd1")[NAME].key
    assert merged[key].dtype == FP8
    expected = (base[key].float() + 2.0 * change_of(net, NAME)).to(FP8)
    mismatched = (merged[key].float() != expected.float()).float().mean()
    assert mismatched < 0.01  # at most a rare one-step difference from float32 summation order
    for other, tensor in base.items():
        if other not in (key, module_table("sd1")[OTHER].key):
            assert torch.equal(merged[other].view(torch.uint8) if tensor.dtype == FP8 else merged[other],
                               tensor.view(torch.uint8) if tensor.dtype == FP8 else tensor)


def test_lost_changes_are_reported(files, tmp_path):
    folder, net = files
    result = merge_into_checkpoint(folder / "plain.safetensors", [net], tmp_path / "out.safetensors", ratios=[1e-4])
    lost = {loss.tensor: loss for loss in result.fp8_losses}
    key = module_table("sd1")[NAME].key
    assert key in lost and lost[key].modules == [NAME] and lost[key].kept < 0.5
    assert result.as_dict()["fp8_changes_lost"]


def test_scaled_fp8_keeps_scale_and_adds_to_true_weight(files, tmp_path):
    folder, net = files
    out = tmp_path / "out.safetensors"
    result = merge_into_checkpoint(folder / "scaled.safetensors", [net], out, ratios=[0.5])
    assert result.plan.fp8.kind == "scaled" and result.scale_raised == []
    base, merged = read_all(folder / "scaled.safetensors"), read_all(out)
    key = module_table("sd1")[NAME].key
    scale_key = key[: -len(".weight")] + ".scale_weight"
    assert torch.equal(merged[scale_key], base[scale_key])
    scale = float(base[scale_key])
    true = base[key].float() * scale + 0.5 * change_of(net, NAME)
    torch.testing.assert_close(merged[key].float() * scale, true, rtol=0.07, atol=scale * 0.02)
    assert not torch.equal(merged[key].view(torch.uint8), base[key].view(torch.uint8))
    assert "scaled_fp8" in merged


def test_scaled_fp8_raises_scale_instead_of_saturating(files, tmp_path):
    folder, net = files
    out = tmp_path / "out.safetensors"
    result = merge_into_checkpoint(folder / "scaled.safetensors", [net], out, ratios=[500.0])
    key = module_table("sd1")[NAME].key
    assert key in result.scale_raised and result.saturated == []
    merged, base = read_all(out), read_all(folder / "scaled.safetensors")
    scale_key = key[: -len(".weight")] + ".scale_weight"
    new_scale = float(merged[scale_key])
    true = base[key].float() * float(base[scale_key]) + 500.0 * change_of(net, NAME)
    assert new_scale > float(base[scale_key])
    torch.testing.assert_close(merged[key].float() * new_scale, true, rtol=0.07, atol=new_scale * 0.02)


def test_scaled_fp8_with_save_dtype_dequantizes(files, tmp_path):
    folder, net = files
    out = tmp_path / "out.safetensors"
    result = merge_into_checkpoint(folder / "scaled.safetensors", [net], out, save_dtype=torch.float16)
    merged, base = read_all(out), read_all(folder / "scaled.safetensors")
    assert "scaled_fp8" not in merged and not any(k.endswith(".scale_weight") for k in merged)
    assert "scaled_fp8" in result.plan.dropped
    key = module_table("sd1")[NAME].key
    scale = float(base[key[: -len(".weight")] + ".scale_weight"])
    true = base[key].float() * scale + change_of(net, NAME)
    assert merged[key].dtype == torch.float16
    torch.testing.assert_close(merged[key].float(), true, rtol=2e-3, atol=1e-4)
    untouched = "cond_stage_model.transformer.text_model.encoder.layers.5.mlp.fc1.weight"
    untouched_scale = float(base[untouched[: -len(".weight")] + ".scale_weight"])
    torch.testing.assert_close(merged[untouched].float(), (base[untouched].float() * untouched_scale).half().float())


def test_requantize_plain_saturates_and_says_so():
    weight = torch.tensor([1.0, 1000.0])
    result = requantize(weight, FP8, None)
    assert result.saturated and float(result.stored.float()[1]) == 448.0


@pytest.mark.parametrize("scale_shape", [(3,), (3, 1)])
def test_requantize_raises_only_the_rows_of_a_per_row_scale_that_need_it(scale_shape):
    scale = torch.tensor([0.5, 0.01, 2.0]).reshape(scale_shape)
    weight = torch.tensor([[1.0, -2.0], [-100.0, 3.0], [4.0, 0.5]])  # row 1 needs 100 / 448 > 0.01
    result = requantize(weight, FP8, scale)
    assert result.scale_raised and not result.saturated
    new = result.scale.reshape(-1)
    assert result.scale.shape == scale.shape and result.scale.dtype == scale.dtype
    assert float(new[0]) == 0.5 and float(new[2]) == 2.0  # rows that fit keep their scale
    assert float(new[1]) == pytest.approx(100.0 / 448.0)
    restored = result.stored.float() * new.reshape(3, 1)
    torch.testing.assert_close(restored, weight, rtol=0.07, atol=0.02)
    assert float(result.stored.float().abs().max()) <= 448.0


def test_requantize_per_row_scale_that_fits_is_kept():
    scale = torch.tensor([0.5, 0.25])
    weight = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    result = requantize(weight, FP8, scale)
    assert not result.scale_raised and torch.equal(result.scale, scale)


def test_per_row_scaled_checkpoint_merges_with_rows_raised(files, tmp_path):
    folder, net = files
    source = read_all(folder / "fp32.safetensors")
    rows = {}
    for key, tensor in source.items():
        if tensor.dim() == 2 and key.endswith(".weight") and "embedding" not in key:
            scale = tensor.abs().amax(dim=1) / 200.0  # one scale per output row
            rows[key] = (tensor / scale[:, None]).to(FP8)
            rows[key[: -len(".weight")] + ".weight_scale"] = scale
        else:
            rows[key] = tensor
    rows["scaled_fp8"] = torch.empty(0, dtype=FP8)
    ckpt = tmp_path / "rows.safetensors"
    write_safetensors(ckpt, rows)
    out = tmp_path / "out.safetensors"
    result = run_merge([ckpt, net], out, ratios=[500.0], verify=True)
    assert result.verification.failures == []
    key = module_table("sd1")[NAME].key
    scale_key = key[: -len(".weight")] + ".weight_scale"
    assert key in result.scale_raised and result.saturated == []
    merged = read_all(out)
    old_scale, new_scale = rows[scale_key], merged[scale_key]
    assert new_scale.shape == old_scale.shape and bool((new_scale >= old_scale).all())
    true = rows[key].float() * old_scale[:, None] + 500.0 * change_of(net, NAME)
    restored = merged[key].float() * new_scale[:, None]
    assert float((restored - true).norm() / true.norm()) < 0.05


def test_lost_changes_are_one_warning_and_listed_with_v(files, tmp_path, capsys):
    from lytools.cli import main

    folder, net = files
    main(["merge", str(folder / "plain.safetensors"), str(net), "-o", str(tmp_path / "o.safetensors"), "--ratios", "1e-4"])
    err = capsys.readouterr().err
    assert err.count("survives requantization") == 1 and "-v lists them" in err
    main(["merge", str(folder / "plain.safetensors"), str(net), "-o", str(tmp_path / "v.safetensors"), "--ratios", "1e-4", "-v"])
    detailed = capsys.readouterr().err
    assert detailed.count("survives requantization") > 2 and module_table("sd1")[NAME].key in detailed
