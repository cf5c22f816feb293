"""Plan a merge into a checkpoint from headers alone: which output tensor each network module
touches (and which rows), in what order, and what the output file will hold.

The plan is what `--dry-run` prints and what the streaming engine (checkpoint.py) executes.
Tensors linked by one module (a fused module split over several diffusers tensors, a weight and
its bias, an fp8 weight and its scale) form a group that is computed together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lytools.algos import ModuleInfo
from lytools.arch import Placement, Resolver
from lytools.errors import MatchError, UnsupportedError
from lytools.io.dtypes import FP8_NAMES, TORCH_DTYPES, byte_size, st_name
from lytools.io.safetensors import TensorInfo
from lytools.merge.fp8 import Fp8Layout, detect_fp8
from lytools.merge.inputs import NetworkInput, same_family
from lytools.merge.ratios import Ratios


def bias_key_of(weight_key: str) -> str | None:
    """Return the bias key that belongs to a weight key (`x.weight` -> `x.bias`, open_clip in_proj)."""
    if weight_key.endswith(".weight"):
        return weight_key[: -len(".weight")] + ".bias"
    if weight_key.endswith("in_proj_weight"):
        return weight_key[: -len("in_proj_weight")] + "in_proj_bias"
    return None


@dataclass(frozen=True)
class Touch:
    """One network module applied to the checkpoint.

    pieces: where ΔW lands (resolver placements; several for a fused module split over tensors).
    bias_keys: the bias key of each piece when the module changes biases (None otherwise).
    pad_in: input channels of a module zero-padded into a wider conv (inpainting conv_in).
    """

    network: int
    module: str
    ratio: float
    pieces: tuple[Placement, ...]
    bias_keys: tuple[str | None, ...]
    pad_in: int | None = None

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.pieces] + [k for k in self.bias_keys if k]


@dataclass
class Group:
    """Checkpoint tensors computed together and the touches applied to them, in input order."""

    keys: list[str]
    touches: list[Touch]


STRIPPED_LINE = "metadata: stripped (--strip-metadata): only what loaders read, no training record, provenance or hashes"


def stripped_entry(strip: bool) -> dict:
    """The --json entry of a plan or result with --strip-metadata (none without it)."""
    return {"metadata": "stripped"} if strip else {}


@dataclass
class InputSummary:
    """What one network input contributes: matched modules, unmatched names, algorithms."""

    path: str
    ratio: float
    modules: int
    matched: int
    unmatched: list[str]
    algorithms: dict[str, int]
    padded: list[str] = field(default_factory=list)


@dataclass
class CheckpointPlan:
    """Everything the merge will do, known before any tensor is read."""

    base: Path
    arch: str
    layout: str
    groups: list[Group]
    group_of: dict[str, int]
    out_dtypes: dict[str, str]  # output tensor -> safetensors dtype name
    shapes: dict[str, tuple[int, ...]]
    created: list[str]  # bias tensors the base lacks and a module creates
    dropped: list[str]  # scale tensors / marker dropped when dequantizing a scaled fp8 file
    inputs: list[InputSummary]
    fp8: Fp8Layout
    ratios: Ratios
    dora_mode: str = "lycoris"  # how DoRA modules apply at ratios other than 1 (ALGORITHMS.md: DoRA)
    keep_ema: bool = False  # a pickled base's EMA copy (model_ema.*) is written too
    strip_metadata: bool = False  # --strip-metadata: only what loaders read is written (lytools.io.metadata.stripped)

    @property
    def touched(self) -> list[str]:
        return [key for group in self.groups for key in group.keys]

    @property
    def output_bytes(self) -> int:
        return int(sum(byte_size(self.out_dtypes[name], self.shapes[name]) for name in self.out_dtypes))

    @property
    def unmatched_count(self) -> int:
        return sum(len(summary.unmatched) for summary in self.inputs)

    def as_dict(self) -> dict:
        return {
            "base": str(self.base),
            "arch": self.arch,
            "layout": self.layout,
            "inputs": [
                {
                    "path": s.path, "ratio": s.ratio, "modules": s.modules, "matched": s.matched,
                    "unmatched": s.unmatched, "algorithms": s.algorithms, "zero_padded": s.padded,
                }
                for s in self.inputs
            ],
            "ratio_for": [[rule.pattern.pattern, rule.factor] for rule in self.ratios.rules],
            "dora_mode": self.dora_mode,
            "tensors": len(self.out_dtypes),
            "tensors_changed": len(self.touched),
            "tensors_created": self.created,
            "tensors_dropped": self.dropped,
            "fp8": self.fp8.kind,
            "output_bytes": self.output_bytes,
            **stripped_entry(self.strip_metadata),
        }

    def lines(self) -> list[str]:
        """Return the human-readable plan (for --dry-run)."""
        out = [f"base {self.base.name}: {self.arch} checkpoint ({self.layout} layout), fp8: {self.fp8.kind}"]
        for s in self.inputs:
            algos = ", ".join(f"{n} {a}" for a, n in sorted(s.algorithms.items()))
            out.append(f"  {Path(s.path).name} x {s.ratio:g}: {s.matched}/{s.modules} modules matched ({algos})")
            for name in s.unmatched:
                out.append(f"    unmatched: {name}")
            for name in s.padded:
                out.append(f"    zero-padded into a wider conv (inpainting): {name}")
        for rule in self.ratios.rules:
            out.append(f"  --ratio-for {rule.pattern.pattern}={rule.factor:g}")
        out.append(
            f"output: {len(self.out_dtypes)} tensors ({len(self.touched)} changed, {len(self.created)} created,"
            f" {len(self.dropped)} dropped), {self.output_bytes / 1e9:.2f} GB"
        )
        if self.strip_metadata:
            out.append(STRIPPED_LINE)
        return out


def _shape_fits(info: ModuleInfo, target: tuple[int, ...]) -> bool:
    if info.delta_shape is None:
        return True
    delta = info.delta_shape
    return math.prod(delta) == math.prod(target) and (not target or delta[0] == target[0])


def _pad_in(info: ModuleInfo, target: tuple[int, ...]) -> int | None:
    """Return the module's input channels when it is a narrower conv zero-padded into `target`."""
    delta = info.delta_shape
    if delta is None or len(target) != 4 or target[0] != delta[0]:
        return None
    kernel = target[2:]
    if len(delta) == 4 and tuple(delta[2:]) == tuple(kernel) and delta[1] < target[1]:
        return delta[1]
    if len(delta) == 2 and delta[1] % math.prod(kernel) == 0 and delta[1] // math.prod(kernel) < target[1]:
        return delta[1] // math.prod(kernel)
    return None


class _Union:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, key: str) -> str:
        self.parent.setdefault(key, key)
        while self.parent[key] != key:
            self.parent[key] = self.parent[self.parent[key]]
            key = self.parent[key]
        return key

    def join(self, keys: list[str]) -> None:
        roots = [self.find(k) for k in keys]
        for root in roots[1:]:
            self.parent[root] = roots[0]


def _arch_hint(networks: list[NetworkInput], checkpoint_arch: str, base: Path) -> str:
    """Return "<net> is a <arch> network, <base> a <arch> checkpoint: " when a known pair differs, else ""."""
    if checkpoint_arch == "unknown":
        return ""
    for network in networks:
        fits = [network.arch] if network.arch != "unknown" else list(network.tied)  # a tie: none of them the checkpoint's
        if fits and not any(same_family(arch, checkpoint_arch) for arch in fits):
            return f"{network.name} is a {' or '.join(fits)} network, {base.name} a {checkpoint_arch} checkpoint: "
    return ""


def plan_checkpoint_merge(
    base: Path,
    infos: dict[str, TensorInfo],
    metadata: dict[str, str],
    networks: list[NetworkInput],
    ratios: Ratios,
    *,
    save_dtype: torch.dtype | None = None,
    allow_unmatched: bool = False,
) -> CheckpointPlan:
    """Return the plan of merging `networks` into the checkpoint described by `infos`.

    Raises MatchError naming the unmatched modules (unless `allow_unmatched`, which does not cover a network
    detected as made for another architecture than the checkpoint) and the modules whose weight change does
    not fit their target tensor.
    """
    shapes = {name: tuple(info.shape) for name, info in infos.items()}
    resolver = Resolver(shapes, metadata)
    fp8 = detect_fp8(infos)
    touches: list[Touch] = []
    summaries: list[InputSummary] = []
    misfits: list[str] = []
    created: dict[str, tuple[int, ...]] = {}
    for index, network in enumerate(networks):
        summary = InputSummary(str(network.path), ratios.per_input[index], len(network.modules), 0, [], {})
        for name in sorted(network.modules):
            info = network.infos[name]
            summary.algorithms[info.algo] = summary.algorithms.get(info.algo, 0) + 1
            if not info.mergeable:
                raise UnsupportedError(
                    f"{network.name}: module {name}: {info.algo} cannot be merged offline (its change depends on "
                    "a recomputed SVD of the base weight and the timestep)"
                )
            resolved = resolver.resolve(name)
            if resolved is None:
                summary.unmatched.append(name)
                continue
            target = tuple(resolved.shape)
            pad = None
            if not _shape_fits(info, target):
                pad = _pad_in(info, target) if len(resolved.placements) == 1 else None
                if pad is None or not info.additive:
                    misfits.append(
                        f"{name} ({network.name}): change of shape {list(info.delta_shape or ())} does not fit "
                        f"{resolved.key} {list(target)}"
                    )
                    continue
                summary.padded.append(name)
            bias_keys: list[str | None] = []
            for piece in resolved.placements:
                bias = bias_key_of(piece.key) if info.bias_delta else None
                if bias is not None and bias not in shapes:
                    if piece.rows is not None or len(resolved.placements) > 1:
                        misfits.append(f"{name} ({network.name}): changes a bias that {piece.key} lacks inside a fused tensor")
                    created[bias] = (shapes[piece.key][0],)
                bias_keys.append(bias)
            summary.matched += 1
            kohya = resolved.module if resolved.module != name and resolved.in_table else None  # a q/k/v part kept apart
            touches.append(Touch(index, name, ratios.of(index, name, kohya), resolved.placements, tuple(bias_keys), pad))
        summaries.append(summary)
    hint = _arch_hint(networks, resolver.checkpoint.arch, base)
    if misfits:
        raise MatchError(f"{base}: {hint}{len(misfits)} module(s) do not fit the checkpoint: " + "; ".join(misfits[:5])
                         + (" ..." if len(misfits) > 5 else ""))
    unmatched = [(s.path, name) for s in summaries for name in s.unmatched]
    # a network made for another architecture is refused even with --allow-unmatched, which is for the few modules
    # a checkpoint may lack (a text encoder left out, a pruned block): merged "with the rest" it changes nothing
    if unmatched and (hint or not allow_unmatched):
        names = ", ".join(name for _, name in unmatched[:8]) + (" ..." if len(unmatched) > 8 else "")
        raise MatchError(
            f"{base if hint else Path(unmatched[0][0]).name}: {hint}{len(unmatched)} module(s) match no tensor of "
            f"{base.name}: {names}"
            + (" (--allow-unmatched merges the rest)" if not hint else "")
        )
    union = _Union()
    for touch in touches:
        keys = touch.keys
        keys += [fp8.scale_of[k] for k in keys if k in fp8.scale_of]
        union.join(keys)
    members: dict[str, list[str]] = {}
    for key in list(union.parent):
        members.setdefault(union.find(key), []).append(key)
    groups: list[Group] = []
    group_of: dict[str, int] = {}
    root_index: dict[str, int] = {}
    for touch in touches:  # input order, then module order: sequential application
        root = union.find(touch.pieces[0].key)
        if root not in root_index:
            root_index[root] = len(groups)
            groups.append(Group(sorted(members[root]), []))
            for key in members[root]:
                group_of[key] = root_index[root]
        groups[root_index[root]].touches.append(touch)
    out_dtypes: dict[str, str] = {}
    dropped: list[str] = []
    dequantize = save_dtype is not None and fp8.kind == "scaled"
    for name, info in infos.items():
        if dequantize and fp8.is_scale_or_marker(name):
            dropped.append(name)
            continue
        out_dtypes[name] = _out_dtype(info.dtype, save_dtype)
    for name, shape in created.items():
        weight = name[: -len(".bias")] + ".weight" if name.endswith(".bias") else None
        weight_dtype = out_dtypes.get(weight or "", "F32")
        out_dtypes[name] = "F32" if weight_dtype in FP8_NAMES else weight_dtype
        shapes[name] = shape
    return CheckpointPlan(
        base, resolver.checkpoint.arch, resolver.checkpoint.layout, groups, group_of, out_dtypes, shapes,
        sorted(created), dropped, summaries, fp8, ratios,
    )


def _out_dtype(dtype: str, save_dtype: torch.dtype | None) -> str:
    """Return the output dtype of an input tensor: --save-dtype for floating tensors, else unchanged."""
    if save_dtype is None:
        return dtype
    torch_dtype = TORCH_DTYPES.get(dtype)
    if torch_dtype is not None and torch_dtype.is_floating_point and dtype in ("F16", "BF16", "F32", "F64", *FP8_NAMES):
        return st_name(save_dtype)
    return dtype
