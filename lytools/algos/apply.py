"""The entry points the rest of lytools uses: a module's merged weight (and bias) at a ratio,
and the weight change of additive modules."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from lytools.algos import dora
from lytools.algos.common import DORA_SCALE, ModuleInfo, NetworkModule, fail
from lytools.algos.detect import BY_NAME, Algorithm, describe_module
from lytools.device import compute_dtype, resolve_device
from lytools.errors import UnsupportedError


@dataclass(frozen=True)
class Merged:
    """A layer's weight and bias after a module is applied (bias None when the layer has none)."""

    weight: torch.Tensor
    bias: torch.Tensor | None


def _algorithm(info: ModuleInfo) -> Algorithm:
    if not info.mergeable:
        raise UnsupportedError(
            f"module {info.name}: {info.algo} cannot be merged offline "
            "(its change depends on a recomputed SVD of the base weight and the timestep)"
        )
    return BY_NAME[info.algo]


def _device(device: str | torch.device | None, fallback: torch.device) -> torch.device:
    return fallback if device is None else resolve_device(device)


def is_additive(module: NetworkModule | ModuleInfo) -> bool:
    """True when W' = W + m·ΔW (lora, loha, lokr, full, norm, glora without DoRA)."""
    info = module if isinstance(module, ModuleInfo) else describe_module(module)
    return info.additive


def _weight_delta(algo: Algorithm, module: NetworkModule, weight: torch.Tensor) -> torch.Tensor:
    if algo.delta_reads_weight:
        return algo.delta(module, weight.shape, weight)
    return algo.delta(module, weight.shape)


@torch.no_grad()
def apply_module(
    module: NetworkModule,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    ratio: float = 1.0,
    *,
    device: str | torch.device | None = None,
    precision: str = "float32",
    dora_mode: str = "lycoris",
    info: ModuleInfo | None = None,
) -> Merged:
    """Return the layer's weight and bias with `module` applied at `ratio`.

    Math runs on `device` (default: where `weight` lives) in `precision` (float32 or float64);
    the results are cast once to the input dtypes and returned on `weight`'s device. A bias the
    module changes but the layer lacks is created from zeros (dtype of `weight`). `weight` may be
    a row slice of a fused weight (see `apply_to_rows`). `info` skips detection when known.
    """
    dora.check_mode(dora_mode)
    info = info or describe_module(module)
    algo = _algorithm(info)
    where = _device(device, weight.device)
    dtype = compute_dtype(precision)
    prepared = module.to(where, dtype)
    base = weight.to(where, dtype)
    has_dora = DORA_SCALE in prepared
    if algo.delta is not None:
        change = _weight_delta(algo, prepared, base)
        merged = base + change if has_dora else torch.add(base, change, alpha=ratio)
    else:
        merged = algo.merge(prepared, base, 1.0 if has_dora else ratio)
    if has_dora:
        merged = dora.apply(module.name, base, merged, prepared[DORA_SCALE], ratio, dora_mode)
    new_bias = bias
    bias_change = algo.bias_delta(prepared) if algo.bias_delta is not None else None
    if bias_change is not None:
        if bias is not None and tuple(bias.shape) != tuple(bias_change.shape):
            raise fail(module.name, f"bias change {list(bias_change.shape)} does not fit the layer bias {list(bias.shape)}")
        base_bias = torch.zeros_like(bias_change) if bias is None else bias.to(where, dtype)
        out_dtype = weight.dtype if bias is None else bias.dtype
        new_bias = torch.add(base_bias, bias_change, alpha=ratio).to(weight.device, out_dtype)
    return Merged(merged.to(weight.device, weight.dtype), new_bias)


def apply_to_rows(
    module: NetworkModule,
    weight: torch.Tensor,
    rows: slice,
    bias: torch.Tensor | None = None,
    ratio: float = 1.0,
    **options,
) -> Merged:
    """Return a fused weight (e.g. q;k;v) with `module` applied to `weight[rows]` only; other rows kept.

    `options` are those of `apply_module`.
    """
    info = options.pop("info", None) or describe_module(module)
    part = apply_module(module, weight[rows], None if bias is None else bias[rows], ratio, info=info, **options)
    new_weight = weight.clone()
    new_weight[rows] = part.weight
    new_bias = bias
    if info.bias_delta and part.bias is not None:
        if bias is None:
            new_bias = torch.zeros(weight.shape[0], dtype=part.bias.dtype, device=part.bias.device)
        else:
            new_bias = bias.clone()
        new_bias[rows] = part.bias
    return Merged(new_weight, new_bias)


@torch.no_grad()
def delta(
    module: NetworkModule,
    target_shape: Sequence[int],
    *,
    weight: torch.Tensor | None = None,
    device: str | torch.device | None = None,
    precision: str = "float32",
) -> torch.Tensor:
    """Return ΔW of an additive module, scale included, ratio excluded, in `precision` on `device`.

    GLoRA's ΔW reads the base weight: pass `weight`. Non-additive modules (DoRA, ia3, oft, boft)
    raise UnsupportedError: use `apply_module` with the base weight and take the difference.
    """
    info = describe_module(module)
    algo = _algorithm(info)
    if not info.additive:
        kind = f"{info.algo} with DoRA" if info.dora else info.algo
        raise UnsupportedError(f"module {module.name}: {kind} is not additive; its change needs the base weight")
    if info.needs_weight and weight is None:
        raise UnsupportedError(f"module {module.name}: {info.algo} weight change depends on the base weight; pass it")
    fallback = weight.device if weight is not None else next(iter(module.tensors.values())).device
    where = _device(device, fallback)
    dtype = compute_dtype(precision)
    prepared = module.to(where, dtype)
    if weight is not None:
        if tuple(weight.shape) != tuple(target_shape):
            raise fail(module.name, f"base weight {list(weight.shape)} is not of the target shape {list(target_shape)}")
        return _weight_delta(algo, prepared, weight.to(where, dtype))
    return algo.delta(prepared, target_shape)


def bias_delta(
    module: NetworkModule, *, device: str | torch.device | None = None, precision: str = "float32"
) -> torch.Tensor | None:
    """Return ΔB (ratio excluded) for modules that change the bias (full `diff_b`, norm `b_norm`), else None."""
    algo = _algorithm(describe_module(module))
    if algo.bias_delta is None:
        return None
    change = algo.bias_delta(module)
    if change is None:
        return None
    return change.to(_device(device, change.device), compute_dtype(precision))
