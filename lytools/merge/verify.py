"""`--verify` for merge: reload what was written and check it against the intended change."""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from lytools.algos import delta, describe_module
from lytools.device import resolve_device
from lytools.errors import LytoolsError
from lytools.io import open_file
from lytools.merge.checkpoint import CheckpointResult, _Engine
from lytools.merge.combine import NetworkMergeResult, _contributions, _delta_shape, check_same_architecture
from lytools.merge.inputs import NetworkInputs, load_network_input, named_for
from lytools.merge.ratios import Ratios

ROUNDING_SLACK = 2e-2  # relative error a fp16/bf16 cast of the factors may add to a module's change


@dataclass
class VerifyReport:
    """What --verify checked and the worst figures it saw."""

    checked: int = 0
    failures: list[str] = field(default_factory=list)
    worst_relative_error: float = 0.0
    worst_module: str | None = None

    def as_dict(self) -> dict:
        return {
            "checked": self.checked, "failures": self.failures,
            "worst_relative_error": round(self.worst_relative_error, 6), "worst": self.worst_module,
        }

    def raise_on_failure(self, output: Path) -> None:
        """Remove a wrong output and raise, naming the first failures."""
        if self.failures:
            Path(output).unlink(missing_ok=True)
            raise LytoolsError(f"{output}: verification failed for {len(self.failures)} tensor(s): "
                               + "; ".join(self.failures[:3]))


def verify_checkpoint(result: CheckpointResult, networks, device: str = "auto", base=None) -> VerifyReport:
    """Check the written checkpoint: untouched tensors equal the base's (as cast), changed ones equal
    a fresh recomputation, and report how much of each intended change the output dtype kept.
    `base`: the base checkpoint still open from the merge (else it is opened again)."""
    report = VerifyReport()
    plan = result.plan
    opened = open_file(plan.base, keep_ema=plan.keep_ema) if base is None else nullcontext(base)
    with opened as base, open_file(result.output) as written:
        if sorted(written.keys()) != sorted(plan.out_dtypes):
            raise LytoolsError(f"{result.output}: verification failed: the tensor names differ from the plan")
        engine = _Engine(plan, base, networks, resolve_device(device))
        for name in plan.out_dtypes:
            report.checked += 1
            if name in plan.group_of:
                continue
            if not torch.equal(written.get(name), engine.untouched(name)):
                report.failures.append(f"{name} differs from the base")
        for group in plan.groups:
            working, rows, modules = engine.apply_all(group)
            for key, value in working.items():
                for name, tensor in engine._finish(key, value, rows.get(key, [None]), modules.get(key, [])).items():
                    got = written.get(name)
                    if got.dtype != tensor.dtype or not torch.equal(got, tensor):
                        report.failures.append(f"{name} differs from a recomputation")
                if key in base and key not in plan.fp8.scale_of:
                    before = engine._load(key)
                    realized = written.get(key).to(value.device, value.dtype) - before
                    _worst(report, key, realized, value - before)
    return report


def _worst(report: VerifyReport, name: str, realized: torch.Tensor, intended: torch.Tensor) -> None:
    """Track the largest relative error between a realized change (after the cast) and the intended one."""
    norm = float(torch.linalg.vector_norm(intended))
    error = float(torch.linalg.vector_norm(realized - intended)) / norm if norm else 0.0
    if error > report.worst_relative_error:
        report.worst_relative_error, report.worst_module = error, name


def verify_network(
    result: NetworkMergeResult, paths: Sequence[Path], ratios: Ratios, device: str = "auto",
    loaded: NetworkInputs | None = None,
) -> VerifyReport:
    """Check every module of a merged network: its change against the ratio-weighted sum of the
    inputs' changes (exact up to the output dtype; within the SVD bound for re-factored modules)."""
    report = VerifyReport()
    where = resolve_device(device)
    load = loaded.load if loaded is not None else load_network_input
    inputs = [load(path, hash_file=False) for path in paths]
    arch = check_same_architecture(inputs)
    inputs = [named_for(network, arch) for network in inputs]  # as merge_networks read them
    by_name = _contributions(inputs, ratios)
    merged = load_network_input(result.output, hash_file=False)
    for item in result.modules:
        report.checked += 1
        module = merged.modules.get(item.name)
        if module is None:
            report.failures.append(f"{item.name} missing from the output")
            continue
        parts = by_name[item.name]
        shape = _delta_shape(parts)
        flat = (shape[0], math.prod(shape[1:]))
        intended = torch.zeros(flat, device=where)
        for part in parts:
            intended += delta(part.module, part.info.delta_shape or shape, device=where).reshape(flat) * part.ratio
        info = describe_module(module)
        got = delta(module, info.delta_shape or shape, device=where).reshape(flat)
        norm = float(torch.linalg.vector_norm(intended))
        error = float(torch.linalg.vector_norm(got - intended)) / norm if norm else float(torch.linalg.vector_norm(got))
        bound = ROUNDING_SLACK
        if item.kept is not None:
            bound += math.sqrt(max(0.0, 1.0 - item.kept ** 2))
        if error > report.worst_relative_error:
            report.worst_relative_error, report.worst_module = error, item.name
        if error > bound:
            report.failures.append(f"{item.name}: relative error {error:.4f} above {bound:.4f}")
    return report
