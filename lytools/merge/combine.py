"""Merge several networks into one network.

Without a rank: LoRA-family modules combine exactly. For every module name, the inputs' factors
are stacked (rank = sum of ranks), each input's ratio and alpha/rank folded into its factors as
a power of two on `up` times the rest on `down` (so neither over- nor underflows in fp16), and the
output alpha equals its rank (scale 1). Tucker convs keep a block-diagonal `lora_mid`; a Tucker
module combined with a plain conv is first flattened (exactly) to a plain conv. A module only one
input has, of another additive algorithm, is copied with its ratio folded in. Full (`diff`) and norm
(`w_norm`) modules of several inputs are summed exactly, tensor by tensor.

With `rank`: the summed change of every input is re-factored by SVD to that rank (`conv_rank`
for kxk convs); a change of a norm layer's 1-D weight, which no LoRA holds, is summed as above. When every contribution is low rank the dense ΔW is never built: with
U = [c_i·up_i], D = [d_i·down_i] stacked, U = Q_u R_u and Dᵀ = Q_d R_d (thin QR), the SVD of the
small core R_u R_dᵀ gives the SVD of U·D in O((m + n)·R²). The share of the Frobenius norm kept
is reported per module.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from lytools.algos import ModuleInfo, NetworkModule, delta
from lytools.arch.network import ALPHA, DORA_SCALE, LORA_DOWN, LORA_MID, LORA_UP
from lytools.device import resolve_device
from lytools.errors import NetworkError, UsageError
from lytools.arch.a1111 import complete_for_a1111
from lytools.io import write_safetensors
from lytools.io.dtypes import FP8_NAMES, saturating_cast, st_name
from lytools.io.metadata import add_provenance, carried_into_tensors, network_modelspec, source_entry
from lytools.merge.inputs import (NetworkInput, NetworkInputs, candidates, check_kohya_names, family, load_network_input,
                                  named_for, same_family)
from lytools.merge.plan import STRIPPED_LINE, stripped_entry
from lytools.merge.ratios import Ratios
from lytools.ui import QUIET, Reporter

UP, DOWN, MID = LORA_UP, LORA_DOWN, LORA_MID
BIAS = "diff_b"  # a LoRA module's bias difference (lytools.algos.lora)
SPARSE_VALUES = "bias_values"  # the values of the LyCORIS extractor's sparse weight correction (lytools.algos.sparse)

# additive algorithms whose change is linear in one tensor (glora: two, together): the ratio folds into it
FOLD_INTO = {
    "lora": (LORA_UP,),
    "loha": ("hada_w1_a",),
    "lokr": ("lokr_w1", "lokr_w1_a"),
    "full": ("diff", "diff_b"),
    "norm": ("w_norm", "b_norm"),
    # ΔW = s·(b1·b2 + W·a1·a2) (the old layout too: s·(b2·b1 + W·a2·a1)): linear in a1 and b1 taken together
    "glora": ("a1.weight", "b1.weight"),
}
# algorithms whose tensors are the change itself: the same module of several inputs sums exactly, tensor by tensor
SUMMED = {"full": FOLD_INTO["full"], "norm": FOLD_INTO["norm"]}


@dataclass
class Contribution:
    """One input's module with the ratio it is merged at."""

    network: int
    module: NetworkModule
    info: ModuleInfo
    ratio: float


@dataclass
class ModuleResult:
    """What the merge made of one module name."""

    name: str
    sources: list[int]
    method: str  # concat | copy | sum | svd
    rank: int | None
    kept: float | None = None  # share of the Frobenius norm kept by the SVD
    conv: bool = False  # a kxk (k > 1) conv: its rank is sd-scripts' conv_dim, not network_dim
    alpha: float | None = None  # the alpha written (rank when the module stores none), once merged

    def as_dict(self) -> dict:
        result = {"module": self.name, "inputs": self.sources, "method": self.method, "rank": self.rank}
        if self.kept is not None:
            result["frobenius_kept"] = round(self.kept, 6)
        return result


@dataclass
class NetworkMergeResult:
    """What a networks -> network merge did (or would do, for a dry run)."""

    inputs: list[dict]
    modules: list[ModuleResult] = field(default_factory=list)
    output: Path | None = None
    output_bytes: int = 0
    seconds: float = 0.0
    verification: object | None = None  # VerifyReport when --verify ran
    strip_metadata: bool = False  # --strip-metadata: only what loaders read is written

    def as_dict(self) -> dict:
        kept = [m.kept for m in self.modules if m.kept is not None]
        extra = {"verify": self.verification.as_dict()} if self.verification is not None else {}
        return {**extra,
            "mode": "network",
            "output": str(self.output) if self.output else None,
            "inputs": self.inputs,
            "modules": len(self.modules),
            "methods": _count(m.method for m in self.modules),
            "min_frobenius_kept": round(min(kept), 6) if kept else None,
            "output_bytes": self.output_bytes,
            "seconds": round(self.seconds, 3),
            "per_module": [m.as_dict() for m in self.modules],
            **stripped_entry(self.strip_metadata),
        }

    def summary(self) -> str:
        """One line for stderr: how many modules, by which method, the worst SVD share, the time."""
        methods = ", ".join(f"{n} {k}" for k, n in sorted(_count(m.method for m in self.modules).items()))
        kept = [m.kept for m in self.modules if m.kept is not None]
        worst = f", lowest Frobenius share kept {min(kept):.4f}" if kept else ""
        return f"merged {len(self.inputs)} networks: {len(self.modules)} modules ({methods}){worst} in {self.seconds:.1f} s"

    def lines(self, verbose: bool = False) -> list[str]:
        """Return the human-readable plan/result; `verbose` adds one line per module (rank, share kept)."""
        out = []
        for item in self.inputs:
            out.append(f"  {Path(item['path']).name} x {item['ratio']:g}: {item['modules']} modules")
        methods = ", ".join(f"{n} {k}" for k, n in sorted(_count(m.method for m in self.modules).items()))
        out.append(f"output: {len(self.modules)} modules ({methods}), {self.output_bytes / 1e6:.1f} MB")
        kept = [m for m in self.modules if m.kept is not None]
        if kept:
            worst = min(kept, key=lambda m: m.kept)
            out.append(f"SVD: lowest Frobenius share kept {worst.kept:.4f} ({worst.name})")
        if self.strip_metadata:
            out.append(STRIPPED_LINE)
        if verbose:
            for m in self.modules:
                kept = f", Frobenius share kept {m.kept:.4f}" if m.kept is not None else ""
                out.append(f"  {m.name}: {m.method}, rank {m.rank}{kept}")
        return out


def _count(items) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return counts


# -- factor helpers ------------------------------------------------------------------------------
def power_split(factor: float) -> tuple[float, float]:
    """Return (c, d) with c·d = factor, c = ±2^k near sqrt(|factor|): exact in any float format."""
    if factor == 0.0:
        return 0.0, 0.0
    exponent = round(math.log2(abs(factor)) / 2)
    up = math.copysign(2.0 ** exponent, factor)
    return up, abs(factor) / 2.0 ** exponent


def lora_factors(module: NetworkModule, info: ModuleInfo) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Return (up (out, r), down (r, in·K) or (r, in, kh, kw) as stored, mid or None), float32."""
    up = module[UP].float()
    up = up.reshape(up.shape[0], up.shape[1])
    down = module[DOWN].float()
    mid = module.get(MID)
    return up, down, None if mid is None else mid.float()


def untucker(down: torch.Tensor, mid: torch.Tensor) -> torch.Tensor:
    """Return the plain conv down factor (r, in, kh, kw) equal to mid ∘ down (exact)."""
    return torch.einsum("ij...,jc->ic...", mid, down.reshape(down.shape[0], -1))


def _scale(info: ModuleInfo) -> float:
    if info.scale is None:
        raise NetworkError(f"module {info.name}: alpha unknown")
    return info.scale


# -- plan -------------------------------------------------------------------------------------------
def _contributions(networks: Sequence[NetworkInput], ratios: Ratios) -> dict[str, list[Contribution]]:
    by_name: dict[str, list[Contribution]] = {}
    for index, network in enumerate(networks):
        for name in sorted(network.modules):
            info = network.infos[name]
            by_name.setdefault(name, []).append(
                Contribution(index, network.modules[name], info, ratios.of(index, name))
            )
    return by_name


def _concatenable(info: ModuleInfo) -> bool:
    return info.algo == "lora" and info.dora is None and not info.sparse_bias


def _summable(parts: list[Contribution]) -> bool:
    """True when the parts are all full or all norm modules (no DoRA): their tensors add up exactly."""
    algos = {p.info.algo for p in parts}
    return len(algos) == 1 and algos <= set(SUMMED) and all(p.info.dora is None for p in parts)


def _method(name: str, parts: list[Contribution], rank: int | None, files: Sequence[str]) -> str:
    """Return how a module name is merged; raise for what cannot be merged without the base."""
    for part in parts:
        if not part.info.mergeable:
            raise NetworkError(f"{files[part.network]}: module {name}: {part.info.algo} cannot be merged")
    if rank is not None:
        if _summable(parts) and any(len(p.info.delta_shape or ()) < 2 for p in parts):
            return "sum"  # a norm layer's 1-D weight: no LoRA holds it (an SVD would write 1-D factors)
        for part in parts:
            if not part.info.additive or part.info.needs_weight:
                kind = f"{part.info.algo} with DoRA" if part.info.dora else part.info.algo
                raise NetworkError(
                    f"{files[part.network]}: module {name}: {kind} changes the weight non-additively (or through the "
                    "base weight); networks holding it can only be merged into a checkpoint"
                )
        return "svd"
    if all(_concatenable(p.info) for p in parts):
        return "concat"
    if len(parts) == 1:
        part = parts[0]
        if part.ratio == 1.0 or (part.info.additive and part.info.algo in FOLD_INTO and part.info.dora is None):
            return "copy"
        kind = f"{part.info.algo} with DoRA" if part.info.dora else part.info.algo  # DoRA is what refuses a ratio
        raise NetworkError(
            f"{files[part.network]}: module {name}: {kind} cannot take ratio {part.ratio:g} exactly; "
            "merge it into a checkpoint instead"
        )
    if _summable(parts):
        return "sum"
    algos = ", ".join(sorted({p.info.algo + (" + DoRA" if p.info.dora else "") for p in parts}))
    if any(not p.info.additive or p.info.needs_weight for p in parts):  # --rank cannot take them either
        raise NetworkError(f"module {name}: {algos} from {len(parts)} inputs cannot be combined without the base "
                           "weight; merge them into a checkpoint")
    raise NetworkError(
        f"module {name}: {algos} from {len(parts)} inputs cannot be combined exactly; use --rank N to re-factor the sum"
    )


def _planned_rank(parts: list[Contribution], method: str, rank: int | None, conv_rank: int | None,
                  kernel: tuple[int, ...] | None = None) -> int | None:
    if method == "concat":
        return sum(p.info.rank or 0 for p in parts)
    if method == "copy":
        return parts[0].info.rank
    if method == "sum":
        return None
    shape = _delta_shape(parts, kernel)
    limit = min(shape[0], math.prod(shape[1:]))
    is_conv = any(k != 1 for k in shape[2:])
    wanted = (conv_rank if conv_rank is not None else rank) if is_conv else rank
    if all(_concatenable(p.info) for p in parts):
        limit = min(limit, sum(p.info.rank or 0 for p in parts))
    return max(1, min(int(wanted), limit))


def _delta_shape(parts: list[Contribution], kernel: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """Return the most specific ΔW shape the inputs give (a 4-D conv shape over a flattened one); a shape the
    factors leave flattened, (out, in·K) (LoHa/LoKr without Tucker), is unfolded with the layer's `kernel`
    (table_kernel) when known."""
    shapes = [p.info.delta_shape for p in parts if p.info.delta_shape]
    if not shapes:
        raise NetworkError(f"module {parts[0].module.name}: cannot tell the shape of its weight change")
    best = max(shapes, key=len)
    for shape in shapes:
        if math.prod(shape) != math.prod(best) or shape[0] != best[0]:
            raise NetworkError(f"module {parts[0].module.name}: inputs disagree on its shape ({list(shape)} vs {list(best)})")
    if len(best) == 2 and kernel and best[1] % math.prod(kernel) == 0:
        return (best[0], best[1] // math.prod(kernel), *kernel)
    return tuple(best)


def table_kernel(name: str, arch: str | None) -> tuple[int, ...] | None:
    """Return the layer kernel of module `name` from the name tables: () for a Linear, (kh, kw) for a conv;
    None when it cannot be known (the name is in no table, or, the architecture unknown, tables disagree).

    LoHa and LoKr factors without a Tucker core store a kxk conv flattened, (out, in·k·k): from the factors
    alone it looks like a Linear. The layer the module names tells which it is."""
    from lytools.arch import alias_table
    from lytools.arch.keymap import NETWORK_ARCHS

    arch = family(arch)  # chroma: flux names
    kernels = set()
    for candidate in (arch,) if arch in NETWORK_ARCHS else NETWORK_ARCHS:
        target = alias_table(candidate).get(name)
        if target is not None and target.shape:
            kernels.add(tuple(target.shape[2:]))
    return kernels.pop() if len(kernels) == 1 else None


def _is_kxk(parts: list[Contribution], kernel: tuple[int, ...] | None) -> bool:
    """True for a kxk (k > 1) conv: its rank is sd-scripts' conv_dim. The layer's kernel, when known, decides
    too (factors stored flattened do not tell)."""
    return any(p.info.is_conv for p in parts) or (kernel is not None and any(k != 1 for k in kernel))


# -- the three methods --------------------------------------------------------------------------------
def _concat(parts: list[Contribution], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Return the exact stacked LoRA (alpha = total rank) of several LoRA-family contributions."""
    factors = [lora_factors(p.module, p.info) for p in parts]
    tucker = all(mid is not None for _, _, mid in factors)
    ups, downs, mids = [], [], []
    for part, (up, down, mid) in zip(parts, factors):
        c, d = power_split(part.ratio * _scale(part.info))
        if mid is not None and not tucker:
            down, mid = untucker(down, mid), None
        ups.append(up * c)
        downs.append(down * d)
        mids.append(mid)
    widest = max(downs, key=lambda t: t.dim())  # a conv-shaped down decides the stored form
    downs = [t.reshape(t.shape[0], *widest.shape[1:]) for t in downs]
    down = torch.cat(downs)
    rank = down.shape[0]
    up = torch.cat(ups, dim=1)
    result = {DOWN: down, UP: up.reshape(up.shape[0], rank, *([1] * (down.dim() - 2)))}
    if tucker:
        kernel = mids[0].shape[2:]
        mid = torch.zeros(rank, rank, *kernel)
        position = 0
        for block in mids:
            size = block.shape[0]
            mid[position:position + size, position:position + size] = block
            position += size
        result[MID] = mid
        result[UP] = up.reshape(up.shape[0], rank, *([1] * len(kernel)))
    biases = [part.ratio * part.module[BIAS].float() for part in parts if BIAS in part.module.tensors]
    if biases:  # bias differences (ComfyUI diff_b, peft lora_B.bias) add up exactly
        result[BIAS] = torch.stack(biases).sum(dim=0)
    result[ALPHA] = torch.tensor(float(rank))
    # alpha = rank must stay exact (fp16 holds integers only up to 2048): stored as float32
    return {suffix: tensor if suffix == ALPHA else tensor.to(dtype) for suffix, tensor in result.items()}


def _copy(part: Contribution) -> dict[str, torch.Tensor]:
    """Return one contribution's tensors with its ratio folded in (scaled ones in float32: the
    caller casts once, to --save-dtype or the tensor's own dtype)."""
    tensors = dict(part.module.tensors)
    if part.ratio != 1.0:
        if part.info.algo == "lora":
            c, d = power_split(part.ratio)
            tensors[UP] = tensors[UP].float() * c
            tensors[DOWN] = tensors[DOWN].float() * d
            for suffix in (BIAS, SPARSE_VALUES):  # the bias difference, the sparse weight correction: times the ratio
                if suffix in tensors:
                    tensors[suffix] = tensors[suffix].float() * part.ratio
        else:
            for suffix in FOLD_INTO[part.info.algo]:
                if suffix in tensors:
                    tensors[suffix] = tensors[suffix].float() * part.ratio
                    if part.info.algo in ("loha", "lokr"):
                        break
    return tensors


def _sum(parts: list[Contribution]) -> dict[str, torch.Tensor]:
    """Return Σ ratio·tensor for each tensor of full or norm contributions (a `diff_b`/`b_norm` only some hold
    adds up from those), float32."""
    shape = _delta_shape(parts)  # a conv's diff stored (out, in, 1, 1) by one input and (out, in) by another: the 4-D
    result: dict[str, torch.Tensor] = {}
    for part in parts:
        weight, _ = SUMMED[part.info.algo]
        for suffix in SUMMED[part.info.algo]:
            if suffix in part.module:
                value = part.module[suffix].float() * part.ratio
                value = value.reshape(shape) if suffix == weight else value
                result[suffix] = result[suffix] + value if suffix in result else value
    return result


def _low_rank_sum(parts: list[Contribution], shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (U, D) with U @ D = Σ ratio·ΔW, U (out, R), D (R, in·K), from the inputs' factors."""
    ups, downs = [], []
    for part in parts:
        up, down, mid = lora_factors(part.module, part.info)
        if mid is not None:
            down = untucker(down, mid)
        ups.append(up * (part.ratio * _scale(part.info)))
        downs.append(down.reshape(down.shape[0], -1))
    return torch.cat(ups, dim=1), torch.cat(downs)


def svd_factors(
    up: torch.Tensor | None, down: torch.Tensor | None, dense: torch.Tensor | None, rank: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Return (up', down', kept) of the best rank-`rank` approximation of up @ down (or `dense`).

    Singular values are split as sqrt on both sides; `kept` = ‖kept σ‖ / ‖σ‖ (1.0 for a zero change).
    """
    if dense is None:
        q_up, r_up = torch.linalg.qr(up)
        q_down, r_down = torch.linalg.qr(down.T)
        u, s, vh = torch.linalg.svd(r_up @ r_down.T, full_matrices=False)
        u, vh = q_up @ u, vh @ q_down.T
    else:
        u, s, vh = torch.linalg.svd(dense, full_matrices=False)
    total = float(torch.linalg.vector_norm(s))
    rank = min(rank, s.shape[0])
    kept = 1.0 if total == 0.0 else float(torch.linalg.vector_norm(s[:rank])) / total
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank], kept


def _svd(parts: list[Contribution], rank: int, device: torch.device, dtype: torch.dtype,
         kernel: tuple[int, ...] | None = None) -> tuple[dict[str, torch.Tensor], float]:
    shape = _delta_shape(parts, kernel)
    flat = (shape[0], math.prod(shape[1:]))
    if all(_concatenable(p.info) for p in parts):
        up, down = _low_rank_sum(parts, shape)
        new_up, new_down, kept = svd_factors(up.to(device), down.to(device), None, rank)
    else:
        total = torch.zeros(flat, device=device)
        for part in parts:
            change = delta(part.module, part.info.delta_shape or shape, device=device)
            total += change.reshape(flat) * part.ratio
        new_up, new_down, kept = svd_factors(None, None, total, rank)
    kernel = shape[2:]
    result = {
        UP: new_up.reshape(shape[0], -1, *([1] * len(kernel))),
        DOWN: new_down.reshape(-1, *shape[1:]),
        ALPHA: torch.tensor(float(new_down.shape[0])),
    }
    return {suffix: tensor if suffix == ALPHA else tensor.cpu().contiguous().to(dtype)
            for suffix, tensor in result.items()}, kept


# -- metadata ---------------------------------------------------------------------------------------------
def merged_network_metadata(
    networks: Sequence[NetworkInput], ratios: Ratios, results: Sequence[ModuleResult], rank: int | None,
    title: str | None = None, arch: str | None = None,
) -> dict[str, str]:
    """Return the first input's metadata updated like sd-scripts' merge, plus lytools provenance.

    Like sd-scripts' merge scripts the output carries a modelspec with `merged_from`: the first input's, dated
    now, its missing keys (all of them for an input without one) filled for the networks' architecture
    (`arch`, from check_same_architecture: what their candidates leave; else the first one detected).
    """
    meta = carried_into_tensors(networks[0].metadata)  # written with kohya factors and alpha tensors
    arch = arch or next((n.arch for n in networks if n.arch != "unknown"), None)
    spec = network_modelspec(arch, title or networks[0].path.stem)
    meta["modelspec.date"] = spec.pop("modelspec.date")
    if arch == "sd2":  # 512 (epsilon) and 768 (v) networks look alike: no guess
        spec.pop("modelspec.prediction_type", None)
    for key, value in spec.items():
        meta.setdefault(key, value)
    if all(m.method in ("concat", "svd") for m in results):
        meta["ss_network_module"] = "networks.lora"
    meta.update(rank_metadata(results, meta.get("ss_network_args")))
    names = [f"{n.name} x {ratios.per_input[i]:g}" for i, n in enumerate(networks)]
    how = f"re-factored to rank {rank}" if rank is not None else "concatenated exactly"
    comment = f"merged from {', '.join(names)} ({how})"
    earlier = meta.get("ss_training_comment", "")
    meta["ss_training_comment"] = f"{comment}; {earlier}" if earlier else comment
    meta["modelspec.merged_from"] = ", ".join(n.name for n in networks)
    sources = []
    for index, network in enumerate(networks):
        entry = dict(source_entry(network.path, network.autov3))
        entry["ratio"] = format(ratios.per_input[index], "g")
        sources.append(entry)
    meta = add_provenance(meta, sources=sources)
    meta["lytools.merge"] = json.dumps({**ratios.describe(), "rank": rank}, separators=(",", ":"))
    return meta


def _one_value(values: set) -> str | None:
    return str(next(iter(values))) if len(values) == 1 else None


def rank_metadata(results: Sequence[ModuleResult], network_args: str | None) -> dict[str, str]:
    """Return ss_network_dim/ss_network_alpha and ss_network_args' conv_dim/conv_alpha for the merged modules.

    As sd-scripts writes them: network_dim is the rank of the linear (and 1x1 conv) modules, conv_dim that of
    the kxk convs; the alphas are the ones stored, so dim and alpha give the scale the file holds. "Dynamic"
    only where the modules differ. Keys with nothing to describe (no module with a rank) are left alone.
    """
    ranked = [m for m in results if m.rank is not None]
    linear = [m for m in ranked if not m.conv]
    conv = [m for m in ranked if m.conv]
    meta: dict[str, str] = {}
    if linear:
        meta["ss_network_dim"] = _one_value({m.rank for m in linear}) or "Dynamic"
        meta["ss_network_alpha"] = _one_value({float(m.alpha) for m in linear if m.alpha is not None}) or "Dynamic"
    conv_dim = (_one_value({m.rank for m in conv}) or "Dynamic") if conv else None
    conv_alpha = _one_value({float(m.alpha) for m in conv if m.alpha is not None})
    args = conv_network_args(network_args, conv_dim, conv_alpha, bool(ranked))
    if args is not None:
        meta["ss_network_args"] = args
    return meta


def conv_network_args(network_args: str | None, conv_dim: str | None, conv_alpha: str | None, ranked: bool) -> str | None:
    """Return ss_network_args with conv_dim/conv_alpha describing the kxk convs written, as sd-scripts spells
    them (FORMATS.md 5.3: {"conv_dim": "<c>", "conv_alpha": "<float>"}): merge of networks and resize share it.

    conv_dim None: the output holds no kxk conv; then, where it holds other modules with a rank (`ranked`), the
    keys are removed. Otherwise they are set, added to the input's arguments (an empty set where it had none);
    conv_alpha None (the convs differ) is "Dynamic". None: no ss_network_args to write (the input's is not a
    JSON object, not ours to rewrite, or there was none and nothing to say).
    """
    try:
        args = json.loads(network_args) if network_args else {}
    except ValueError:
        return None
    if not isinstance(args, dict):
        return None
    if conv_dim is not None:
        args["conv_dim"] = conv_dim
        args["conv_alpha"] = conv_alpha or "Dynamic"
    elif ranked:
        args.pop("conv_dim", None)  # no kxk conv module left
        args.pop("conv_alpha", None)
    if args or network_args is not None:
        return json.dumps(args)
    return None


def _is_fp8(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point and st_name(dtype) in FP8_NAMES


def _output_dtype(networks: Sequence[NetworkInput], save_dtype: torch.dtype | None) -> torch.dtype:
    """Return --save-dtype, else the widest float dtype of the inputs' factors (the first of equal widths) other
    than fp8: fp8 factors scaled by their ratios and stacked lose what fp8 cannot hold, so fp8-only inputs give
    float16."""
    if save_dtype is not None:
        return save_dtype
    widest: torch.dtype | None = None
    for network in networks:
        for module in network.modules.values():
            for suffix, tensor in module.tensors.items():
                if suffix in (ALPHA, DORA_SCALE) or not tensor.is_floating_point() or _is_fp8(tensor.dtype):
                    continue  # magnitudes: often float32 whatever the factors are
                if widest is None or tensor.dtype.itemsize > widest.itemsize:
                    widest = tensor.dtype
    return widest or torch.float16


def check_same_architecture(networks: Sequence[NetworkInput]) -> str | None:
    """Return the networks' common architecture (None when not told apart); refuse networks made for
    different ones (their union would be a file no model loads whole).

    A network whose modules fit several architectures equally (e.g. a text-encoder-only one: CLIP-L+CLIP-G
    fits sdxl and sd3) is compatible with any of them, and the others narrow it down: an sdxl UNet network
    merged with it makes an sdxl network. One that fits no architecture is not judged.
    """
    common: set[str] | None = None
    judged: list[NetworkInput] = []
    for network in networks:
        fits = candidates(network)
        if fits is None:
            continue
        if common is not None and not common & fits:
            raise NetworkError(
                f"{network.path}: a {_described(network)} network, but {_joined(judged)}: "
                "networks for different architectures cannot be merged into one"
            )
        common = fits if common is None else common & fits
        judged.append(network)
    if common is None or len(common) > 1:
        return None
    known = next((n.arch for n in judged if n.arch != "unknown" and same_family(n.arch, next(iter(common)))), None)
    return known or next(iter(common))  # a detected name (chroma) before its family's (flux)


def _described(network: NetworkInput) -> str:
    return network.arch if network.arch != "unknown" else " or ".join(network.tied)


def _joined(networks: Sequence[NetworkInput]) -> str:
    return " and ".join(f"{n.name} is a {_described(n)} network" for n in networks)


def merge_networks(
    network_paths: Sequence[str | Path],
    output: str | Path | None,
    *,
    ratios: Sequence[float] | None = None,
    ratio_for: Sequence[str] = (),
    rank: int | None = None,
    conv_rank: int | None = None,
    save_dtype: torch.dtype | None = None,
    device: str = "auto",
    dry_run: bool = False,
    overwrite: bool = False,
    reporter: Reporter = QUIET,
    loaded: NetworkInputs | None = None,
    strip_metadata: bool = False,
) -> NetworkMergeResult:
    """Merge networks into one network file (exact concatenation, or SVD to `rank`).

    `loaded`: the caller's NetworkInputs (pickled networks it already loaded are not unpickled again)."""
    started = time.perf_counter()
    if rank is not None and rank < 1:
        raise UsageError(f"--rank {rank}: must be at least 1")
    if conv_rank is not None and conv_rank < 1:
        raise UsageError(f"--conv-rank {conv_rank}: must be at least 1")
    if conv_rank is not None and rank is None:
        raise UsageError("--conv-rank needs --rank (without a rank, networks are concatenated exactly)")
    where = resolve_device(device)
    load = loaded.load if loaded is not None else load_network_input
    networks = [load(path, hash_file=not (dry_run or strip_metadata)) for path in network_paths]
    arch = check_same_architecture(networks)
    networks = [named_for(network, arch) for network in networks]  # a tie the other inputs settle
    for network in networks:
        check_kohya_names(network.path, network, arch)
    rule_set = Ratios.build(len(networks), ratios, ratio_for)
    files = [n.name for n in networks]
    for network in networks:
        if network.stray:
            reporter.log(f"{network.name}: {len(network.stray)} key(s) outside any module not carried (first: {network.stray[0]})")
    for text in rule_set.zero_warnings(networks, "the merged network changes nothing"):  # modules at 0: zero factors
        reporter.warn(text)
    by_name = _contributions(networks, rule_set)
    for text in rule_set.unused_rules():
        reporter.warn(f"--ratio-for {text} matched no module")
    result = NetworkMergeResult(
        [{"path": str(n.path), "ratio": rule_set.per_input[i], "modules": len(n.modules)} for i, n in enumerate(networks)],
        strip_metadata=strip_metadata,
    )
    methods = {name: _method(name, parts, rank, files) for name, parts in by_name.items()}
    biased = sorted(name for name, parts in by_name.items()
                    if methods[name] == "svd" and any(p.info.bias_delta and p.ratio != 0 for p in parts))
    if biased:  # the re-factored module is a LoRA, which holds no bias
        reporter.warn(f"{len(biased)} module(s) also change their layer's bias (full diff_b, norm b_norm), which the "
                      f"rank-{rank} LoRA cannot hold: that part is dropped ({', '.join(biased[:3])}"
                      f"{', ...' if len(biased) > 3 else ''})")
    dtype = _output_dtype(networks, save_dtype)
    kernels = {name: table_kernel(name, arch) for name in by_name}  # the layer's kind, where the factors hide it
    for name, parts in by_name.items():
        result.modules.append(ModuleResult(
            name, [p.network for p in parts], methods[name],
            _planned_rank(parts, methods[name], rank, conv_rank, kernels[name]), conv=_is_kxk(parts, kernels[name]),
        ))
    result.output_bytes = _estimate_bytes(by_name, result.modules, dtype)
    if dry_run or output is None:
        result.seconds = time.perf_counter() - started
        return result
    tensors: dict[str, torch.Tensor] = {}
    saturated: list[str] = []
    for item in reporter.progress(result.modules, total=len(result.modules), desc="merge"):
        parts = by_name[item.name]
        if item.method == "concat":
            produced = _concat(parts, torch.float32)
        elif item.method == "copy":
            produced = _copy(parts[0])
        elif item.method == "sum":
            produced = _sum(parts)
        else:
            produced, item.kept = _svd(parts, item.rank, where, torch.float32, kernels[item.name])
        if item.rank is not None:
            item.alpha = float(produced[ALPHA]) if ALPHA in produced else float(item.rank)
        for suffix, tensor in produced.items():
            if suffix == ALPHA and _is_fp8(tensor.dtype):  # a copied fp8 module's alpha: float32, exactly
                tensor = tensor.float()
            elif suffix != ALPHA and tensor.is_floating_point():
                # a copied module keeps its own dtypes (fp8 aside) unless --save-dtype says otherwise
                own = parts[0].module.tensors[suffix].dtype if item.method == "copy" else dtype
                target = own if save_dtype is None and not _is_fp8(own) else dtype
                # cast once; values beyond the dtype's range saturate (fp16: never an inf), said below
                tensor, beyond = saturating_cast(tensor, target)
                if beyond:
                    saturated.append(f"{item.name}.{suffix}")
            tensors[f"{item.name}.{suffix}"] = tensor.contiguous()
    if saturated:
        reporter.warn(f"{len(saturated)} tensor(s) had values beyond the range of the output dtype and were saturated "
                      f"to its largest value, not written as inf (e.g. {saturated[0]})")
    metadata = merged_network_metadata(networks, rule_set, result.modules, rank, Path(output).stem, arch=arch)
    _, completed = complete_for_a1111(tensors, metadata=networks[0].metadata)
    if completed:
        reporter.log(completed)
    writer = write_safetensors(output, tensors, metadata, overwrite=overwrite, sshs=True, strip_metadata=strip_metadata)
    result.output = writer.path
    result.output_bytes = writer.total_size
    result.seconds = time.perf_counter() - started
    return result


def _estimate_bytes(by_name: dict[str, list[Contribution]], modules: Sequence[ModuleResult], dtype: torch.dtype) -> int:
    size = torch.empty((), dtype=dtype).element_size()
    total = 8 + _HEADER_BASE  # length prefix, metadata and JSON framing
    for item in modules:
        parts = by_name[item.name]
        if item.method == "copy":
            tensors = parts[0].module.tensors
            total += sum(t.numel() * (size if _is_fp8(t.dtype) else t.element_size()) for t in tensors.values())
            total += sum(_header_entry(item.name, suffix) for suffix in tensors)
            continue
        if item.method == "sum":
            _delta_shape(parts)  # inputs that disagree on the shape fail the dry run too
            tensors = {suffix: t for p in parts for suffix, t in p.module.tensors.items()}
            total += sum(t.numel() * size + _header_entry(item.name, suffix) for suffix, t in tensors.items())
            continue
        shape = _delta_shape(parts)
        total += (item.rank or 0) * (shape[0] + math.prod(shape[1:])) * size + 4
        total += sum(_header_entry(item.name, suffix) for suffix in (LORA_DOWN, LORA_UP, ALPHA))
    return total


# The safetensors header of a network is a large share of a small file (about a third of a rank-4 SD1 LoRA at
# 1/16 size): estimated per tensor as its name plus the JSON of dtype, shape and offsets.
_HEADER_BASE = 2048
_HEADER_PER_TENSOR = 64


def _header_entry(module: str, suffix: str) -> int:
    return len(module) + 1 + len(suffix) + _HEADER_PER_TENSOR
