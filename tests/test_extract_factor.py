"""extract_module: the stored tensors of one module, rebuilt by lytools.algos, reproduce the
difference within the SVD bound; Tucker, clamping, sparse residual, full fallback."""

from __future__ import annotations

import math

import pytest
import torch

from lytools.algos import NetworkModule, delta
from lytools.extract.factor import FactorOptions, extract_module, tucker_split
from lytools.extract.ranks import RankRule


def low_rank_plus_noise(shape, rank, noise, seed=0):
    generator = torch.Generator().manual_seed(seed)
    out = shape[0]
    flat_in = math.prod(shape[1:])
    a = torch.randn(out, rank, generator=generator)
    b = torch.randn(rank, flat_in, generator=generator) / math.sqrt(flat_in)
    return ((a @ b) + noise * torch.randn(out, flat_in, generator=generator)).reshape(shape)


def svd_bound(matrix: torch.Tensor, rank: int) -> float:
    sigma = torch.linalg.svdvals(matrix.reshape(matrix.shape[0], -1).double())
    return math.sqrt(float(sigma[rank:].square().sum()) / float(sigma.square().sum()))


def rebuilt(name: str, tensors: dict[str, torch.Tensor], shape) -> torch.Tensor:
    return delta(NetworkModule(name, dict(tensors)), shape)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm((a - b).double()) / torch.linalg.vector_norm(b.double()))


FP16 = FactorOptions()
FP32 = FactorOptions(save_dtype=torch.float32)


@pytest.mark.parametrize("shape", [(96, 160), (160, 96), (64, 32, 3, 3), (64, 48, 1, 1)])
def test_merged_back_within_the_svd_bound(shape):
    difference = low_rank_plus_noise(shape, 6, 0.01, seed=1)
    result = extract_module("lora_unet_x", difference, RankRule("fixed", 8), FP32)
    tensors = result.tensors
    assert set(tensors) == {"lora_down.weight", "lora_up.weight", "alpha"}
    assert tensors["alpha"].shape == () and float(tensors["alpha"]) == 8.0
    if len(shape) == 4:
        assert tensors["lora_down.weight"].shape == (8,) + shape[1:]
        assert tensors["lora_up.weight"].shape == (shape[0], 8, 1, 1)
    else:
        assert tensors["lora_down.weight"].shape == (8, shape[1])
        assert tensors["lora_up.weight"].shape == (shape[0], 8)
    error = rel(rebuilt("lora_unet_x", tensors, shape), difference)
    bound = svd_bound(difference, 8)
    assert error <= 1.01 * bound + 1e-6
    assert result.record.rel_error == pytest.approx(error, rel=1e-3, abs=1e-6)
    assert result.record.retained_energy == pytest.approx(1 - error ** 2, abs=1e-6)


def test_fp16_factors_stay_close_and_the_report_measures_the_cast():
    difference = low_rank_plus_noise((128, 320), 4, 0.0, seed=2) * 1e-3  # fine-tune deltas are small
    result = extract_module("m", difference, RankRule("fixed", 4), FP16)
    assert result.tensors["lora_up.weight"].dtype == torch.float16
    assert result.tensors["alpha"].dtype == torch.float16
    error = rel(rebuilt("m", result.tensors, difference.shape), difference)
    assert error < 2e-3  # √σ split keeps both factors well inside fp16's range
    assert result.record.rel_error == pytest.approx(error, rel=1e-2)


def test_dynamic_modes_pick_the_rank_of_svdvals():
    difference = low_rank_plus_noise((96, 200), 5, 0.02, seed=3)
    sigma = torch.linalg.svdvals(difference.double())
    rule = RankRule("ratio", 0.2)
    result = extract_module("m", difference, rule, FP32)
    assert result.record.rank == int((sigma > 0.2 * sigma[0]).sum()) == 5
    assert result.record.route == "exact"
    quantile = extract_module("m", difference, RankRule("quantile", 0.6), FP32)
    expected = int((torch.cumsum(sigma, 0) < 0.6 * sigma.sum()).sum())
    assert quantile.record.rank == max(1, expected)


def test_rank_at_half_the_outputs_is_stored_whole_unless_disabled():
    difference = low_rank_plus_noise((16, 64), 8, 0.01, seed=4)
    bias = torch.randn(16)
    result = extract_module("m", difference, RankRule("fixed", 8), FP32, bias_delta=bias)
    assert result.record.stored == "full" and "out/2" in result.record.reason
    assert set(result.tensors) == {"diff", "diff_b"}
    assert torch.equal(result.tensors["diff"], difference)
    assert torch.equal(result.tensors["diff_b"], bias)
    kept = extract_module("m", difference, RankRule("fixed", 8), FactorOptions(save_dtype=torch.float32, full_fallback=False))
    assert kept.record.stored == "lora" and kept.record.rank == 8


def test_mode_full_stores_the_difference_in_the_save_dtype():
    difference = torch.randn(8, 4, 3, 3)
    result = extract_module("m", difference, RankRule("full"), FactorOptions(save_dtype=torch.bfloat16))
    assert result.tensors["diff"].dtype == torch.bfloat16 and result.tensors["diff"].shape == (8, 4, 3, 3)
    assert result.record.rel_error < 1e-2


@pytest.mark.parametrize("in_channels", [24, 4])
def test_tucker_core_rebuilds_as_lycoris_reads_it(in_channels):
    shape = (48, in_channels, 3, 3)
    difference = low_rank_plus_noise(shape, 6, 0.01, seed=5)
    options = FactorOptions(save_dtype=torch.float32, tucker=True)
    result = extract_module("m", difference, RankRule("fixed", 6), options)
    tensors = result.tensors
    assert result.record.stored == "lora+mid"
    assert tensors["lora_mid.weight"].shape == (6, 6, 3, 3)
    assert tensors["lora_down.weight"].shape == (6, in_channels, 1, 1)
    assert tensors["lora_up.weight"].shape == (48, 6, 1, 1)
    error = rel(rebuilt("m", tensors, shape), difference)
    assert result.record.rel_error == pytest.approx(error, rel=1e-3, abs=1e-6)
    plain = extract_module("m", difference, RankRule("fixed", 6), FP32)
    # the core truncates a second time: never better than plain LoCon, and the report says by how much
    assert error >= plain.record.rel_error - 1e-6
    assert result.record.tucker_added_error == pytest.approx(error - plain.record.rel_error, abs=1e-4)
    if in_channels < 6:  # in < r: the second step is exact
        assert error == pytest.approx(plain.record.rel_error, abs=1e-5)


def test_tucker_split_is_exact_when_the_core_keeps_everything():
    down = torch.randn(3, 2, 3, 3).reshape(3, -1)
    mid, new_down, lost = tucker_split(down, 2, (3, 3))
    assert lost == pytest.approx(0.0, abs=1e-10)
    rebuilt_down = torch.einsum("ijk,jc->ick", mid.reshape(3, 3, 9), new_down).reshape(3, -1)
    assert torch.allclose(rebuilt_down, down, atol=1e-5)


def test_clamp_quantile_adds_error_and_reports_it():
    difference = low_rank_plus_noise((96, 200), 8, 0.01, seed=6)
    plain = extract_module("m", difference, RankRule("fixed", 8), FP32)
    clamped = extract_module("m", difference, RankRule("fixed", 8), FactorOptions(save_dtype=torch.float32, clamp_quantile=0.9))
    up = clamped.tensors["lora_up.weight"]
    down = clamped.tensors["lora_down.weight"]
    high = max(float(up.abs().max()), float(down.abs().max()))
    values = torch.cat([plain.tensors["lora_up.weight"].flatten(), plain.tensors["lora_down.weight"].flatten()])
    assert high <= float(torch.quantile(values, 0.9)) + 1e-6
    error = rel(rebuilt("m", clamped.tensors, difference.shape), difference)
    assert clamped.record.rel_error == pytest.approx(error, rel=1e-3)
    assert clamped.record.clamp_added_error == pytest.approx(error - plain.record.rel_error, abs=1e-5)
    assert clamped.record.clamp_added_error > 0.01


def test_sparse_residual_is_applied_by_algos():
    difference = low_rank_plus_noise((64, 120), 4, 0.05, seed=7)
    options = FactorOptions(save_dtype=torch.float32, sparse_bias=True, sparsity=0.9)
    result = extract_module("m", difference, RankRule("fixed", 4), options)
    tensors = result.tensors
    assert tensors["bias_indices"].dtype == torch.int16 and tensors["bias_indices"].shape[0] == 2
    assert tensors["bias_size"].tolist() == [64, 120] and tensors["bias_size"].dtype == torch.int16
    nnz = tensors["bias_values"].numel()
    assert nnz == result.record.sparse_nnz and abs(nnz - 0.1 * 64 * 120) <= 2
    error = rel(rebuilt("m", tensors, difference.shape), difference)
    assert error == pytest.approx(result.record.rel_error_with_sparse, rel=1e-3)
    assert result.record.rel_error_with_sparse < result.record.rel_error


def test_summary_reports_clamping_and_worst_modules():
    from lytools.extract.report import summarize

    difference = low_rank_plus_noise((96, 200), 8, 0.01, seed=6)
    options = FactorOptions(save_dtype=torch.float32, clamp_quantile=0.9)
    records = [extract_module(f"m{i}", difference * (i + 1), RankRule("fixed", 4 + i), options).record for i in range(3)]
    summary = summarize(records)
    assert summary.extracted == 3 and summary.clamp_added_error > 0
    assert summary.worst[0][0] == "m0"  # the lowest rank leaves the largest error
    assert "clamping added" in summary.line() and "worst: m0" in summary.line()
