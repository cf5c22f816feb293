"""Which algorithm a module is and its hyper-parameters, from its key set and shapes alone
(spec: ALGORITHMS.md 13). The table below is the one place mapping an algorithm to its functions."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Mapping, Sequence

import torch

from lytools.algos import boft, dora, full, glora, ia3, loha, lokr, lora, norm, oft, tlora
from lytools.algos.common import ALPHA, DORA_SCALE, ModuleInfo, NetworkModule, Scalars, Shapes, fail


@dataclass(frozen=True)
class Algorithm:
    """One algorithm's functions. Additive ones have `delta`; the others `merge` (W, ratio) -> W'."""

    name: str
    suffixes: tuple[str, ...]
    detect: Callable[[Shapes], bool]
    describe: Callable[[str, Shapes, Scalars], ModuleInfo]
    delta: Callable[..., torch.Tensor] | None = None
    merge: Callable[[NetworkModule, torch.Tensor, float], torch.Tensor] | None = None
    bias_delta: Callable[[NetworkModule], torch.Tensor | None] | None = None
    delta_reads_weight: bool = False  # delta(module, target_shape, weight): GLoRA's W·A term


# In the order of ALGORITHMS.md 13: the first whose detect() matches describes the module.
ALGORITHMS: tuple[Algorithm, ...] = (
    Algorithm("lora", lora.SUFFIXES, lora.detect, lora.describe, delta=lora.delta, bias_delta=lora.bias_delta),
    Algorithm("loha", loha.SUFFIXES, loha.detect, loha.describe, delta=loha.delta),
    Algorithm("lokr", lokr.SUFFIXES, lokr.detect, lokr.describe, delta=lokr.delta),
    Algorithm("full", full.SUFFIXES, full.detect, full.describe, delta=full.delta, bias_delta=full.bias_delta),
    Algorithm("glora", glora.SUFFIXES, glora.detect, glora.describe, delta=glora.delta, delta_reads_weight=True),
    Algorithm("oft", oft.SUFFIXES, oft.detect, oft.describe, merge=oft.merge),
    Algorithm("boft", boft.SUFFIXES, boft.detect, boft.describe, merge=boft.merge),
    Algorithm("norm", norm.SUFFIXES, norm.detect, norm.describe, delta=norm.delta, bias_delta=norm.bias_delta),
    Algorithm("ia3", ia3.SUFFIXES, ia3.detect, ia3.describe, merge=ia3.merge),
    Algorithm("tlora", tlora.SUFFIXES, tlora.detect, tlora.describe),
)
BY_NAME: Mapping[str, Algorithm] = {algo.name: algo for algo in ALGORITHMS}
KNOWN_SUFFIXES: frozenset[str] = frozenset(s for algo in ALGORITHMS for s in algo.suffixes)
# keys that carry no weight by themselves
SHARED_SUFFIXES: frozenset[str] = frozenset({ALPHA, DORA_SCALE})

Header = object  # TensorInfo-like (.shape), (shape, dtype), or a bare shape


def describe_shapes(name: str, shapes: Shapes, scalars: Scalars | None = None) -> ModuleInfo:
    """Return the ModuleInfo of module `name` from {suffix: shape} and the known scalar values.

    `scalars` may hold "alpha" and "on_input"; without alpha the scale of a module that stores
    one is reported as None. Raises NetworkError naming the module for incomplete, inconsistent
    or unknown key sets.
    """
    shapes = {suffix: tuple(int(d) for d in shape) for suffix, shape in shapes.items()}
    scalars = dict(scalars or {})
    if not set(shapes) - SHARED_SUFFIXES:
        raise fail(name, f"holds only {', '.join(sorted(shapes)) or 'no keys'}, no weight tensors")
    empty = next((suffix for suffix, shape in sorted(shapes.items()) if shape and 0 in shape), None)
    if empty is not None:  # a rank-0 module: its scale alpha / rank would divide by zero
        raise fail(name, f"{empty} is empty (shape {shapes[empty]}): a rank-0 module holds no weight change; "
                         "remove it from the file")
    for algo in ALGORITHMS:
        if algo.detect(shapes):
            info = algo.describe(name, shapes, scalars)
            if DORA_SCALE in shapes:
                side = dora.axis(name, shapes[DORA_SCALE], info.out_features)
                info = replace(info, dora=side, additive=False, needs_weight=True)
            return info
    raise fail(name, f"unknown key set: {', '.join(sorted(shapes))}")


def _shape_of(header: Header) -> Sequence[int]:
    # a header record with .shape (lytools.io TensorInfo), (shape, dtype), or a bare shape
    if hasattr(header, "shape"):
        return header.shape  # type: ignore[union-attr]
    if len(header) == 2 and not isinstance(header[0], int):
        return header[0]  # type: ignore[return-value]
    return header  # type: ignore[return-value]


def describe_header(
    name: str, headers: Mapping[str, Header], *, alpha: float | None = None, on_input: bool | None = None
) -> ModuleInfo:
    """Return the ModuleInfo from header entries, no tensor data.

    An entry is a record with `.shape` (lytools.io's TensorInfo), a `(shape, dtype)` pair or a bare shape.

    Pass the stored `alpha` value (a 2-byte read) to get the scale, `on_input` to get the ia3 axis.
    """
    scalars: dict[str, float] = {}
    if alpha is not None:
        scalars[ALPHA] = float(alpha)
    if on_input is not None:
        scalars["on_input"] = float(on_input)
    return describe_shapes(name, {suffix: _shape_of(h) for suffix, h in headers.items()}, scalars)


def describe_module(module: NetworkModule) -> ModuleInfo:
    """Return the ModuleInfo of a module whose tensors are loaded."""
    return describe_shapes(module.name, module.shapes(), module.scalars())
