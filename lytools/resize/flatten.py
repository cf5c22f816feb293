"""Flattening a module into a LoRA/LoCon on a base model's weights, shared by resize (every module
that is not a plain LoRA) and convert --flatten-dora (DoRA modules only), and what such an output's
metadata says (spec: ALGORITHMS.md 7, 16; FORMATS.md 5.1).

    base = BaseWeights(checkpoint)          # header only; base(name) reads one module's weight
    result = flatten_at_rank(module, info, base, rank, device)   # ModuleResult (lora_up/down/alpha)
    as_plain_lora(meta)                     # ss_network_module / ss_network_args of an all-LoRA file
    without_args(meta, DORA_ARGS)           # ss_network_args without the DoRA switches

The modules themselves are flattened by lytools.resize.modules.flatten_module: W' − W at strength 1
(non-additive algorithms) or ΔW (additive ones), by an exact SVD, alpha = rank.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable, Mapping

import torch

from lytools.algos import ModuleInfo, NetworkModule
from lytools.errors import MatchError
from lytools.io import open_file
from lytools.resize.modules import Context, ModuleResult, RankRule, flatten_module

# ss_network_args of LyCORIS that mean nothing once every module is a LoRA/LoCon
LYCORIS_ARGS = ("algo", "use_tucker", "use_cp", "dora_wd", "factor", "decompose_both", "full_matrix")
# LyCORIS' DoRA switches (lycoris.kohya reads dora_wd and wd_on_output)
DORA_ARGS = ("dora_wd", "wd_on_output")


class BaseWeights:
    """Looks up a module's base weight in a checkpoint (--base), float32, rows of fused tensors joined.

    Opening reads the header only; each call reads the one tensor (or rows) a module needs."""

    def __init__(self, path: Path, metadata: Mapping[str, str] | None = None):
        from lytools.arch import Resolver

        from lytools.merge.fp8 import detect_fp8
        from lytools.merge.inputs import looks_like_network

        self.path = path
        self.reader = open_file(path)
        infos = {name: self.reader.info(name) for name in self.reader.keys()}
        if looks_like_network(infos):  # it said "no weight for module ..." as if a checkpoint lacked it
            self.reader.close()
            raise MatchError(f"{path}: a network (LoRA/LyCORIS), not a checkpoint: --base takes the base model")
        self.resolver = Resolver(infos, metadata or self.reader.metadata)
        self.fp8 = detect_fp8(infos)  # scaled fp8: the weight is fp8 x its scale

    @property
    def arch(self) -> str:
        """The checkpoint's architecture (sd1, sd2, sdxl, sd3, flux, ... or unknown)."""
        return self.resolver.checkpoint.arch

    def __call__(self, name: str) -> torch.Tensor:
        from lytools.merge.fp8 import read_weight

        resolved = self.resolver.resolve(name)
        if resolved is None:
            raise MatchError(f"{self.path}: no weight for module {name} in this checkpoint")
        pieces = []
        for placement in resolved.placements:
            tensor = read_weight(self.reader, self.fp8, placement.key, placement.rows)
            pieces.append(tensor.to(torch.float32))
        weight = pieces[0] if len(pieces) == 1 else torch.cat(pieces, 0)
        return weight.reshape(resolved.shape) if weight.numel() == math.prod(resolved.shape) else weight

    def shape_of(self, name: str) -> tuple[int, ...] | None:
        """Return the module's weight shape in this checkpoint (header only), or None when it has none."""
        resolved = self.resolver.resolve(name)
        return None if resolved is None else tuple(resolved.shape)

    def close(self) -> None:
        self.reader.close()


def flatten_at_rank(module: NetworkModule, info: ModuleInfo, base: BaseWeights, rank: int, device: torch.device,
                    save_dtype: torch.dtype | None = None) -> ModuleResult:
    """Return the module flattened into a LoRA/LoCon of `rank` (at most the spectrum's length) on `base`;
    the report's fro_kept is the share of ‖W' − W‖_F the factors keep. Only the leading singular triplets
    are computed (svd_leading: ~40x faster than the full SVD on a 1280 x 23040 conv, the same error to 1e-4),
    the exact SVD where the rank comes within LEADING_OVERSAMPLE of the full one."""
    rule = RankRule("fixed", None, rank, rank)
    return flatten_module(module, info, Context(rule, device, save_dtype, base_weight=base, leading_only=True))


def relative_error(fro_kept: float | None) -> float | None:
    """Return ‖ΔW − ΔW_r‖_F / ‖ΔW‖_F from the share of the Frobenius norm an SVD truncation keeps."""
    return None if fro_kept is None else math.sqrt(max(0.0, 1.0 - fro_kept * fro_kept))


def _network_args(meta: Mapping[str, str]) -> dict | None:
    try:
        args = json.loads(meta.get("ss_network_args") or "{}")
    except ValueError:
        return None
    return args if isinstance(args, dict) else None


def without_args(meta: dict[str, str], keys: Iterable[str]) -> None:
    """Drop `keys` from ss_network_args (JSON), when it holds any of them."""
    args = _network_args(meta)
    if args is None or not any(key in args for key in keys):
        return
    for key in keys:
        args.pop(key, None)
    meta["ss_network_args"] = json.dumps(args)


def as_plain_lora(meta: dict[str, str], extra: Iterable[str] = ()) -> None:
    """Say in the metadata that every module is a LoRA/LoCon now: ss_network_module networks.lora and
    ss_network_args without LyCORIS' algorithm switches (and `extra` keys)."""
    meta["ss_network_module"] = "networks.lora"
    try:
        args = json.loads(meta.get("ss_network_args") or "{}")
    except ValueError:
        args = {}  # unreadable: written as an empty set of arguments
    if isinstance(args, dict):
        for key in (*LYCORIS_ARGS, *extra):
            args.pop(key, None)
        meta["ss_network_args"] = json.dumps(args)
