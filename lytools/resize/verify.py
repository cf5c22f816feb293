"""--verify: reload the written network and check every module against the change it came from.

A resized or flattened module must differ from its input's weight change by no more than the
discarded singular values say (relative Frobenius error sqrt(1 − kept share²)), plus what the
output dtype's rounding costs; a copied module must be its input; a truncated one its leading ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from lytools.algos import ModuleInfo, NetworkModule
from lytools.algos.common import flat2, module_scale
from lytools.io import open_file
from lytools.resize.modules import (
    ALPHA, COPIED, DOWN, KEPT, MID, RESIZED, TRUNCATED, UP, Context, ModuleReport, dense_delta, is_plain_lora,
)
from lytools.resize.factors import tucker_to_flat_down

# allowed relative error on top of the truncation error, by the dtype the factors were written in
# (fp8: 3 and 2 mantissa bits, relative steps of 1/8 and 1/4; an fp8 input is written in fp8 by default)
ROUNDING = {torch.float32: 1e-4, torch.float64: 1e-6, torch.float16: 3e-3, torch.bfloat16: 2e-2,
            torch.float8_e4m3fn: 6e-2, torch.float8_e5m2: 1.2e-1}


@dataclass
class VerifyResult:
    """Per-module relative errors (actual, allowed) and whether all passed."""

    errors: dict[str, tuple[float, float]] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def message(self) -> str:
        if not self.errors:
            return "verify: nothing to check"
        worst = max(self.errors.items(), key=lambda item: item[1][0] - item[1][1])
        if self.failed:
            name = self.failed[0]
            actual, allowed = self.errors[name]
            return f"{len(self.failed)} modules off, e.g. {name}: relative error {actual:.3g} > allowed {allowed:.3g}"
        return f"verify: {len(self.errors)} modules within bounds (largest relative error {max(e[0] for e in self.errors.values()):.3g}, worst margin at {worst[0]})"


def _factors(module: NetworkModule) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Return (s, up (out, r), down (r, in·K)) in float64 for a plain LoRA module."""
    up = flat2(module[UP]).to(torch.float64)
    down = module[DOWN].to(torch.float64)
    down = tucker_to_flat_down(module[MID].to(torch.float64), down) if MID in module else flat2(down)
    return module_scale(module, module[DOWN].shape[0]), up, down


def lowrank_relative_error(a: NetworkModule, b: NetworkModule) -> float:
    """Return ‖ΔW_a − ΔW_b‖_F / ‖ΔW_a‖_F from the factors alone (r × r products, float64)."""
    sa, ua, da = _factors(a)
    sb, ub, db = _factors(b)
    norm_a = sa * sa * float(((ua.T @ ua) * (da @ da.T)).sum())
    norm_b = sb * sb * float(((ub.T @ ub) * (db @ db.T)).sum())
    inner = sa * sb * float(((ua.T @ ub) * (da @ db.T)).sum())
    squared = max(norm_a + norm_b - 2.0 * inner, 0.0)
    return math.sqrt(squared / norm_a) if norm_a > 0 else math.sqrt(squared)


def _dense_lora(module: NetworkModule, shape: tuple[int, ...]) -> torch.Tensor:
    scale, up, down = _factors(module)
    return (scale * up @ down).reshape(shape[0], -1)


def _relative(reference: torch.Tensor, approx: torch.Tensor) -> float:
    norm = float(torch.linalg.vector_norm(reference))
    error = float(torch.linalg.vector_norm(reference - approx))
    return error / norm if norm > 0 else error


def verify_output(
    output: Path, inputs: Mapping[str, NetworkModule], infos: Mapping[str, ModuleInfo],
    reports: list[ModuleReport], ctx: Context,
) -> VerifyResult:
    """Return the check of every written module against its input (see the module docstring)."""
    result = VerifyResult()
    with open_file(output) as reader:
        keys = set(reader.keys())
        for report in reports:
            if report.action == KEPT:
                continue
            source = inputs[report.name]
            suffixes = [s for s in (UP, DOWN, MID, ALPHA) if f"{report.name}.{s}" in keys]
            written = NetworkModule(report.name, {s: reader.get(f"{report.name}.{s}").clone() for s in suffixes})
            dtype = written[DOWN].dtype if DOWN in written else torch.float32
            rounding = ROUNDING.get(dtype, 2e-2)
            if report.action == TRUNCATED:
                rank = report.rank_out
                exact = torch.equal(written[DOWN].to(source[DOWN].dtype), source[DOWN][:rank]) and torch.equal(
                    written[UP].to(source[UP].dtype), source[UP][:, :rank])
                result.errors[report.name] = (0.0 if exact else 1.0, 0.0 if ctx.save_dtype is None else rounding)
                if not exact and ctx.save_dtype is None:
                    result.failed.append(report.name)
                continue
            kept = report.fro_kept if report.fro_kept is not None else 1.0
            allowed = math.sqrt(max(1.0 - kept * kept, 0.0)) + rounding
            if report.action in (COPIED, RESIZED) and is_plain_lora(infos[report.name]):
                error = lowrank_relative_error(source, written)
            else:
                reference, shape = dense_delta(source, infos[report.name], ctx)
                error = _relative(reference.to("cpu", torch.float64).reshape(shape[0], -1), _dense_lora(written, shape))
            result.errors[report.name] = (error, allowed)
            if not error <= allowed:
                result.failed.append(report.name)
    return result
