"""T-LoRA (`q_layer`, `p_layer`, `lambda_layer`): detected and listed, never merged — its weight
change depends on an SVD of the base weight recomputed at load time and on the timestep
(spec: ALGORITHMS.md 12.2)."""

from __future__ import annotations

from lytools.algos.common import ALPHA, ModuleInfo, Scalars, Shapes, reject_foreign, require, scale_from_scalars

SUFFIXES = ("q_layer.weight", "p_layer.weight", "lambda_layer", ALPHA)


def detect(shapes: Shapes) -> bool:
    return any(suffix in shapes for suffix in SUFFIXES[:3])


def describe(name: str, shapes: Shapes, scalars: Scalars) -> ModuleInfo:
    """Return the rank; the module is marked not mergeable."""
    reject_foreign(name, shapes, SUFFIXES, "tlora")
    require(name, shapes, *SUFFIXES[:3])
    q, p = shapes["q_layer.weight"], shapes["p_layer.weight"]
    rank = q[0]
    alpha, scale = scale_from_scalars(shapes, scalars, rank)
    return ModuleInfo(
        name=name, algo="tlora", suffixes=tuple(sorted(shapes)), rank=rank, alpha=alpha, scale=scale,
        kernel=tuple(q[2:]), delta_shape=(p[0], q[1], *q[2:]), additive=False, needs_weight=True,
        mergeable=False,
    )
