"""DoRA in convert: what the UIs make of it, and flattening it away (spec: FORMATS.md 7, quirk 7;
ALGORITHMS.md 7).

A1111/Forge and ComfyUI read `dora_scale` from kohya names but do not reproduce an output-axis DoRA
([out, 1]; LyCORIS' default and every peft `lora_magnitude_vector`): A1111 normalises per input
channel only, ComfyUI with the base weight's norm. So a kohya output that holds output-axis DoRA
gets one warning per file (`ui_warning`), pointing to --flatten-dora.

`--flatten-dora --base CHECKPOINT` (`flatten_dora`) replaces every DoRA module (either axis, on any
algorithm) by a plain LoRA/LoCon approximating W' − W at strength 1 on that base, through resize's
flattening (lytools.resize.flatten): the dense change truncated by SVD (its leading singular triplets,
svd_leading) to the rank the module's own weight change can have (LoRA r, LoHa r², LoKr the product of
its halves' ranks; at most the layer's full rank, where the exact SVD is taken and the result is exact),
with the relative Frobenius error of each module. Every other module passes through as it is. The base is opened once per process (header only; `open_base`), shared by the files of a
batch, and read one module's weight at a time.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import torch

from lytools.algos import ModuleInfo, NetworkModule, describe_module, describe_shapes
from lytools.algos.common import read_scalar
from lytools.convert.layout import ALPHA, DORA, DOWN, MID, UP
from lytools.errors import LytoolsError, MatchError

if TYPE_CHECKING:
    from lytools.convert.load import Network
    from lytools.convert.run import ConvertOptions, FileResult
    from lytools.resize.flatten import BaseWeights

BIAS = "diff_b"  # a bias difference: additive, untouched by DoRA (kept beside the flattened factors)
_BASES: dict[tuple[Path, int, int], BaseWeights] = {}  # --base checkpoints opened in this process (forked workers inherit them)


def output_axis_modules(net: Network) -> list[str]:
    """Return the modules whose DoRA magnitude is per output channel."""
    found = []
    for name, module in net.modules.items():
        if DORA in module.tensors and describe_shapes(name, module.shapes()).dora == "out":
            found.append(name)
    return found


def ui_warning(net: Network) -> str | None:
    """Return the warning for a kohya output holding output-axis DoRA, or None."""
    if not any(DORA in module.tensors for module in net.modules.values()):
        return None  # the common case: no module to describe
    modules = output_axis_modules(net)
    if not modules:
        return None
    return (f"{len(modules)} modules carry output-axis DoRA (dora_scale [out, 1]), which A1111/Forge and ComfyUI "
            f"do not apply exactly (A1111 normalises per input channel, ComfyUI by the base weight's norm); "
            f"--flatten-dora --base CHECKPOINT bakes them into plain LoRA modules that every loader applies alike")


def prepare(net: Network, options: ConvertOptions, result: FileResult) -> Network:
    """Return the network to write: DoRA flattened with --flatten-dora, else as it is (with the UI
    warning for a kohya target)."""
    if options.flatten_dora:
        if options.base is None:
            raise LytoolsError("--flatten-dora needs --base CHECKPOINT (the model the DoRA was trained on)")
        return flatten_dora(net, open_base(options.base), result, options.save_dtype)
    if options.target == "kohya":
        warning = ui_warning(net)
        if warning:
            result.warnings.append(warning)
    return net


# -- the base ----------------------------------------------------------------------------------------------
def open_base(path: Path) -> BaseWeights:
    """Return the --base checkpoint, opened (header only) once per process (again when the file changed)."""
    import os

    try:
        info = os.stat(path)
        key = (Path(path).resolve(), info.st_mtime_ns, info.st_size)
    except OSError:
        key = (Path(path).resolve(), 0, 0)  # opening it names the problem
    base = _BASES.get(key)
    if base is None:
        from lytools.resize.flatten import BaseWeights

        base = _BASES[key] = BaseWeights(Path(path))
    return base


def check_base(path: Path, outputs: list[Path]) -> None:
    """Open --base now (a bad one fails the run before any file) and refuse an output that would replace it."""
    from lytools.io import same_file

    for output in outputs:
        if same_file(output, path):
            raise LytoolsError(f"{output}: the output would replace --base ({path}); choose another name")
    open_base(path)


def _check_arch(net: Network, base: BaseWeights) -> None:
    """Refuse a base of another architecture than the network's, naming both."""
    fits = set(net.tied) or ({net.arch} if net.arch != "unknown" else set())
    if base.arch == "unknown" or not fits or base.arch in fits:
        return  # unknown on either side: each module's weight is looked up by name and shape instead
    raise MatchError(f"{net.path}: network for {' or '.join(sorted(fits))}, but --base {base.path.name} is a checkpoint "
                     f"for {base.arch}; DoRA is flattened on the model it was trained for")


# -- flattening --------------------------------------------------------------------------------------------
def change_rank(module: NetworkModule, info: ModuleInfo) -> int:
    """Return the rank the module's own weight change can have (before DoRA): LoRA r, LoHa r², LoKr the
    product of its halves' ranks; other algorithms their stored rank, else the layer's full rank."""
    tensors = module.tensors
    if info.algo == "loha" and info.rank:
        return info.rank * info.rank
    if info.algo == "lokr":
        w1 = tensors.get("lokr_w1")
        w2 = tensors.get("lokr_w2")
        first = min(w1.shape[0], w1.shape[1:].numel()) if w1 is not None else tensors["lokr_w1_a"].shape[1]
        second = min(w2.shape[0], w2.shape[1:].numel()) if w2 is not None else tensors["lokr_w2_a"].shape[1]
        return int(first) * int(second)
    if info.rank:
        return info.rank
    return 1 << 30  # flatten_module keeps at most the spectrum's length: the full rank


def _alpha(module: NetworkModule) -> float:
    rank = float(module[DOWN].shape[0])
    stored = module.tensors.get(ALPHA)
    value = read_scalar(module.name, ALPHA, stored) if stored is not None else 0.0
    return value or rank  # missing or zero: alpha = rank


def _is_kxk(module: NetworkModule) -> bool:
    down = module[DOWN]
    return MID in module.tensors or (down.dim() > 2 and any(k != 1 for k in down.shape[2:]))


def flattened_metadata(metadata: Mapping[str, str], modules: Mapping[str, NetworkModule]) -> dict[str, str]:
    """Return the input metadata describing the network after flattening: no DoRA switches in
    ss_network_args (no LyCORIS algorithm either once every module is a LoRA/LoCon), and the ranks
    and alphas of the LoRA/LoCon modules written, by merge's rule (`rank_metadata`: network_dim /
    network_alpha of the linear modules, conv_dim / conv_alpha of the kxk convs, "Dynamic" where
    they differ; a flattened LoHa is rank r², a LoKr the product of its halves')."""
    from lytools.merge.combine import ModuleResult, rank_metadata
    from lytools.resize.flatten import DORA_ARGS, as_plain_lora, without_args

    meta = dict(metadata)
    infos = [describe_shapes(name, module.shapes()) for name, module in modules.items()]
    every_lora = all(info.algo == "lora" and not info.dora for info in infos if info.algo != "norm")
    if every_lora and ("ss_network_module" in meta or "ss_network_args" in meta):
        as_plain_lora(meta, DORA_ARGS)
    else:
        without_args(meta, DORA_ARGS)
    loras = [ModuleResult(name, [0], "copy", int(module[DOWN].shape[0]), conv=_is_kxk(module), alpha=_alpha(module))
             for name, module in modules.items() if DOWN in module.tensors and UP in module.tensors]
    meta.update(rank_metadata(loras, meta.get("ss_network_args")))
    return meta


def flatten_dora(net: Network, base: BaseWeights, result: FileResult, save_dtype: torch.dtype | None = None) -> Network:
    """Return the network with every DoRA module flattened into a LoRA/LoCon on `base` (see the module
    docstring), its factors in `save_dtype` (None: the module's); the figures go to result.notes / .details,
    the strength caveat to result.warnings."""
    from lytools.resize.flatten import flatten_at_rank, relative_error

    _check_arch(net, base)
    infos = {name: describe_module(module) for name, module in net.modules.items() if DORA in module.tensors}
    if not infos:
        result.notes.append("--flatten-dora: no DoRA modules here; every module written as it was")
        return net
    device = torch.device("cpu")
    modules = dict(net.modules)
    errors: list[tuple[float, str]] = []
    ranks = []
    for name, info in infos.items():
        module = net.modules[name]
        bias = module.tensors.get(BIAS)
        if bias is not None:  # DoRA never changes the bias: keep the difference beside the factors
            module = NetworkModule(name, {s: t for s, t in module.tensors.items() if s != BIAS})
            info = describe_module(module)
        try:
            flat = flatten_at_rank(module, info, base, change_rank(module, info), device, save_dtype)
        except LytoolsError as exc:  # a weight of --base that does not fit is named as the base's
            where = "" if base.path.name in str(exc) else f"flattening on --base {base.path.name}: "
            raise type(exc)(f"{net.path}: {where}{exc}") from None
        tensors = dict(flat.tensors)
        if bias is not None:
            tensors[BIAS] = bias
        modules[name] = NetworkModule(name, tensors)
        error = relative_error(flat.report.fro_kept) or 0.0
        errors.append((error, name))
        ranks.append(flat.report.rank_out)
        result.details.append(f"{name}: {info.algo}+dora ({info.dora}-axis) -> LoRA rank {flat.report.rank_out}, "
                              f"relative Frobenius error {error:.4f}")
    worst = max(errors)
    mean = sum(e for e, _ in errors) / len(errors)
    span = str(min(ranks)) if min(ranks) == max(ranks) else f"{min(ranks)}..{max(ranks)}"
    result.report["flatten_dora"] = {"modules": len(infos), "ranks": sorted(set(ranks)), "base": str(base.path),
                                     "mean_relative_error": mean, "max_relative_error": worst[0], "worst_module": worst[1]}
    result.notes.append(
        f"--flatten-dora: {len(infos)} DoRA modules flattened into LoRA (rank {span}) on {base.path.name}; relative "
        f"Frobenius error of W' - W mean {mean:.4f}, max {worst[0]:.4f} ({worst[1]})")
    result.warnings.append(
        f"{len(infos)} flattened DoRA modules hold W' - W on {base.path.name} at strength 1: exact there only; at other "
        f"strengths the LoRA scales linearly where DoRA does not, and on other base models it differs")
    return dataclasses.replace(net, modules=modules, metadata=flattened_metadata(net.metadata, modules))

