"""Exact LoRA rewrites: split q/k/v parts <-> one fused module, and scale folding (FORMATS.md 3.5).

All functions take and return kohya-suffixed tensor dicts (`lora_down.weight`, `lora_up.weight`,
`alpha`, `dora_scale`). Arithmetic is float32, cast once to the input dtype at the end; whenever
the result can be produced by slicing or concatenation alone it is, so it stays bit-identical.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from lytools.algos.common import read_scalar, scale_for
from lytools.algos.lora import BIAS  # a LoRA module's bias difference, diff_b
from lytools.convert.layout import ALPHA, DORA, DOWN, MID, UP, fold_split  # noqa: F401 (re-exported)
from lytools.errors import UnsupportedError

LORA_KEYS = frozenset({DOWN, UP, ALPHA, DORA})
Rows = tuple[int, int]
Tensors = Mapping[str, torch.Tensor]


def rank_of(tensors: Tensors) -> int:
    return int(tensors[DOWN].shape[0])


def scale_of(name: str, tensors: Tensors) -> float:
    """Return alpha / rank of a LoRA module (missing or zero alpha: 1)."""
    alpha = tensors.get(ALPHA)
    return scale_for(None if alpha is None else read_scalar(name, ALPHA, alpha), rank_of(tensors))


def alpha_tensor(value: float, like: torch.Tensor | None) -> torch.Tensor:
    """Return a 0-d alpha in the dtype of `like` (the module's old alpha or factor); fp8 and
    integer factors get a float32 alpha so the value survives."""
    dtype = like.dtype if like is not None else torch.float32
    if not dtype.is_floating_point or dtype.itemsize == 1:
        dtype = torch.float32
    return torch.tensor(value, dtype=dtype)


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(tensor.shape[0], -1)


def _is_plain_lora(tensors: Tensors) -> bool:
    return DOWN in tensors and UP in tensors and set(tensors) <= LORA_KEYS | {BIAS}


# -- split parts -> one fused module ---------------------------------------------------------------
def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Return whether two tensors of one dtype and shape hold the same bits (torch.equal has no fp8 kernel)."""
    if a.dtype.itemsize == 1 and a.dtype.is_floating_point:
        return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    return torch.equal(a, b)


def fuse_parts(name: str, parts: Sequence[tuple[Rows, Tensors]], total_rows: int) -> dict[str, torch.Tensor]:
    """Return one LoRA module covering `total_rows` output rows from LoRA parts placed at rows.

    Absent rows get zero. Parts that share one bit-identical `down` and one scale give
    `up` = rows concatenated (same rank, exact to the bit); otherwise `down` = parts stacked and
    `up` block-diagonal (rank = sum of ranks), with the scales folded into `up` only when they
    differ (then alpha = rank). DoRA magnitudes (per output row) concatenate when every part has one.
    """
    for rows, tensors in parts:
        if not _is_plain_lora(tensors):
            algos = sorted(set(tensors) - LORA_KEYS) or ["an incomplete LoRA"]
            raise UnsupportedError(
                f"module {name}: part at rows {rows[0]}..{rows[1]} holds {', '.join(algos)}; only LoRA parts fuse "
                f"exactly; flatten the network to LoRA first with `lytools resize`"
            )
    ordered = sorted(parts, key=lambda item: item[0][0])
    first = ordered[0][1]
    downs = [t[DOWN] for _, t in ordered]
    scales = [scale_of(name, t) for _, t in ordered]
    same_down = all(d.shape == downs[0].shape and d.dtype == downs[0].dtype and _same_bits(d, downs[0]) for d in downs)
    same_scale = all(s == scales[0] for s in scales)
    up_dtype = first[UP].dtype
    kernel_up = first[UP].shape[2:]
    result: dict[str, torch.Tensor] = {}
    if same_down and same_scale:
        rank = downs[0].shape[0]
        up = torch.zeros((total_rows, rank) + tuple(kernel_up), dtype=up_dtype)
        for (start, stop), tensors in ordered:
            up[start:stop] = tensors[UP]
        result[DOWN] = downs[0].clone()
        result[UP] = up
        if ALPHA in first:
            result[ALPHA] = first[ALPHA].clone()
    else:
        rank = sum(d.shape[0] for d in downs)
        result[DOWN] = torch.cat([d.to(downs[0].dtype) for d in downs], dim=0)
        fold = not same_scale
        up = torch.zeros((total_rows, rank) + tuple(kernel_up), dtype=torch.float32 if fold else up_dtype)
        column = 0
        for ((start, stop), tensors), scale in zip(ordered, scales):
            r = tensors[DOWN].shape[0]
            block = tensors[UP].float() * scale if fold else tensors[UP]
            up[start:stop, column:column + r] = block
            column += r
        result[UP] = up.to(up_dtype)
        like = first.get(ALPHA, first[DOWN])
        # one common scale s: alpha = s * fused rank keeps it; folded scales: alpha = rank (scale 1)
        result[ALPHA] = alpha_tensor(rank if fold else scales[0] * rank, like)
    doras = [t.get(DORA) for _, t in ordered]
    if any(d is not None for d in doras):
        covered = sum(stop - start for (start, stop), _ in ordered)
        if any(d is None for d in doras) or covered != total_rows:
            raise UnsupportedError(f"module {name}: DoRA magnitudes on only some q/k/v parts cannot be fused")
        for (start, stop), dora in zip((rows for rows, _ in ordered), doras):
            if dora.shape[0] != stop - start or (dora.dim() > 1 and dora.shape[1] != 1):
                # a per-input-channel magnitude normalises over the part's rows only: no fused equivalent
                raise UnsupportedError(
                    f"module {name}: its q/k/v parts carry input-axis DoRA magnitudes (dora_scale {list(dora.shape)}), "
                    "which cannot be fused into one module"
                )
        result[DORA] = torch.cat([d.reshape(d.shape[0], *d.shape[1:]) for d in doras], dim=0)
    biases = [t.get(BIAS) for _, t in ordered]
    present = [b for b in biases if b is not None]
    if present:  # bias differences of the parts: their rows of the fused layer's bias, zero elsewhere
        bias = torch.zeros(total_rows, dtype=present[0].dtype)
        for ((start, stop), _), part_bias in zip(ordered, biases):
            if part_bias is not None:
                bias[start:stop] = part_bias
        result[BIAS] = bias
    return result


# -- one fused module -> split parts ----------------------------------------------------------------
def split_fused(name: str, tensors: Tensors, parts: Sequence[Rows]) -> list[dict[str, torch.Tensor] | None]:
    """Return one LoRA module per row range of a fused module; ΔW of each equals the fused ΔW's rows.

    When the fused `up` is block-diagonal over the parts (a module fused from parts earlier), each
    part keeps only its own columns (its original rank), and a part whose rows are all zero (one
    the fused module was made without: a file training to_q and to_v only) is None, unless a DoRA
    magnitude or a bias difference still changes its rows; otherwise each part shares the whole
    `down` with its rows of `up`. Only slicing: exact to the bit.
    """
    if not _is_plain_lora(tensors) or MID in tensors:
        algos = sorted(set(tensors) - LORA_KEYS) or ["an incomplete LoRA"]
        raise UnsupportedError(
            f"module {name}: {', '.join(algos)} on a fused module cannot be split into q/k/v parts exactly; "
            f"flatten the network to LoRA first with `lytools resize`"
        )
    up, down = tensors[UP], tensors[DOWN]
    rank = down.shape[0]
    scale = scale_of(name, tensors)
    columns = _block_columns(up, parts)
    result = []
    for index, (start, stop) in enumerate(parts):
        part: dict[str, torch.Tensor] = {}
        if columns is not None and not len(columns[index]) and DORA not in tensors and BIAS not in tensors:
            result.append(None)  # ΔW of these rows is zero and nothing else touches them
            continue
        if columns is not None and len(columns[index]):
            cols = columns[index]
            part[DOWN] = down[cols].clone()
            part[UP] = up[start:stop][:, cols].clone()
            part_rank = len(cols)
        else:
            part[DOWN] = down.clone()
            part[UP] = up[start:stop].clone()
            part_rank = rank
        if ALPHA in tensors:
            part[ALPHA] = alpha_tensor(scale * part_rank, tensors[ALPHA]) if part_rank != rank else tensors[ALPHA].clone()
        dora = tensors.get(DORA)
        if dora is not None:
            if dora.shape[0] != up.shape[0]:
                raise UnsupportedError(f"module {name}: an input-axis DoRA magnitude cannot be split into q/k/v parts")
            part[DORA] = dora[start:stop].clone()
        if BIAS in tensors:  # the bias difference: its rows, like up's
            part[BIAS] = tensors[BIAS][start:stop].clone()
        result.append(part)
    return result


def _block_columns(up: torch.Tensor, parts: Sequence[Rows]) -> list[torch.Tensor] | None:
    """Return per-part column indices when `up` is block-diagonal over the parts, else None."""
    if len(parts) < 2:
        return None
    flat = _flat(up) if up.dim() == 2 else up.reshape(up.shape[0], up.shape[1], -1).abs().sum(-1)
    used = []
    seen = torch.zeros(up.shape[1], dtype=torch.bool)
    for start, stop in parts:
        mask = flat[start:stop].ne(0).any(dim=0)
        if (mask & seen).any():
            return None
        seen |= mask  # a part of zero rows uses no column (the fused module was made without it)
        used.append(torch.nonzero(mask).flatten())
    if bool(seen.all()) is False:
        return None
    return used


# -- scale folding -------------------------------------------------------------------------------------
def fold_scale(name: str, tensors: Tensors) -> dict[str, torch.Tensor]:
    """Return the module with alpha / rank multiplied into its factors and no alpha (scale 1).

    Powers of two are exact in binary floating point, so a power-of-two scale folds without rounding.
    """
    scale = scale_of(name, tensors)
    result = {k: v for k, v in tensors.items() if k != ALPHA}
    if scale == 1.0:
        return result
    down_factor, up_factor = fold_split(scale)
    for key, factor in ((DOWN, down_factor), (UP, up_factor)):
        if factor != 1.0:
            tensor = tensors[key]
            result[key] = (tensor.float() * factor).to(tensor.dtype)
    return result


# -- swapped modulation halves ---------------------------------------------------------------------------
# suffixes whose first axis is ΔW's output rows, and those that do not see the row order
_ROW_SUFFIXES = frozenset({UP, "hada_w1_a", "hada_w2_a", "diff", "diff_b"})
_ROWLESS_SUFFIXES = frozenset({DOWN, MID, ALPHA, "hada_w1_b", "hada_w2_b"})
_LOKR_SUFFIXES = frozenset({"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", ALPHA})


def _lokr_rows(name: str, tensors: Tensors) -> tuple[str, int]:
    """Return (the factor whose rows to swap, ΔW rows) of a LoKr module. Rows of kron(w1, w2) are
    i·b + j: a half turn is i -> i + a/2 when w1 has an even row count a, j -> j + b/2 when a = 1."""
    first = "lokr_w1" if "lokr_w1" in tensors else "lokr_w1_a"
    second = "lokr_w2" if "lokr_w2" in tensors else "lokr_w2_a"
    if first not in tensors or second not in tensors:
        raise UnsupportedError(f"module {name}: an incomplete LoKr module")
    a, b = int(tensors[first].shape[0]), int(tensors[second].shape[0])
    if a % 2 == 0:
        return first, a * b
    if a == 1 and "lokr_t2" not in tensors:
        return second, b
    raise UnsupportedError(
        f"module {name}: its output rows are stored in the other [shift; scale] order and a LoKr with "
        f"{a} x {b} row blocks cannot be reordered exactly; flatten it to LoRA first with `lytools resize`"
    )


def halves_swap_applies(tensors: Tensors) -> bool:
    """True unless the module's shapes show more than the two [shift; scale] chunks of a modulation.

    The swapped modulations are 2·width rows: the final layer's and a pre-only (last) SD3 context
    block's. SD3.5 large's block 23 (the last one of SD3 medium, whose table names it) is a full block
    there: 6·width rows in the same order in both layouts. Shapes that do not tell (LoKr): True."""
    for rows, width in ((UP, DOWN), ("diff", "diff"), ("hada_w1_a", "hada_w1_b")):
        if rows in tensors and width in tensors:
            return int(tensors[rows].shape[0]) == 2 * int(tensors[width].shape[1])
    return True


def swap_halves(name: str, tensors: Tensors) -> dict[str, torch.Tensor]:
    """Return the module with the two halves of its output rows exchanged: ΔW' = [ΔW[h:]; ΔW[:h]].

    diffusers stores the Flux/SD3 final adaLN modulation (and SD3's last context one) as
    [scale; shift] where BFL/SD3 store [shift; scale] (FORMATS.md 2.1). The exchange is its own
    inverse and only moves rows (LoRA `up`, LoHa `w1_a`/`w2_a`, LoKr `w1` (or `w2` when w1 has one
    row), full `diff`, an output-axis DoRA magnitude), so it is exact to the bit; `down` and an
    input-axis magnitude do not change.
    """
    if any(suffix.startswith("lokr_") for suffix in tensors):
        others = sorted(set(tensors) - _LOKR_SUFFIXES - {DORA})
        rowed, rows = _lokr_rows(name, tensors)
        row_suffixes = {rowed}
    else:
        others = sorted(set(tensors) - _ROW_SUFFIXES - _ROWLESS_SUFFIXES - {DORA})
        row_suffixes = {suffix for suffix in tensors if suffix in _ROW_SUFFIXES}
        rows = int(tensors[min(row_suffixes)].shape[0]) if row_suffixes else 0
    if others or not row_suffixes:
        raise UnsupportedError(
            f"module {name}: its output rows are stored in the other [shift; scale] order and "
            f"{', '.join(others) or 'its tensors'} cannot be reordered by rows; flatten it to LoRA first with `lytools resize`"
        )
    if rows % 2:
        raise UnsupportedError(f"module {name}: {rows} output rows cannot be split into [shift; scale] halves")
    result = dict(tensors)
    for suffix, tensor in tensors.items():
        if suffix == DORA and tensor.dim() > 0 and tensor.shape[0] == rows:
            result[suffix] = _half_turn(tensor)
        elif suffix in row_suffixes:
            if suffix in _ROW_SUFFIXES and tensor.shape[0] != rows:
                raise UnsupportedError(f"module {name}: {suffix} has {tensor.shape[0]} rows, the module {rows}")
            result[suffix] = _half_turn(tensor)
    return result


def _half_turn(tensor: torch.Tensor) -> torch.Tensor:
    half = tensor.shape[0] // 2
    return torch.cat([tensor[half:], tensor[:half]]).contiguous()
