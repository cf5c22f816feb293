"""(IA)³: a learned per-channel multiplier on the output or input axis (spec: ALGORITHMS.md 6)."""

from __future__ import annotations

import torch

from lytools.algos.common import (
    ModuleInfo, NetworkModule, Scalars, Shapes, fail, read_scalar, reject_foreign, require,
)

SUFFIXES = ("weight", "on_input")


def detect(shapes: Shapes) -> bool:
    return "on_input" in shapes or set(shapes) == {"weight"}


def describe(name: str, shapes: Shapes, scalars: Scalars) -> ModuleInfo:
    """Return the scaled axis; the conv form is (1, C, 1, 1), the linear form (C,)."""
    reject_foreign(name, shapes, SUFFIXES, "ia3")
    require(name, shapes, "weight")
    weight = tuple(shapes["weight"])
    if len(weight) not in (1, 3, 4, 5) or (len(weight) >= 3 and (weight[0] != 1 or any(k != 1 for k in weight[2:]))):
        raise fail(name, f"ia3 weight has shape {list(weight)}, expected (C,) or (1, C, 1, 1)")
    if "on_input" in shapes:
        value = scalars.get("on_input")
        on_input = None if value is None else bool(value)
    else:
        on_input = False
    return ModuleInfo(
        name=name, algo="ia3", suffixes=tuple(sorted(shapes)), on_input=on_input,
        additive=False, needs_weight=True,
    )


def merge(module: NetworkModule, weight: torch.Tensor, ratio: float) -> torch.Tensor:
    """Return W scaled per output (or input) channel by 1 + m·v."""
    on_input = "on_input" in module and bool(read_scalar(module.name, "on_input", module["on_input"]))
    factor = 1.0 + ratio * module["weight"].flatten()
    axis = 1 if on_input else 0
    if weight.dim() <= axis or weight.shape[axis] != factor.numel():
        side = "input" if on_input else "output"
        raise fail(module.name, f"ia3 scales {factor.numel()} {side} channels, target weight is {list(weight.shape)}")
    shape = [1] * weight.dim()
    shape[axis] = factor.numel()
    return weight * factor.reshape(shape)
