"""Property tests: modules built and filled by LyCORIS's own classes, merged by LyCORIS and by lytools.

LoHa/LoKr use LyCORIS's rebuild (forward) path — `get_weight(shape)` already carries the scale
once; its `merge_to`/`get_merged_weight` applies the scale a second time (ALGORITHMS.md 3, 4).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st
from torch import nn

from lytools.algos import NetworkModule, apply_module, describe_header, describe_module

lycoris_modules = pytest.importorskip("lycoris.modules", reason="lycoris-lora is not installed")

NAME = "lora_unet_test_block"
SETTINGS = settings(
    max_examples=15, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
DIMS = st.sampled_from([8, 12, 16, 24, 32, 48])
KINDS = st.sampled_from(["linear", "conv1x1", "conv3x3"])
RATIOS = st.sampled_from([1.0, 0.7, 0.25, 1.5])
ALPHAS = st.sampled_from([0.0, 1.0, 3.0, 8.0])
DORA = st.sampled_from([None, "out", "in"])


def make_layer(kind: str, out: int, inp: int, seed: int, bias: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "linear":
        return nn.Linear(inp, out, bias=bias)
    kernel = 1 if kind == "conv1x1" else 3
    return nn.Conv2d(inp, out, kernel, padding=kernel // 2, bias=bias)


def build(cls, layer: nn.Module, seed: int, **kwargs):
    """Return a LyCORIS module around `layer` with every trainable tensor random and non-zero."""
    module = cls(NAME, layer, 1.0, bypass_mode=False, **kwargs)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * 0.2
            if name == "dora_scale":
                param.copy_(param.abs() + noise.abs() + 0.1)
            elif name in ("weight", "bias") and cls is lycoris_modules.FullModule:
                param.add_(noise)
            else:
                param.copy_(noise)
    return module


def network(module) -> NetworkModule:
    """Return the module as lytools reads it from a file: LyCORIS's own saved tensors.

    Also checks that the header-only reading (shapes, dtypes, alpha and on_input values) tells
    exactly what the full reading does.
    """
    net = NetworkModule(NAME, {k: v.detach().clone() for k, v in module.state_dict().items()})
    headers = {suffix: (tuple(t.shape), str(t.dtype)) for suffix, t in net.tensors.items()}
    scalars = net.scalars()
    on_input = None if "on_input" not in scalars else bool(scalars["on_input"])
    assert describe_header(NAME, headers, alpha=scalars.get("alpha"), on_input=on_input) == describe_module(net)
    return net


def rebuild_merge(module, weight: torch.Tensor, ratio: float) -> torch.Tensor:
    """LyCORIS's forward-path merge for LoHa/LoKr (scale applied once)."""
    with torch.no_grad():
        change = module.get_weight(module.shape) * module.scalar
        if module.wd:
            return module.apply_weight_decompose(weight + change, ratio)
        return weight + ratio * change


def lycoris_merge(module, layer: nn.Module, ratio: float):
    with torch.no_grad():
        return module.get_merged_weight(ratio, layer.weight.shape, torch.device("cpu"))


def check(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    torch.testing.assert_close(ours, theirs.to(ours.dtype), atol=2e-5, rtol=1e-4)


def dora_kwargs(dora: str | None) -> dict:
    return {} if dora is None else {"weight_decompose": True, "wd_on_out": dora == "out"}


@SETTINGS
@given(kind=KINDS, out=DIMS, inp=DIMS, rank=st.integers(1, 8), alpha=ALPHAS, tucker=st.booleans(),
       dora=DORA, ratio=RATIOS, seed=st.integers(0, 2**16))
def test_locon_matches_lycoris(kind, out, inp, rank, alpha, tucker, dora, ratio, seed):
    layer = make_layer(kind, out, inp, seed)
    module = build(lycoris_modules.LoConModule, layer, seed, lora_dim=rank, alpha=alpha,
                   use_tucker=tucker, **dora_kwargs(dora))
    theirs, _ = lycoris_merge(module, layer, ratio)
    net = network(module)
    ours = apply_module(net, layer.weight.detach(), layer.bias.detach(), ratio)
    check(ours.weight, theirs)
    assert torch.equal(ours.bias, layer.bias.detach())
    info = describe_module(net)
    assert (info.algo, info.rank, info.dora) == ("lora", rank, dora)
    assert info.tucker == (tucker and kind == "conv3x3")


@SETTINGS
@given(kind=KINDS, out=DIMS, inp=DIMS, rank=st.integers(1, 8), alpha=ALPHAS, tucker=st.booleans(),
       dora=DORA, ratio=RATIOS, seed=st.integers(0, 2**16))
def test_loha_matches_lycoris_rebuild(kind, out, inp, rank, alpha, tucker, dora, ratio, seed):
    layer = make_layer(kind, out, inp, seed)
    module = build(lycoris_modules.LohaModule, layer, seed, lora_dim=rank, alpha=alpha,
                   use_tucker=tucker, **dora_kwargs(dora))
    theirs = rebuild_merge(module, layer.weight.detach(), ratio)
    ours = apply_module(network(module), layer.weight.detach(), None, ratio)
    check(ours.weight, theirs)
    info = describe_module(network(module))
    assert (info.algo, info.rank, info.scale) == ("loha", rank, pytest.approx(module.scale))


@SETTINGS
@given(kind=KINDS, out=DIMS, inp=DIMS, rank=st.integers(1, 8), alpha=ALPHAS, tucker=st.booleans(),
       factor=st.sampled_from([-1, 2, 4, 8]), decompose_both=st.booleans(), full_matrix=st.booleans(),
       dora=DORA, ratio=RATIOS, seed=st.integers(0, 2**16))
def test_lokr_matches_lycoris_rebuild(kind, out, inp, rank, alpha, tucker, factor, decompose_both,
                                      full_matrix, dora, ratio, seed):
    layer = make_layer(kind, out, inp, seed)
    module = build(lycoris_modules.LokrModule, layer, seed, lora_dim=rank, alpha=alpha, use_tucker=tucker,
                   factor=factor, decompose_both=decompose_both, full_matrix=full_matrix, **dora_kwargs(dora))
    theirs = rebuild_merge(module, layer.weight.detach(), ratio)
    ours = apply_module(network(module), layer.weight.detach(), None, ratio)
    check(ours.weight, theirs)
    info = describe_module(network(module))
    assert info.algo == "lokr"
    assert info.scale == pytest.approx(module.scale)
    assert info.lokr_full == (module.use_w1, module.use_w2)


@SETTINGS
@given(kind=KINDS, out=DIMS, inp=DIMS, bias=st.booleans(), ratio=RATIOS, seed=st.integers(0, 2**16))
def test_full_matches_lycoris(kind, out, inp, bias, ratio, seed):
    layer = make_layer(kind, out, inp, seed, bias=bias)
    base_weight = layer.weight.detach().clone()
    base_bias = None if layer.bias is None else layer.bias.detach().clone()
    module = build(lycoris_modules.FullModule, layer, seed)
    module.apply_to()  # as in training: the module now holds the tuned layer, its file the difference
    with torch.no_grad():
        theirs_weight, theirs_bias = module.get_merged_weight(ratio, base_weight.shape, torch.device("cpu"))
    ours = apply_module(network(module), base_weight, base_bias, ratio)
    check(ours.weight, theirs_weight)
    if bias:
        check(ours.bias, theirs_bias)
    else:
        assert ours.bias is None


@SETTINGS
@given(kind=KINDS, out=DIMS, inp=DIMS, rank=st.integers(1, 6), alpha=ALPHAS, ratio=RATIOS,
       seed=st.integers(0, 2**16))
def test_glora_matches_lycoris(kind, out, inp, rank, alpha, ratio, seed):
    layer = make_layer(kind, out, inp, seed)
    module = build(lycoris_modules.GLoRAModule, layer, seed, lora_dim=rank, alpha=alpha)
    theirs, _ = lycoris_merge(module, layer, ratio)
    ours = apply_module(network(module), layer.weight.detach(), None, ratio)
    check(ours.weight, theirs)
    assert describe_module(network(module)).rank == rank


OFT_OUT = st.sampled_from([16, 24, 32, 48, 64])
CONSTRAINTS = st.sampled_from([0.0, 1e-4, 1e-2, 1.0])


@SETTINGS
@given(kind=KINDS, out=OFT_OUT, inp=DIMS, factor=st.sampled_from([2, 4, 8]), constraint=CONSTRAINTS,
       rescaled=st.booleans(), ratio=RATIOS, seed=st.integers(0, 2**16))
def test_diag_oft_matches_lycoris(kind, out, inp, factor, constraint, rescaled, ratio, seed):
    layer = make_layer(kind, out, inp, seed)
    module = build(lycoris_modules.DiagOFTModule, layer, seed, lora_dim=factor, constraint=constraint,
                   rescaled=rescaled)
    theirs, _ = lycoris_merge(module, layer, ratio)
    ours = apply_module(network(module), layer.weight.detach(), layer.bias.detach(), ratio)
    check(ours.weight, theirs)
    info = describe_module(network(module))
    assert info.blocks == (module.block_num, module.block_size)
    assert info.constraint == pytest.approx(constraint)


@SETTINGS
@given(kind=KINDS, out=OFT_OUT, inp=DIMS, factor=st.sampled_from([2, 4, 6, 8]), constraint=CONSTRAINTS,
       rescaled=st.booleans(), ratio=RATIOS, seed=st.integers(0, 2**16))
def test_boft_matches_lycoris(kind, out, inp, factor, constraint, rescaled, ratio, seed):
    layer = make_layer(kind, out, inp, seed)
    try:
        module = build(lycoris_modules.ButterflyOFTModule, layer, seed, lora_dim=factor,
                       constraint=constraint, rescaled=rescaled)
    except ValueError:
        reject()  # LyCORIS cannot factor this size under BOFT's rules
    theirs, _ = lycoris_merge(module, layer, ratio)
    ours = apply_module(network(module), layer.weight.detach(), None, ratio)
    check(ours.weight, theirs)
    assert describe_module(network(module)).blocks == (module.boft_m, module.block_num, module.block_size)


@SETTINGS
@given(channels=DIMS, norm=st.sampled_from(["layer", "group"]), ratio=RATIOS, seed=st.integers(0, 2**16))
def test_norms_match_lycoris(channels, norm, ratio, seed):
    torch.manual_seed(seed)
    layer = nn.LayerNorm(channels) if norm == "layer" else nn.GroupNorm(4, channels)
    with torch.no_grad():
        layer.weight.add_(torch.randn(channels) * 0.1)
        layer.bias.add_(torch.randn(channels) * 0.1)
    module = build(lycoris_modules.NormModule, layer, seed)
    theirs_weight, theirs_bias = lycoris_merge(module, layer, ratio)
    ours = apply_module(network(module), layer.weight.detach(), layer.bias.detach(), ratio)
    check(ours.weight, theirs_weight)
    check(ours.bias, theirs_bias)


@SETTINGS
@given(kind=KINDS, out=DIMS, inp=DIMS, on_input=st.booleans(), ratio=RATIOS, seed=st.integers(0, 2**16))
def test_ia3_matches_lycoris_training_module(kind, out, inp, on_input, ratio, seed):
    layer = make_layer(kind, out, inp, seed)
    module = build(lycoris_modules.IA3Module, layer, seed, train_on_input=on_input)
    theirs, _ = lycoris_merge(module, layer, ratio)
    net = network(module)
    ours = apply_module(net, layer.weight.detach(), layer.bias.detach(), ratio)
    check(ours.weight, theirs)
    assert torch.equal(ours.bias, layer.bias.detach())
    headers = {suffix: (tuple(t.shape), str(t.dtype)) for suffix, t in net.tensors.items()}
    assert describe_header(NAME, headers, on_input=on_input).on_input == on_input
