"""One module's resize: copy, truncate, re-factor a LoRA through its small core, or flatten any
other algorithm's weight change into a LoRA/LoCon (spec: ALGORITHMS.md 16, 12.1, 1.3)."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

from lytools.algos import ModuleInfo, NetworkModule, apply_module, delta
from lytools.algos.common import flat2, read_scalar
from lytools.arch.network import ALPHA, DORA_SCALE, LORA_DOWN, LORA_MID, LORA_UP
from lytools.errors import NetworkError, UnsupportedError
from lytools.io.dtypes import saturating_cast
from lytools.resize.factors import (Spectrum, svd_leading, svd_of_dense, svd_of_product, truncated_factors,
                                    tucker_to_flat_down)
from lytools.resize.ranks import MIN_SINGULAR_VALUE, RankChoice, select_rank

UP, DOWN, MID = LORA_UP, LORA_DOWN, LORA_MID

# what happened to a module, as the report says it
RESIZED, COPIED, TRUNCATED, FLATTENED, KEPT = "resized", "copied", "truncated", "flattened", "kept"


@dataclass(frozen=True)
class RankRule:
    """The rank rule for one run: method, its parameter, and the rank (fixed) or cap (dynamic) per kind."""

    method: str = "fixed"
    param: float | None = None
    rank: int | None = None  # linear and 1x1 modules
    conv_rank: int | None = None  # kxk conv modules (Tucker included)
    truncate: bool = False

    def target(self, is_conv: bool) -> int | None:
        return self.conv_rank if is_conv else self.rank


@dataclass
class ModuleReport:
    """What resize did to one module, with the figures of ALGORITHMS.md 16."""

    name: str
    algo: str  # the input algorithm (lora, loha, …; "+dora" when it carried DoRA)
    kind: str  # linear | conv1x1 | conv | tucker | norm
    action: str  # resized | copied | truncated | flattened | kept
    rank_in: int | None
    rank_out: int | None
    alpha_in: float | None
    alpha_out: float | None
    rank_rule: int | None = None  # kohya's rank for this module before the cap at its own rank
    sum_kept: float | None = None
    fro_kept: float | None = None
    max_ratio: float | None = None
    note: str = ""

    def as_row(self) -> dict[str, object]:
        return {
            "module": self.name, "algo": self.algo, "kind": self.kind, "action": self.action,
            "rank_in": self.rank_in, "rank_out": self.rank_out, "rank_rule": self.rank_rule,
            "alpha_in": self.alpha_in, "alpha_out": self.alpha_out,
            "sum_kept": self.sum_kept, "fro_kept": self.fro_kept,
            "max_ratio": None if self.max_ratio is None or math.isinf(self.max_ratio) else self.max_ratio,
            "note": self.note,
        }


@dataclass
class ModuleResult:
    """The output tensors of one module (suffix -> tensor, final dtype) and its report."""

    tensors: dict[str, torch.Tensor]
    report: ModuleReport
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Context:
    """Per-run settings every module needs."""

    rule: RankRule
    device: torch.device
    save_dtype: torch.dtype | None = None
    # module name -> base weight (float32) or None, called only for modules that need it
    base_weight: Callable[[str], torch.Tensor | None] | None = None
    # module name, flat ΔW shape -> full ΔW shape when the factors do not tell a conv's kernel
    full_shape: Callable[[str, tuple[int, ...]], tuple[int, ...]] | None = None
    # modules whose values went beyond the output dtype's range (saturated there, not inf): warned once
    saturated: list[str] = field(default_factory=list, compare=False)
    # flatten_module with a fixed rank: only the leading singular triplets (svd_leading), the kept share
    # of the Frobenius norm measured; the exact SVD where the rank nears the full one (convert --flatten-dora)
    leading_only: bool = False


def _kind(info: ModuleInfo) -> str:
    if info.algo == "norm":
        return "norm"
    if info.tucker:
        return "tucker"
    if info.kernel and any(k != 1 for k in info.kernel):
        return "conv"
    if info.kernel:
        return "conv1x1"
    return "linear"


def _out_dtype(module: NetworkModule, suffix: str | None, ctx: Context) -> torch.dtype:
    if ctx.save_dtype is not None:
        return ctx.save_dtype
    tensor = module.get(suffix) if suffix else None
    if tensor is None or not tensor.is_floating_point():
        # the factors' dtype: a DoRA magnitude is often kept in float32 beside fp16/bf16 factors
        floats = [(s, t) for s, t in module.tensors.items() if t.is_floating_point() and t.dim() > 0]
        tensor = next((t for s, t in floats if s != DORA_SCALE), floats[0][1] if floats else None)
    return tensor.dtype if tensor is not None else torch.float32


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None, ctx: Context | None = None, name: str = "",
          suffix: str = "") -> torch.Tensor:
    """tensor.to(dtype) for floating tensors; values beyond dtype's range saturate (noted in ctx); an
    alpha the dtype would round (bf16: 0.1 -> 0.1001) stays float32, so its module's scale is kept; an alpha
    stored with shape (1,) (LyCORIS' extractor) is written 0-d, as ALGORITHMS.md 1.3 asks of writers."""
    if suffix == ALPHA and tensor.dim() > 0 and tensor.numel() == 1:
        tensor = tensor.reshape(())
    if dtype is None or not tensor.is_floating_point():
        return tensor
    if suffix == ALPHA and tensor.numel() == 1 and float(tensor.reshape(-1)[0].to(dtype)) != float(tensor.reshape(-1)[0]):
        return tensor.to(torch.float32)
    out, beyond = saturating_cast(tensor, dtype)
    if beyond and ctx is not None:
        ctx.saturated.append(name)
    return out


def _copied(module: NetworkModule, ctx: Context) -> dict[str, torch.Tensor]:
    """Return the module's tensors as they are (cast only when --save-dtype asks)."""
    return {suffix: _cast(tensor, ctx.save_dtype, ctx, module.name, suffix) for suffix, tensor in module.tensors.items()}


def _stored_alpha(alpha: float, dtype: torch.dtype) -> torch.Tensor:
    """Return alpha as a 0-d tensor in `dtype`, or float32 when `dtype` would turn it into 0 or inf."""
    stored = torch.tensor(alpha, dtype=dtype)
    value = float(stored)
    if alpha != 0 and (value == 0 or not math.isfinite(value)):
        stored = torch.tensor(alpha, dtype=torch.float32)
    return stored


def lora_factors(
    spectrum: Spectrum, rank: int, scale: float, kernel: tuple[int, ...], in_channels: int, up_tail: tuple[int, ...],
    dtype: torch.dtype, ctx: Context | None = None, name: str = "",
) -> dict[str, torch.Tensor]:
    """Return lora_up / lora_down / alpha of the best rank-`rank` approximation, scale `scale` kept.

    alpha = s·r is stored in `dtype`; whatever rounding that costs is folded into `lora_up`, so
    alpha / r · up @ down equals s · U_r Σ_r V_rᵀ up to the factors' own rounding. Shapes: up
    (out, r, *up_tail) and down (r, in, *kernel): `up_tail` is (1, 1) for Conv2d, (1,) for Conv1d.
    """
    new_up, new_down = truncated_factors(spectrum, rank)
    alpha = _stored_alpha(scale * rank, dtype)
    stored_scale = float(alpha) / rank
    if stored_scale != scale:
        new_up = new_up * (scale / stored_scale)
    out = new_up.shape[0]
    if up_tail or kernel:
        new_up = new_up.reshape(out, rank, *up_tail)
        new_down = new_down.reshape(rank, in_channels, *kernel)
    up_out, down_out = _cast(new_up.cpu(), dtype, ctx, name), _cast(new_down.cpu(), dtype, ctx, name)
    return {UP: up_out.contiguous(), DOWN: down_out.contiguous(), ALPHA: alpha}


def _stored_alpha_value(module: NetworkModule) -> float | None:
    tensor = module.get(ALPHA)
    return None if tensor is None else read_scalar(module.name, ALPHA, tensor)


def _lora_matrices(module: NetworkModule, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (up (out, r), down (r, in·K)) in float32 on `device`, Tucker cores contracted into down."""
    up = flat2(module[UP]).to(device, torch.float32)
    down = module[DOWN].to(device, torch.float32)
    if MID in module:
        return up, tucker_to_flat_down(module[MID].to(device, torch.float32), down)
    return up, flat2(down)


def _choice(spectrum: Spectrum, rule: RankRule, is_conv: bool) -> RankChoice:
    return select_rank(spectrum.S, spectrum.full_length, rule.method, rule.param, rule.target(is_conv))


def resize_lora(module: NetworkModule, info: ModuleInfo, ctx: Context) -> ModuleResult:
    """Re-factor a LoRA/LoCon (Tucker included) to the rule's rank through its r × r core."""
    rank_in = int(module[DOWN].shape[0])
    alpha_in = _stored_alpha_value(module)
    scale = info.scale if info.scale is not None else (1.0 if not alpha_in else alpha_in / rank_in)
    kind = _kind(info)
    is_conv = kind in ("conv", "tucker")
    up, down = _lora_matrices(module, ctx.device)
    spectrum = svd_of_product(up, down)
    choice = _choice(spectrum, ctx.rule, is_conv)
    report = ModuleReport(
        module.name, "lora", kind, RESIZED, rank_in, choice.rank, alpha_in, None, rank_rule=choice.rank,
        sum_kept=choice.sum_kept, fro_kept=choice.fro_kept, max_ratio=choice.max_ratio,
    )
    # a product of rank r_in has at most min(r_in, out, in·K) non-zero singular values: a larger
    # rank keeps them all (kohya's dense route also writes only as many as its SVD returns)
    rank = min(choice.rank, spectrum.S.numel())
    report.rank_out = rank
    if rank >= rank_in:
        # the module already is its own best approximation at that rank: copy it, do not re-factor
        report.action, report.rank_out, report.alpha_out = COPIED, rank_in, alpha_in
        report.sum_kept, report.fro_kept = 1.0, 1.0
        report.note = "already at or below the target rank"
        return ModuleResult(_copied(module, ctx), report)
    dtype = _out_dtype(module, DOWN, ctx)
    kernel = tuple(info.kernel or ())
    up_tail = tuple(module[UP].shape[2:])
    tensors = lora_factors(spectrum, rank, scale, kernel, int(module[DOWN].shape[1]), up_tail, dtype, ctx, module.name)
    report.alpha_out = float(tensors[ALPHA])
    if choice.zero:
        report.note = "zero weight change (largest singular value below 1e-6): rank 1"
    if MID in module:
        report.note = (report.note + "; " if report.note else "") + "Tucker core folded into a plain LoCon"
    return ModuleResult(tensors, report)


def truncate_lora(module: NetworkModule, info: ModuleInfo, ctx: Context, unit: int | None) -> ModuleResult:
    """Keep the first N ranks of a nested-rank (DyLoRA) module: no SVD, alpha unchanged."""
    rank_in = int(module[DOWN].shape[0])
    alpha_in = _stored_alpha_value(module)
    kind = _kind(info)
    target = ctx.rule.target(kind in ("conv", "tucker"))
    assert target is not None
    report = ModuleReport(module.name, "lora", kind, TRUNCATED, rank_in, target, alpha_in, alpha_in)
    if rank_in <= target:
        report.action, report.rank_out, report.note = COPIED, rank_in, "already at or below the target rank"
        return ModuleResult(_copied(module, ctx), report)
    tensors = dict(module.tensors)
    tensors[DOWN] = module[DOWN][:target]
    tensors[UP] = module[UP][:, :target]
    if MID in module:
        tensors[MID] = module[MID][:target, :target]
    if alpha_in is None or alpha_in == 0:
        # a missing (or zero) alpha meant alpha = rank_in; keep that alpha, now explicit
        tensors[ALPHA] = torch.tensor(float(rank_in), dtype=_out_dtype(module, DOWN, ctx))
        report.alpha_out = float(rank_in)
        report.note = f"alpha was {'missing' if alpha_in is None else 0}: written as {rank_in}"
    if unit and target % unit:
        note = f"rank {target} is not a multiple of the DyLoRA unit {unit}"
        report.note = (report.note + "; " if report.note else "") + note
    tensors = {suffix: _cast(t, ctx.save_dtype, ctx, module.name, suffix).clone().contiguous() for suffix, t in tensors.items()}
    return ModuleResult(tensors, report)


def _full_delta_shape(info: ModuleInfo, ctx: Context, base: torch.Tensor | None) -> tuple[int, ...]:
    if base is not None:
        return tuple(base.shape)
    shape = tuple(info.delta_shape or ())
    if not shape:
        raise NetworkError(f"module {info.name}: the shape of its weight change needs the base weights (--base)")
    if info.kernel is None and len(shape) == 2 and ctx.full_shape is not None:
        return ctx.full_shape(info.name, shape)
    return shape


def algo_label(info: ModuleInfo) -> str:
    return info.algo + ("+dora" if info.dora else "")


def dense_delta(module: NetworkModule, info: ModuleInfo, ctx: Context) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Return (ΔW in float32 on the device, its layer shape) of any mergeable module at ratio 1.

    Non-additive modules (DoRA, ia3, oft, boft) and GLoRA read the base weight: W' − W.
    """
    if not info.mergeable:
        raise UnsupportedError(f"module {info.name}: {info.algo} cannot be resized offline (its change depends on the timestep)")
    base = None
    if info.needs_weight or not info.additive or info.delta_shape is None:
        base = ctx.base_weight(info.name) if ctx.base_weight is not None else None
        if base is None:
            why = algo_label(info) if (info.needs_weight or not info.additive) else info.algo
            raise NetworkError(
                f"module {info.name}: {why} changes the weight in a way that depends on the base weight; "
                "pass the base model with --base CHECKPOINT"
            )
    shape = _full_delta_shape(info, ctx, base)
    if base is not None:
        base = base.to(ctx.device, torch.float32)
        if info.additive and not info.needs_weight:
            return delta(module, shape, device=ctx.device), shape
        merged = apply_module(module, base, None, 1.0, device=ctx.device, info=info)
        return merged.weight.to(torch.float32) - base, shape
    return delta(module, shape, device=ctx.device), shape


LEADING_OVERSAMPLE = 10  # extra directions svd_leading tracks beyond the rank kept


def _dense_spectrum(matrix: torch.Tensor, ctx: Context, is_conv: bool) -> tuple[Spectrum, RankChoice]:
    """Return the spectrum of a dense ΔW and the rank choice on it: the exact SVD, or with
    ctx.leading_only and a fixed rank well below the full one, its leading part (svd_leading), whose
    kept share of ‖ΔW‖_F is exact (the factors are a projection of ΔW) and whose Σσ share is unknown (None)."""
    target = ctx.rule.target(is_conv)
    if not (ctx.leading_only and ctx.rule.method == "fixed" and target is not None
            and target + LEADING_OVERSAMPLE < min(matrix.shape)):
        spectrum = svd_of_dense(matrix)
        return spectrum, _choice(spectrum, ctx.rule, is_conv)
    spectrum = svd_leading(matrix, target, LEADING_OVERSAMPLE)
    values = spectrum.S.detach().to("cpu", torch.float64)
    zero = float(values[0]) < MIN_SINGULAR_VALUE
    rank = 1 if zero else target
    # ‖ΔW‖_F² in float64, a few rows at a time (a float64 copy of a large conv's ΔW would double its memory)
    total = sum(float(torch.linalg.vector_norm(rows, dtype=torch.float64)) ** 2 for rows in matrix.detach().split(256))
    kept = float(values[:rank].square().sum())
    fro_kept = math.sqrt(min(1.0, kept / total)) if total > 0 else 1.0
    smallest = float(values[rank - 1])
    max_ratio = float(values[0]) / smallest if smallest > 0 else math.inf
    return spectrum, RankChoice(rank=rank, sum_kept=None, fro_kept=fro_kept, max_ratio=max_ratio, zero=zero)


def flatten_module(module: NetworkModule, info: ModuleInfo, ctx: Context) -> ModuleResult:
    """Turn any algorithm's weight change into a LoRA/LoCon of the rule's rank (exact SVD of ΔW)."""
    change, shape = dense_delta(module, info, ctx)
    kernel = tuple(shape[2:])
    is_conv = any(k != 1 for k in kernel)
    kind = ("conv" if is_conv else "conv1x1") if kernel else "linear"
    spectrum, choice = _dense_spectrum(change.reshape(shape[0], -1), ctx, is_conv)
    rank = min(choice.rank, spectrum.S.numel())
    dtype = _out_dtype(module, None, ctx)
    tensors = lora_factors(spectrum, rank, 1.0, kernel, shape[1], (1,) * len(kernel), dtype, ctx, module.name)
    report = ModuleReport(
        module.name, algo_label(info), kind, FLATTENED, info.rank, rank, info.alpha, float(tensors[ALPHA]),
        rank_rule=choice.rank, sum_kept=choice.sum_kept, fro_kept=choice.fro_kept, max_ratio=choice.max_ratio,
        note=f"{algo_label(info)} flattened into a LoRA (the algorithm changes)",
    )
    warnings = []
    if info.needs_weight or not info.additive:
        report.note += "; taken at strength 1 on the base weights (W' - W)"
    if info.bias_delta:
        report.note += "; its bias change cannot be held by a LoRA and is dropped"
        warnings.append(f"{module.name}: {info.algo} bias change dropped (a LoRA holds no bias)")
    if choice.zero:
        report.note += "; zero weight change: rank 1"
    return ModuleResult(tensors, report, warnings)


def keep_module(module: NetworkModule, info: ModuleInfo, ctx: Context) -> ModuleResult:
    """Return a module that has no rank to reduce (norm layers) as it is."""
    report = ModuleReport(module.name, info.algo, _kind(info), KEPT, None, None, None, None,
                          note="no rank to reduce: copied")
    return ModuleResult(_copied(module, ctx), report)


def is_plain_lora(info: ModuleInfo) -> bool:
    """True for a LoRA/LoCon whose change is exactly s·up@down (no DoRA, no sparse correction)."""
    return info.algo == "lora" and not info.dora and not info.sparse_bias and not info.bias_delta


@contextlib.contextmanager
def small_ops(device: torch.device):
    """Run CPU math on one thread: the low-rank route is many tiny products whose thread start-up
    costs more than the arithmetic (measured: 20x slower with 2 threads on a busy 2-core machine)."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def resize_module(module: NetworkModule, info: ModuleInfo, ctx: Context, unit: int | None = None) -> ModuleResult:
    """Return the resized module: the one entry point the pipeline calls per module."""
    if info.algo == "norm":
        return keep_module(module, info, ctx)
    if ctx.rule.truncate:
        if not is_plain_lora(info):
            raise UnsupportedError(
                f"module {module.name}: --truncate keeps leading ranks of LoRA/DyLoRA modules; this one is "
                f"{algo_label(info)}{' with a sparse correction' if info.sparse_bias else ''} (resize it without --truncate)"
            )
        return truncate_lora(module, info, ctx, unit)
    if is_plain_lora(info):
        with small_ops(ctx.device):
            return resize_lora(module, info, ctx)
    return flatten_module(module, info, ctx)


def module_alphas(tensors: Mapping[str, torch.Tensor]) -> float | None:
    value = tensors.get(ALPHA)
    return None if value is None else float(value.flatten()[0])
