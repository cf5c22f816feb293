"""One module's difference -> the tensors stored for it, and what was lost (ALGORITHMS.md §2, §5, §12.3, §15).

`extract_module(name, delta, rule, options)` takes the difference `D = W_tuned − W_base` in its
weight shape (float32, any device) and returns the output tensors (CPU, save dtype) keyed by
suffix plus a `ModuleRecord` for the report. Errors in the record are measured on the factors
as written (after the cast to the save dtype, clamping and the Tucker step), not predicted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from lytools.arch.network import ALPHA, LORA_DOWN, LORA_MID, LORA_UP
from lytools.extract.ranks import RankRule, select_rank, stores_full
from lytools.extract.svd import LowRank, SvdFailure, energy, exact_spectrum, fixed_rank, robust_svd
from lytools.io.dtypes import saturating_cast

SPARSE_INDEX_LIMIT = 32767  # bias_indices / bias_size are int16 (LyCORIS format)
SATURATED_NOTE = "values beyond the save dtype's range saturated to its largest value (not inf)"


@dataclass(frozen=True)
class FactorOptions:
    """Choices that shape the stored tensors (the CLI's --tucker, --clamp-quantile, ...)."""

    save_dtype: torch.dtype = torch.float16
    tucker: bool = False
    clamp_quantile: float | None = None
    sparse_bias: bool = False
    sparsity: float = 0.98
    full_fallback: bool = True
    randomized: bool = True  # False: every fixed rank through the exact spectrum (benchmarks, checks)


@dataclass
class ModuleRecord:
    """One line of the report."""

    name: str
    component: str
    kind: str
    shape: tuple[int, ...]
    stored: str  # lora | lora+mid | full | skipped
    rank: int | None = None
    alpha: float | None = None
    rel_error: float | None = None  # ‖D − ΔW_stored‖ / ‖D‖ (low-rank part alone)
    retained_energy: float | None = None  # 1 − rel_error²
    diff_norm: float | None = None  # ‖D‖_F
    route: str | None = None  # exact | randomized | full
    clamp_added_error: float | None = None  # rel. error with clamping − without
    tucker_added_error: float | None = None  # rel. error with the Tucker core − without
    sparse_nnz: int | None = None
    rel_error_with_sparse: float | None = None
    reason: str | None = None  # why skipped / stored whole
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        row = {key: value for key, value in self.__dict__.items() if key != "notes"}
        row["shape"] = list(self.shape)
        row["notes"] = "; ".join(self.notes)
        return row


@dataclass
class Extracted:
    tensors: dict[str, torch.Tensor]
    record: ModuleRecord


def _relative(error_energy: float, total_energy: float) -> float:
    return math.sqrt(max(error_energy, 0.0) / total_energy) if total_energy > 0 else 0.0


def _rebuild(up: torch.Tensor, down: torch.Tensor, mid: torch.Tensor | None, kernel: tuple[int, ...]) -> torch.Tensor:
    """Return the flat (out, in·K) product of float32 factors (mid: (r, r, *kernel) core)."""
    if mid is None:
        return up @ down
    rank_up, rank_down = mid.shape[0], mid.shape[1]
    in_features = down.shape[1]
    # ΔW[o, c, k] = Σ_ij up[o,i] mid[i,j,k] down[j,c]
    core = mid.reshape(rank_up, rank_down, -1)
    inner = torch.einsum("ijk,jc->ick", core, down)  # (r, in, K)
    return up @ inner.reshape(rank_up, in_features * core.shape[2])


def tucker_split(down: torch.Tensor, in_features: int, kernel: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Return (mid (r, r, *kernel), down1x1 (r, in)) with down ≈ mid ×₂ down1x1, and the energy lost.

    As the LyCORIS extractor does: the (r, in·K) down factor is unfolded along `in` to an
    (in, r·K) matrix whose rank-r SVD gives the new 1x1 down (its left vectors) and the core (the
    rest). When in < r the decomposition is exact and padded with zero rows to keep rank r.
    """
    rank = down.shape[0]
    area = math.prod(kernel)
    unfolded = down.reshape(rank, in_features, area).permute(1, 0, 2).reshape(in_features, rank * area)
    u, s, vh = robust_svd(unfolded, [])
    kept = min(rank, s.shape[0])
    lost = float(s[kept:].double().square().sum())
    new_down = u[:, :kept].T  # (kept, in)
    core = (s[:kept, None] * vh[:kept]).reshape(kept, rank, area).permute(1, 0, 2)  # (r_up, kept, K)
    if kept < rank:
        new_down = torch.cat([new_down, new_down.new_zeros(rank - kept, in_features)])
        core = torch.cat([core, core.new_zeros(rank, rank - kept, area)], dim=1)
    return core.reshape((rank, rank) + tuple(kernel)).contiguous(), new_down.contiguous(), lost


def quantile(values: torch.Tensor, q: float) -> float:
    """Return the q-quantile of `values` with linear interpolation (torch.quantile's rule, any size)."""
    flat = values.flatten().float().cpu()
    position = q * (flat.numel() - 1)
    below = int(math.floor(position))
    above = min(below + 1, flat.numel() - 1)
    low = float(torch.kthvalue(flat, below + 1).values)
    high = float(torch.kthvalue(flat, above + 1).values) if above != below else low
    return low + (high - low) * (position - below)


def clamp_factors(factors: list[torch.Tensor], q: float) -> list[torch.Tensor]:
    """Clamp every factor to ±(the q-quantile of all their values), as kohya's extractor does."""
    high = abs(quantile(torch.cat([f.flatten() for f in factors]), q))
    return [f.clamp(-high, high) for f in factors]


def _sparse_residual(residual: torch.Tensor, sparsity: float, save_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Return bias_indices / bias_values / bias_size: the largest (1 − sparsity) of |residual|."""
    # LyCORIS's make_sparse: drop the entries below the `sparsity` quantile of |residual|
    threshold = quantile(residual.abs(), sparsity)
    keep = residual.abs() >= threshold
    indices = keep.nonzero().T  # (2, nnz), row-major order as a coalesced COO
    values = residual[keep]
    return {
        "bias_indices": indices.to(torch.int16).cpu().contiguous(),
        "bias_values": values.to(save_dtype).cpu().contiguous(),
        "bias_size": torch.tensor(list(residual.shape), dtype=torch.int16),
    }


def _sparse_dense(tensors: dict[str, torch.Tensor], shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    dense = torch.zeros(shape, device=device)
    indices = tensors["bias_indices"].long().to(device)
    dense[indices[0], indices[1]] = tensors["bias_values"].float().to(device)
    return dense


def _store(tensor: torch.Tensor, dtype: torch.dtype, record: ModuleRecord) -> torch.Tensor:
    """tensor.to(dtype), except that values beyond dtype's range saturate (fp16: never an inf), noted."""
    out, beyond = saturating_cast(tensor, dtype)
    if beyond and SATURATED_NOTE not in record.notes:
        record.notes.append(SATURATED_NOTE)
    return out


def _alpha(rank: int, dtype: torch.dtype) -> torch.Tensor:
    """alpha = rank as a 0-d tensor in `dtype`, or float32 where `dtype` cannot hold it exactly (bf16
    above 256, fp16 above 2048): a rounded alpha would scale the module by alpha/rank != 1."""
    alpha = torch.tensor(float(rank), dtype=dtype)
    return alpha if float(alpha) == rank else torch.tensor(float(rank), dtype=torch.float32)


def _full(name: str, delta: torch.Tensor, record: ModuleRecord, options: FactorOptions,
          bias_delta: torch.Tensor | None) -> Extracted:
    stored = _store(delta, options.save_dtype, record)
    error = energy(delta - stored.float())
    total = energy(delta)
    record.stored = "full"
    record.route = "full"
    record.rel_error = _relative(error, total)
    record.retained_energy = 1.0 - record.rel_error ** 2
    tensors = {"diff": stored.cpu().contiguous()}
    if bias_delta is not None and bool((bias_delta != 0).any()):
        tensors["diff_b"] = _store(bias_delta, options.save_dtype, record).cpu().contiguous()
    return Extracted(tensors, record)


def extract_module(
    name: str,
    delta: torch.Tensor,
    rule: RankRule,
    options: FactorOptions,
    *,
    component: str = "unet",
    kind: str | None = None,
    bias_delta: torch.Tensor | None = None,
) -> Extracted:
    """Return the stored tensors and report record of one module's difference `delta` (weight shape)."""
    shape = tuple(delta.shape)
    out_features = shape[0]
    kernel = shape[2:]
    kxk = len(kernel) > 0 and math.prod(kernel) > 1
    kind = kind or ("linear" if len(shape) == 2 else ("conv1x1" if not kxk else "conv3x3"))
    flat = delta.reshape(out_features, -1)
    if flat.dtype != torch.float32 and flat.dtype != torch.float64:
        flat = flat.float()
    flat_in = flat.shape[1]
    in_features = shape[1] if len(shape) > 1 else flat_in
    record = ModuleRecord(name, component, kind, shape, "lora")
    total = energy(flat)
    record.diff_norm = math.sqrt(total)

    if rule.mode == "full":
        record.reason = "mode full"
        return _full(name, delta.float(), record, options, bias_delta)

    low: LowRank
    if rule.needs_spectrum:
        spectrum = exact_spectrum(flat)
        rank = select_rank(spectrum.sigma, rule, out_features, flat_in)
        if options.full_fallback and stores_full(rank, out_features, kxk, options.tucker):
            record.reason = f"rank {rank} >= out/2 = {out_features / 2:g}: stored whole"
            record.notes.extend(spectrum.retries)
            return _full(name, delta.float(), record, options, bias_delta)
        low = spectrum.truncate(flat, rank)
    else:
        rank = select_rank(None, rule, out_features, flat_in)
        if options.full_fallback and stores_full(rank, out_features, kxk, options.tucker):
            record.reason = f"rank {rank} >= out/2 = {out_features / 2:g}: stored whole"
            return _full(name, delta.float(), record, options, bias_delta)
        low = fixed_rank(flat, rank, allow_randomized=options.randomized)
    record.notes.extend(low.retries)
    record.route = low.route
    up, down = low.factors(torch.float32)
    rank = up.shape[1]
    flat32 = flat.float()

    mid = None
    if options.tucker and kxk:
        before = _relative(energy(flat32 - up @ down), total)
        mid, down, _ = tucker_split(down, in_features, kernel)
        record.stored = "lora+mid"
        after = _relative(energy(flat32 - _rebuild(up, down, mid, kernel)), total)
        record.tucker_added_error = after - before

    if options.clamp_quantile is not None:
        before = _relative(energy(flat32 - _rebuild(up, down, mid, kernel)), total)
        clamped = clamp_factors([up, down] + ([mid] if mid is not None else []), options.clamp_quantile)
        up, down = clamped[0], clamped[1]
        mid = clamped[2] if mid is not None else None
        after = _relative(energy(flat32 - _rebuild(up, down, mid, kernel)), total)
        record.clamp_added_error = after - before

    up_c = _store(up, options.save_dtype, record)
    down_c = _store(down, options.save_dtype, record)
    mid_c = _store(mid, options.save_dtype, record) if mid is not None else None
    residual = flat32 - _rebuild(up_c.float(), down_c.float(), mid_c.float() if mid_c is not None else None, kernel)
    error = energy(residual)
    record.rank = rank
    record.alpha = float(rank)
    record.rel_error = _relative(error, total)
    record.retained_energy = 1.0 - record.rel_error ** 2

    tensors: dict[str, torch.Tensor] = {}
    if len(shape) == 2:
        tensors[LORA_DOWN] = down_c
        tensors[LORA_UP] = up_c
    elif mid_c is not None:
        tensors[LORA_DOWN] = down_c.reshape(rank, in_features, 1, 1)
        tensors[LORA_MID] = mid_c
        tensors[LORA_UP] = up_c.reshape(out_features, rank, 1, 1)
    else:
        tensors[LORA_DOWN] = down_c.reshape((rank,) + tuple(shape[1:]))
        tensors[LORA_UP] = up_c.reshape(out_features, rank, 1, 1)
    tensors[ALPHA] = _alpha(rank, options.save_dtype)

    if options.sparse_bias:
        if max(residual.shape) > SPARSE_INDEX_LIMIT:
            record.notes.append(f"no sparse residual: dimension {max(residual.shape)} exceeds int16 indices")
        else:
            sparse = _sparse_residual(residual, options.sparsity, options.save_dtype)
            tensors.update(sparse)
            record.sparse_nnz = int(sparse["bias_values"].numel())
            corrected = residual - _sparse_dense(sparse, tuple(residual.shape), residual.device)
            record.rel_error_with_sparse = _relative(energy(corrected), total)
    tensors = {suffix: tensor.cpu().contiguous() for suffix, tensor in tensors.items()}
    return Extracted(tensors, record)


__all__ = ["Extracted", "FactorOptions", "ModuleRecord", "SvdFailure", "clamp_factors", "extract_module", "tucker_split"]
