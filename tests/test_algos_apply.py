"""The entry points: apply_module, apply_to_rows, delta, bias_delta, is_additive."""

from __future__ import annotations

import pytest
import torch

from lytools.algos import (
    NetworkModule, apply_module, apply_to_rows, bias_delta, delta, describe_module, is_additive,
)
from lytools.errors import DeviceError, UnsupportedError

N = "lora_te1_text_model_encoder_layers_0_mlp_fc1"


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed + sum(shape)))


def lora(out=48, inp=64, rank=8, alpha=4.0, **extra):
    tensors = {"lora_up.weight": rand(out, rank), "lora_down.weight": rand(rank, inp, seed=1)}
    if alpha is not None:
        tensors["alpha"] = torch.tensor(alpha)
    return NetworkModule(N, {**tensors, **extra})


ADDITIVE = {
    "lora": lora(),
    "loha": NetworkModule(N, {"hada_w1_a": rand(48, 4), "hada_w1_b": rand(4, 64, seed=1), "hada_w2_a": rand(48, 4, seed=2),
                              "hada_w2_b": rand(4, 64, seed=3), "alpha": torch.tensor(2.0)}),
    "lokr": NetworkModule(N, {"lokr_w1": rand(6, 8), "lokr_w2_a": rand(8, 2, seed=1), "lokr_w2_b": rand(2, 8, seed=2),
                              "alpha": torch.tensor(1.0)}),
    "full": NetworkModule(N, {"diff": rand(48, 64), "diff_b": rand(48, seed=1)}),
}


@pytest.mark.parametrize("algo", sorted(ADDITIVE))
def test_delta_is_the_merge_difference(algo):
    module = ADDITIVE[algo]
    weight = rand(48, 64, seed=9)
    change = delta(module, weight.shape)
    assert change.dtype == torch.float32 and is_additive(module)
    for ratio in (1.0, 0.3):
        merged = apply_module(module, weight, None, ratio)
        torch.testing.assert_close(merged.weight, weight + ratio * change)


def test_lora_delta_formula_and_scale():
    module = lora(alpha=2.0)
    expected = 0.25 * module["lora_up.weight"] @ module["lora_down.weight"]
    torch.testing.assert_close(delta(module, (48, 64)), expected)
    no_alpha = lora(alpha=None)
    torch.testing.assert_close(delta(no_alpha, (48, 64)), no_alpha["lora_up.weight"] @ no_alpha["lora_down.weight"])
    zero_alpha = lora(alpha=0.0)
    torch.testing.assert_close(delta(zero_alpha, (48, 64)), delta(no_alpha, (48, 64)))


def test_linear_with_conv_shaped_factors():
    flat = lora()
    conv_shaped = NetworkModule(N, {"lora_up.weight": flat["lora_up.weight"][:, :, None, None],
                                    "lora_down.weight": flat["lora_down.weight"][:, :, None, None],
                                    "alpha": flat["alpha"]})
    torch.testing.assert_close(delta(conv_shaped, (48, 64)), delta(flat, (48, 64)))


def test_dylora_truncation_keeps_alpha():
    full_rank = lora(rank=8, alpha=4.0)
    truncated = NetworkModule(N, {"lora_up.weight": full_rank["lora_up.weight"][:, :4],
                                  "lora_down.weight": full_rank["lora_down.weight"][:4],
                                  "alpha": full_rank["alpha"]})
    assert describe_module(truncated).scale == 1.0
    expected = full_rank["lora_up.weight"][:, :4] @ full_rank["lora_down.weight"][:4]
    torch.testing.assert_close(delta(truncated, (48, 64)), expected)


def test_lokr_both_halves_full_ignores_alpha():
    halves = {"lokr_w1": rand(6, 8), "lokr_w2": rand(8, 8, seed=1)}
    with_alpha = NetworkModule(N, {**halves, "alpha": torch.tensor(100.0)})
    expected = torch.kron(halves["lokr_w1"], halves["lokr_w2"])
    torch.testing.assert_close(delta(with_alpha, (48, 64)), expected)


def test_non_additive_delta_refused_and_glora_needs_weight():
    dora = lora(dora_scale=rand(48, 1).abs())
    for module in (dora, NetworkModule(N, {"oft_blocks": rand(12, 4, 4)}),
                   NetworkModule(N, {"weight": rand(48), "on_input": torch.tensor(0)})):
        assert not is_additive(module)
        with pytest.raises(UnsupportedError, match="not additive"):
            delta(module, (48, 64))
    glora = NetworkModule(N, {"a1.weight": rand(64, 4), "a2.weight": rand(4, 64, seed=1), "b1.weight": rand(48, 4, seed=2),
                              "b2.weight": rand(4, 64, seed=3), "alpha": torch.tensor(2.0)})
    assert is_additive(glora)
    with pytest.raises(UnsupportedError, match="base weight"):
        delta(glora, (48, 64))
    weight = rand(48, 64, seed=7)
    change = delta(glora, weight.shape, weight=weight)
    expected = 0.5 * (glora["b1.weight"] @ glora["b2.weight"] + weight @ (glora["a1.weight"] @ glora["a2.weight"]))
    torch.testing.assert_close(change, expected)
    torch.testing.assert_close(apply_module(glora, weight, None, 0.5).weight, weight + 0.5 * change)


def test_glora_old_layout():
    old = NetworkModule(N, {"a1.weight": rand(4, 64), "a2.weight": rand(64, 4, seed=1), "b1.weight": rand(4, 64, seed=2),
                            "b2.weight": rand(48, 4, seed=3), "alpha": torch.tensor(8.0)})
    weight = rand(48, 64, seed=5)
    expected = 2.0 * (old["b2.weight"] @ old["b1.weight"] + weight @ old["a2.weight"] @ old["a1.weight"])
    torch.testing.assert_close(delta(old, weight.shape, weight=weight), expected)


def test_bias_created_from_zeros_and_kept_when_untouched():
    module = ADDITIVE["full"]
    weight = rand(48, 64, seed=3).half()
    merged = apply_module(module, weight, None, 0.5)
    assert merged.bias is not None and merged.bias.dtype == torch.float16
    torch.testing.assert_close(merged.bias, (0.5 * module["diff_b"]).half())
    torch.testing.assert_close(bias_delta(module), module["diff_b"])
    assert bias_delta(lora()) is None
    bias = rand(48, seed=4)
    assert apply_module(lora(), rand(48, 64), bias).bias is bias


def test_cast_once_to_target_dtype_and_float64():
    module = lora()
    weight = rand(48, 64, seed=2).to(torch.bfloat16)
    merged = apply_module(module, weight, None, 0.7)
    assert merged.weight.dtype == torch.bfloat16
    exact = weight.float() + 0.7 * delta(module, weight.shape)
    # one rounding of the float32 result: within half a bfloat16 step of it
    assert ((merged.weight.float() - exact).abs() <= exact.abs() * 2.0**-8 + 1e-30).all()
    wide = apply_module(module, weight.double(), None, 0.7, precision="float64")
    exact = weight.double() + 0.7 * 0.5 * (module["lora_up.weight"].double() @ module["lora_down.weight"].double())
    torch.testing.assert_close(wide.weight, exact, atol=1e-12, rtol=0)


def test_device_choice():
    module = lora()
    assert apply_module(module, rand(48, 64), device="cpu").weight.device.type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA is not available"):
            apply_module(module, rand(48, 64), device="cuda")
    with pytest.raises(DeviceError):
        apply_module(module, rand(48, 64), precision="float16")


def test_dora_modes():
    magnitudes = rand(48, 1).abs() + 0.5
    module = lora(dora_scale=magnitudes)
    weight = rand(48, 64, seed=11)
    full = weight + delta(lora(), weight.shape)
    at_one = apply_module(module, weight, None, 1.0)
    torch.testing.assert_close(at_one.weight.norm(dim=1, keepdim=True), magnitudes, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(apply_module(module, weight, None, 1.0, dora_mode="comfy").weight, at_one.weight)
    comfy = apply_module(module, weight, None, 0.4, dora_mode="comfy").weight
    torch.testing.assert_close(comfy, weight + 0.4 * (at_one.weight - weight))
    gain = magnitudes / (full.norm(dim=1, keepdim=True) + 1.1920929e-07)
    lycoris = apply_module(module, weight, None, 0.4).weight
    torch.testing.assert_close(lycoris, full * (0.4 * (gain - 1) + 1))
    for target in (module, lora()):  # refused even where no DoRA key would use it
        with pytest.raises(UnsupportedError, match="DoRA mode 'peft'"):
            apply_module(target, weight, None, 0.4, dora_mode="peft")


def test_dora_on_input_axis_and_on_oft():
    magnitudes = rand(1, 64).abs() + 0.5
    merged = apply_module(lora(dora_scale=magnitudes), rand(48, 64, seed=1)).weight
    torch.testing.assert_close(merged.norm(dim=0, keepdim=True), magnitudes, rtol=1e-5, atol=1e-5)
    out_magnitudes = rand(48, 1, 1, 1).abs() + 0.5
    oft = NetworkModule(N, {"oft_blocks": rand(12, 4, 4) * 0.1, "dora_scale": out_magnitudes})
    rotated = apply_module(oft, rand(48, 32, 3, 3, seed=2)).weight
    torch.testing.assert_close(rotated.flatten(1).norm(dim=1), out_magnitudes.flatten(), rtol=1e-5, atol=1e-5)


def test_oft_ratio_zero_is_identity_and_legacy_is_transposed():
    weight = rand(48, 64, seed=3)
    oft = NetworkModule(N, {"oft_blocks": rand(12, 4, 4), "alpha": torch.tensor(0)})
    torch.testing.assert_close(apply_module(oft, weight, None, 0.0).weight, weight)
    rotation = torch.linalg.qr(rand(4, 4, seed=5))[0]
    legacy = NetworkModule(N, {"oft_diag": rotation.expand(12, 4, 4).clone()})
    expected = torch.einsum("ij,kix->kjx", rotation, weight.reshape(12, 4, 64)).reshape(48, 64)
    torch.testing.assert_close(apply_module(legacy, weight).weight, expected)


def test_ia3_without_on_input_scales_outputs():
    vector = rand(48)
    weight = rand(48, 64, seed=1)
    merged = apply_module(NetworkModule(N, {"weight": vector}), weight, None, 0.5).weight
    torch.testing.assert_close(merged, weight * (1 + 0.5 * vector)[:, None])


def test_sparse_weight_correction_applied_with_int16_wrap():
    inp, out = 40000, 2  # positions past 32767 wrap negative in int16
    base = lora(out=out, inp=inp, rank=1, alpha=1.0)
    rows = torch.tensor([0, 1, 1])
    cols = torch.tensor([5, 33000, 39999])
    values = torch.tensor([1.5, -2.0, 0.25], dtype=torch.float16)
    indices = torch.stack([rows, cols]).to(torch.int16)  # wraps: 33000 -> -32536
    assert int(indices[1, 1]) < 0
    module = NetworkModule(N, {**base.tensors, "bias_indices": indices, "bias_values": values,
                               "bias_size": torch.tensor([out, inp]).to(torch.int16)})
    assert describe_module(module).sparse_bias
    residual = torch.zeros(out, inp)
    residual[rows, cols] = values.float()
    torch.testing.assert_close(delta(module, (out, inp)), delta(base, (out, inp)) + residual)


def test_apply_to_rows_of_fused_weight():
    fused = rand(3 * 48, 64, seed=4)
    rows = slice(48, 96)
    module = lora()
    result = apply_to_rows(module, fused, rows, ratio=0.8)
    torch.testing.assert_close(result.weight[rows], apply_module(module, fused[rows], None, 0.8).weight)
    assert torch.equal(result.weight[:48], fused[:48]) and torch.equal(result.weight[96:], fused[96:])
    assert result.bias is None
    with_bias = apply_to_rows(ADDITIVE["full"], fused, rows)
    assert torch.equal(with_bias.bias[:48], torch.zeros(48))
    torch.testing.assert_close(with_bias.bias[rows], ADDITIVE["full"]["diff_b"])
