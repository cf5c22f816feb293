"""The resize command: read a network, resize every module, write it with updated metadata
(spec: CLI.md resize; ALGORITHMS.md 16; FORMATS.md 5.3)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

import torch

from lytools.algos import ModuleInfo, NetworkModule, check_finite, describe_module, describe_shapes, group_keys
from lytools.device import resolve_device
from lytools.errors import FileFormatError, LytoolsError, NetworkError, UnsupportedError, UsageError
from lytools.arch.a1111 import complete_for_a1111
from lytools.convert.load import check_spelled_once
from lytools.io import check_output_path, file_hashes, open_file, removed_on_failure, same_file, write_safetensors
from lytools.io.writer import check_report_path
from lytools.io.dtypes import saturating_cast
from lytools.io.metadata import add_provenance, carried_into_tensors, modelspec_date, source_entry
from lytools.merge.combine import conv_network_args
from lytools.resize.flatten import BaseWeights, as_plain_lora
from lytools.resize.modules import (
    COPIED, FLATTENED, KEPT, RESIZED, TRUNCATED, Context, ModuleReport, ModuleResult, RankRule, is_plain_lora,
    resize_module,
)
from lytools.resize.ranks import METHODS
from lytools.resize.report import write_report
from lytools.resize.verify import VerifyResult, verify_output
from lytools.ui import QUIET, Reporter


@dataclass(frozen=True)
class ResizeOptions:
    """Everything the command line can ask of resize."""

    rank: int | None = None
    conv_rank: int | None = None
    method: str = "fixed"
    method_param: float | None = None
    max_rank: int | None = None
    truncate: bool = False
    base: Path | None = None
    report: Path | None = None
    device: str = "auto"
    save_dtype: torch.dtype | None = None
    verify: bool = False
    overwrite: bool = False
    strip_metadata: bool = False  # only what loaders read (lytools.io.metadata.stripped); the input is not hashed

    def rule(self) -> RankRule:
        """Return the per-kind rank (fixed, truncate) or cap (dynamic), after checking the options."""
        check_options(self)
        if self.method == "fixed":
            conv = self.conv_rank if self.conv_rank is not None else self.rank
            return RankRule("fixed", None, self.rank, conv, self.truncate)
        caps = [c for c in (self.rank, self.max_rank) if c is not None]
        cap = min(caps) if caps else None
        conv_caps = [c for c in (self.conv_rank if self.conv_rank is not None else self.rank, self.max_rank) if c is not None]
        return RankRule(self.method, self.method_param, cap, min(conv_caps) if conv_caps else None)


def check_options(options: ResizeOptions) -> None:
    """Raise LytoolsError for option combinations that cannot mean anything."""
    if options.method not in METHODS:
        raise UsageError(f"--method {options.method}: expected one of {', '.join(METHODS)}")
    for flag, value in (("--rank", options.rank), ("--conv-rank", options.conv_rank), ("--max-rank", options.max_rank)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} {value}: must be at least 1")
    if options.method == "fixed":
        if options.rank is None:
            raise UsageError("--rank N is required (or a dynamic --method with --method-param)")
        if options.method_param is not None:
            raise UsageError("--method-param applies to the dynamic methods (sv_ratio, sv_fro, sv_cumulative)")
        if options.max_rank is not None:
            raise UsageError("--max-rank caps the dynamic methods; with --method fixed use --rank")
    else:
        if options.truncate:
            raise UsageError("--truncate keeps a fixed number of ranks; it does not combine with --method " + options.method)
        if options.method_param is None:
            raise UsageError(f"--method {options.method} needs --method-param F")
        param = options.method_param
        if not math.isfinite(param) or param <= 0:
            raise UsageError(f"--method-param {param}: must be a positive number")
        if options.method in ("sv_fro", "sv_cumulative") and param > 1:
            raise UsageError(f"--method-param {param}: {options.method} takes a share between 0 and 1")
        if options.method == "sv_ratio" and param < 1:  # sigma_1 / param would exceed every singular value
            raise UsageError(f"--method-param {param}: sv_ratio is the largest kept singular value over the smallest, "
                             f"at least 1 (e.g. 8)")
    if options.truncate and options.base is not None:  # truncation refuses every module that would need the base
        raise UsageError("--base serves to flatten non-LoRA modules; --truncate keeps leading LoRA ranks and never reads it")


@dataclass
class ResizeSummary:
    """What a resize run did: per-module reports, warnings, timings and the paths written."""

    output: Path
    modules: list[ModuleReport] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    stray: list[str] = field(default_factory=list)
    seconds: float = 0.0
    verify: VerifyResult | None = None

    def counts(self) -> Counter:
        return Counter(report.action for report in self.modules)

    def line(self) -> str:
        """Return the one-line summary printed to stderr."""
        counts = self.counts()
        parts = [f"{counts[a]} {a}" for a in (RESIZED, FLATTENED, TRUNCATED, COPIED, KEPT) if counts[a]]
        ranks = [r.rank_out for r in self.modules if r.rank_out is not None and r.action != KEPT]
        fro = [r.fro_kept for r in self.modules if r.fro_kept is not None]
        text = f"resize: {len(self.modules)} modules ({', '.join(parts) or 'none'})"
        if ranks:
            text += f", ranks {min(ranks)}..{max(ranks)}"
        if fro:
            text += f", Frobenius share kept mean {sum(fro) / len(fro):.4f} min {min(fro):.4f}"
        return text + f", {self.seconds:.2f} s -> {self.output}"


# -- reading -------------------------------------------------------------------------------------------
@dataclass
class Network:
    """A network's modules (canonical kohya/LyCORIS names), stray tensors and metadata."""

    modules: dict[str, NetworkModule]
    stray: dict[str, torch.Tensor]
    metadata: dict[str, str]
    notes: list[str] = field(default_factory=list)
    # modules assembled from several stored modules (diffusers/peft Flux/SD3 q, k, v(, mlp)): how many
    parts: dict[str, int] = field(default_factory=dict)


def _from_convert(path: Path) -> Network | None:
    """Read a network in another key layout (diffusers, peft, ComfyUI) through lytools.convert."""
    try:
        from lytools.convert import load_network  # type: ignore[attr-defined]
    except ImportError:
        return None
    net = load_network(path, hash_data=False)  # resize hashes the input itself (file_hashes), when it records it
    from lytools.merge.inputs import check_kohya_names, kohya_named

    net = kohya_named(path, net)  # a tie's diffusers names in the kohya names its architectures agree on
    check_kohya_names(path, net)  # they differ (CLIP-L: lora_te_ / lora_te1_): refused
    notes = [f"{path.name}: read as a {net.layout} {net.arch} network; written with kohya names"] + list(net.notes)
    from lytools.arch.network import split_network_key

    parts = {}
    for name, keys in net.sources.items():
        stored = {split[0] for split in map(split_network_key, keys) if split is not None}
        if len(stored) > 1:
            parts[name] = len(stored)
    return Network(dict(net.modules), dict(net.stray), dict(net.metadata), notes, parts)


@contextlib.contextmanager
def open_network(path: Path) -> Iterator[Network]:
    """Yield every module of the network at `path`; raise when it holds none.

    kohya/LyCORIS files are read in place: the tensors view the file's mapping, which stays open
    until the block ends (so a copied module is written straight from the input, never held twice).
    Other layouts (diffusers, peft, ComfyUI) are read through lytools.convert into kohya names.
    """
    with open_file(path) as reader:
        groups = group_keys(reader.keys())
        metadata = dict(reader.metadata or {})
        layered = [k for k in groups.stray if ".lora_A." in k or ".lora_B." in k or ".lora.down." in k]
        if not groups.modules or layered:
            converted = _from_convert(path)
            if converted is not None and converted.modules:
                yield converted
                return
            if layered and groups.modules:
                raise FileFormatError(f"{path}: mixes kohya and diffusers/peft key layouts ({layered[0]})")
            raise FileFormatError(f"{path}: no LoRA/LyCORIS network modules found (is it a network file?)")
        modules = {}
        for name, suffixes in groups.modules.items():
            modules[name] = NetworkModule(name, {suffix: reader.get(key) for suffix, key in suffixes.items()})
        check_spelled_once(path, {name: module.tensors for name, module in modules.items()}, metadata)
        stray = {key: reader.get(key) for key in groups.stray}
        yield Network(modules, stray, metadata)


def read_network(path: Path) -> Network:
    """Return the network at `path` with tensors that own their memory (see open_network)."""
    with open_network(path) as network:
        modules = {name: NetworkModule(name, {s: t.clone() for s, t in m.tensors.items()}) for name, m in network.modules.items()}
        return Network(modules, {k: t.clone() for k, t in network.stray.items()}, network.metadata, network.notes,
                       network.parts)


def describe_all(path: Path, network: Network) -> dict[str, ModuleInfo]:
    """Return every module's description; the first malformed module fails the run, naming the file."""
    infos = {}
    for name, module in network.modules.items():
        try:
            describe_shapes(name, module.shapes())  # shapes first: a clear message before any value is read
            infos[name] = describe_module(module)
        except LytoolsError as exc:
            raise type(exc)(f"{path}: {exc}") from None
    try:
        check_finite(network.modules)
    except LytoolsError as exc:
        raise type(exc)(f"{path}: {exc}") from None
    return infos


def check_inputs(path: Path, infos: Mapping[str, ModuleInfo], options: ResizeOptions) -> None:
    """Raise before any work for modules this run cannot handle (T-LoRA; base-dependent ones without --base)."""
    for info in infos.values():
        if not info.mergeable:
            raise UnsupportedError(
                f"{path}: module {info.name}: {info.algo} cannot be resized offline (its change depends on a "
                "recomputed SVD of the base weight and on the timestep)"
            )
    if options.truncate or options.base is not None:
        return
    needing = [info for info in infos.values()
               if info.algo != "norm" and not is_plain_lora(info) and (info.needs_weight or not info.additive)]
    if needing:
        kinds = sorted({info.algo + ("+dora" if info.dora else "") for info in needing})
        raise NetworkError(
            f"{path}: {len(needing)} modules ({', '.join(kinds)}; e.g. {needing[0].name}) change the weight in a way "
            "that depends on the base weight; pass the base model with --base CHECKPOINT"
        )


# -- base weights ----------------------------------------------------------------------------------------
def kernel_lookup(base: BaseWeights | None, arch: str | None):
    """Return the Context.full_shape callback: the --base checkpoint's own shape first, then the name tables."""

    def full_shape(name: str, flat: tuple[int, ...]) -> tuple[int, ...]:
        shape = base.shape_of(name) if base is not None else None
        if shape is not None and shape[0] == flat[0] and math.prod(shape) == math.prod(flat):
            return shape
        return table_shape(name, flat, arch)

    return full_shape


TABLE_ARCHS = ("sd1", "sdxl", "sd2", "flux")


def table_shape(name: str, flat: tuple[int, ...], arch: str | None = None) -> tuple[int, ...]:
    """Return a conv's (out, in, kh, kw) for a module whose factors store it flattened, from the name tables.

    The network's own architecture is asked first: a diffusers-path name such as
    lora_unet_down_blocks_1_attentions_0_proj_in is a 1x1 conv in SD1 but a Linear in SDXL.
    """
    from lytools.arch import alias_table

    order = ((arch,) if arch in TABLE_ARCHS else ()) + tuple(a for a in TABLE_ARCHS if a != arch)
    for candidate in order:
        target = alias_table(candidate).get(name)
        if target is None:
            continue
        kernel = tuple(target.shape[2:])
        size = math.prod(kernel) if kernel else 1
        if kernel and flat[1] % size == 0:
            return (flat[0], flat[1] // size, *kernel)
        return flat
    return flat


def network_arch(network: Network) -> str | None:
    """Return the architecture the network's module names and shapes fit (None when unknown)."""
    from lytools.arch import detect_network

    shapes = {f"{name}.{suffix}": tuple(t.shape) for name, m in network.modules.items() for suffix, t in m.tensors.items()}
    arch = detect_network(shapes, network.metadata).arch
    return None if arch == "unknown" else arch


# -- metadata ---------------------------------------------------------------------------------------------
def _format_number(value: float) -> str:
    return str(float(value))


def dylora_unit(metadata: Mapping[str, str]) -> int | None:
    """Return the DyLoRA block size from ss_network_args (kohya's `unit`; LyCORIS algo=dylora calls it
    `block_size`), or None."""
    try:
        args = json.loads(metadata.get("ss_network_args") or "{}")
        if not isinstance(args, dict):
            return None
        value = args.get("unit")
        if value is None and args.get("algo") == "dylora":
            value = args.get("block_size")
        unit = int(value) if value is not None else None
    except (ValueError, TypeError):
        return None
    return unit if unit and unit > 0 else None


def _is_conv(report: ModuleReport) -> bool:
    return report.kind in ("conv", "tucker")


def _common_alpha(reports: list[ModuleReport], rank: int) -> str | None:
    """Return the one alpha of the modules written at `rank` (a missing or zero alpha is the rank), or None."""
    alphas = {round(r.alpha_out if r.alpha_out else float(rank), 6) for r in reports if r.rank_out == rank}
    return _format_number(alphas.pop()) if len(alphas) == 1 else None


def refactored_args(meta: dict[str, str], reports: list[ModuleReport]) -> None:
    """Update ss_network_args where the SVD re-factoring changed what they say: LyCORIS algo=dylora is a
    plain LoCon now, and use_tucker/use_cp are false once no module keeps its Tucker core."""
    try:
        args = json.loads(meta.get("ss_network_args") or "null")
    except ValueError:
        return
    if not isinstance(args, dict) or not any(r.action == RESIZED for r in reports):
        return
    before = dict(args)
    if args.get("algo") == "dylora":
        args["algo"] = "locon"
    tucker = [r for r in reports if r.kind == "tucker"]
    if tucker and all(r.action == RESIZED for r in tucker):
        for key in ("use_tucker", "use_cp"):
            if key in args:
                args[key] = "False" if isinstance(args[key], str) else False
    if args != before:
        meta["ss_network_args"] = json.dumps(args)


def resized_metadata(
    metadata: Mapping[str, str], options: ResizeOptions, rule: RankRule, reports: list[ModuleReport], source: Path,
    autov3: str | None,
) -> dict[str, str]:
    """Return the output metadata: sd-scripts' resize keys, the algorithm if it changed, provenance.

    ss_network_dim and conv_dim are the largest ranks actually written (a module already below the
    asked rank is copied, so asking for more than a file holds does not raise them), and the alphas
    those modules carry.
    """
    meta = carried_into_tensors(metadata)  # written with kohya factors and alpha tensors
    rank_reports = [r for r in reports if r.rank_in is not None and r.action != KEPT]
    linear = [r for r in rank_reports if not _is_conv(r)] or rank_reports
    old_dim = max((r.rank_in for r in linear), default=None)
    written = [r for r in rank_reports if r.rank_out is not None]
    linear_out = [r for r in written if not _is_conv(r)] or written
    conv_out = [r for r in written if _is_conv(r)]
    new_dim = max((r.rank_out for r in linear_out), default=rule.rank)
    new_conv_dim = max((r.rank_out for r in conv_out), default=None)
    conv_desc = "" if new_conv_dim is None or new_conv_dim == new_dim else f" (conv: {new_conv_dim})"
    comment = meta.get("ss_training_comment", "")
    if options.truncate:
        prefix = f"dimension is truncated from {old_dim} to {new_dim}{conv_desc}; "
    elif options.method == "fixed":
        prefix = f"dimension is resized from {old_dim} to {new_dim}{conv_desc}; "
    else:
        prefix = f"Dynamic resize with {options.method}: {options.method_param} from {old_dim}; "
    meta["ss_training_comment"] = prefix + comment
    if options.method == "fixed":
        meta["ss_network_dim"] = str(new_dim)
        meta["ss_network_alpha"] = _common_alpha(linear_out, new_dim) or "Dynamic"
    else:
        meta["ss_network_dim"] = "Dynamic"
        meta["ss_network_alpha"] = "Dynamic"
    flattened = [r for r in reports if r.action == FLATTENED]
    if flattened:
        as_plain_lora(meta)
    elif not options.truncate:
        if meta.get("ss_network_module") == "networks.dylora":
            # re-factored by SVD: the leading ranks are no longer nested
            meta["ss_network_module"] = "networks.lora"
        refactored_args(meta, reports)
    # conv_dim/conv_alpha whenever kxk convs are written, as merge of networks says them (conv_network_args);
    # the values follow ss_network_dim's rule: the largest rank written (fixed), "Dynamic" for dynamic methods
    if new_conv_dim is None:
        conv_dim = conv_alpha = None
    elif options.method == "fixed":
        conv_dim, conv_alpha = str(new_conv_dim), _common_alpha(conv_out, new_conv_dim)  # None: they differ
    else:
        conv_dim = conv_alpha = "Dynamic"
    args = conv_network_args(meta.get("ss_network_args"), conv_dim, conv_alpha, bool(written))
    if args is not None:
        meta["ss_network_args"] = args
    if "modelspec.date" in meta:
        meta["modelspec.date"] = modelspec_date()
    sources = [source_entry(source, autov3)]
    return add_provenance(meta, sources=sources)


# -- the run ----------------------------------------------------------------------------------------------
def _module_lines(report: ModuleReport) -> str:
    shares = ""
    if report.fro_kept is not None:
        shares = f"  fro {report.fro_kept:.4f}  sum {report.sum_kept:.4f}"
    alpha = "" if report.alpha_out is None else f"  alpha {report.alpha_out:g}"
    return f"{report.name}: {report.algo} {report.kind} {report.action} {report.rank_in}->{report.rank_out}{alpha}{shares}" + (
        f"  ({report.note})" if report.note else "")


def resize_file(
    source: str | os.PathLike, output: str | os.PathLike, options: ResizeOptions, reporter: Reporter = QUIET
) -> ResizeSummary:
    """Resize the network at `source` into `output` and return what was done (see CLI.md resize)."""
    started = time.perf_counter()
    source, output = Path(source), Path(output)
    rule = options.rule()
    from lytools.convert.load import peft_config_path  # a peft adapter's config is part of IN

    for role, given in (("IN", source), ("IN's adapter config", peft_config_path(source)), ("--base", options.base)):
        if given is not None and same_file(output, given):
            # even with --overwrite: merge, extract and convert refuse the same (the input is lost)
            raise LytoolsError(f"{output}: the output would replace {role} ({given}); choose another name")
    output = check_output_path(output, options.overwrite)
    if options.report is not None:
        check_report_path(options.report, output, options.overwrite, (source, options.base, peft_config_path(source)))
    device = resolve_device(options.device)
    with open_network(source) as network:
        infos = describe_all(source, network)
        check_inputs(source, infos, options)
        if options.truncate and network.parts:
            name, count = next(iter(sorted(network.parts.items())))
            raise UnsupportedError(
                f"{source}: module {name} is assembled from {count} q/k/v(/mlp) modules of this file: --truncate would "
                "keep the leading ranks of the first part only; resize without --truncate")
        for note in network.notes:  # after the checks, so that a refused input stays a one-line error
            reporter.log(note)
        early: list[str] = []  # warnings about the inputs, said at once
        unit = dylora_unit(network.metadata)
        if options.truncate and unit is None and network.metadata.get("ss_network_module", "").endswith("dylora"):
            reporter.detail("DyLoRA file without a unit in ss_network_args: truncating without a unit check")
        if options.truncate and unit:
            off = sorted({r for r in (rule.rank, rule.conv_rank) if r is not None and r % unit})
            if off:
                early.append(f"{source.name}: rank {', '.join(map(str, off))} is not a multiple of the DyLoRA unit {unit} "
                             "(the file was trained in blocks of that size)")
                reporter.warn(early[-1])
        flattened = sorted({info.algo + ("+dora" if info.dora else "") for info in infos.values()
                            if info.algo != "norm" and not is_plain_lora(info)})
        if flattened and not options.truncate:
            reporter.log(f"{source.name}: {', '.join(flattened)} modules become LoRA/LoCon modules (the algorithm changes)")
        base = BaseWeights(options.base) if options.base is not None else None  # checked even when not needed
        if base is not None and not flattened:
            early.append(f"--base {options.base.name}: not used, every module of {source.name} is a LoRA/LoCon "
                         "(the base weights serve only to flatten other algorithms)")
            reporter.warn(early[-1])
        baked = sorted({info.algo + ("+dora" if info.dora else "") for info in infos.values() if info.algo != "norm"
                        and not is_plain_lora(info) and (info.needs_weight or not info.additive)})
        try:
            arch = network_arch(network) if flattened else None
            ctx = Context(rule, device, options.save_dtype, base_weight=base,
                          full_shape=kernel_lookup(base, arch))
            summary = ResizeSummary(output)
            tensors: dict[str, torch.Tensor] = {}
            for name in reporter.progress(list(network.modules), total=len(network.modules), desc="resize"):
                try:
                    result: ModuleResult = resize_module(network.modules[name], infos[name], ctx, unit)
                except LytoolsError as exc:
                    raise type(exc)(f"{source}: {exc}") from None
                for suffix, tensor in result.tensors.items():
                    tensors[f"{name}.{suffix}"] = tensor
                summary.modules.append(result.report)
                summary.warnings.extend(result.warnings)
                reporter.detail(_module_lines(result.report))
            for key, tensor in network.stray.items():
                keep = options.save_dtype is None or not tensor.is_floating_point()
                tensors[key] = tensor if keep else saturating_cast(tensor, options.save_dtype)[0]
            if baked and not options.truncate:  # said once the modules are done, so an error stays the only line
                summary.warnings.insert(0, f"{source.name}: {', '.join(baked)} modules are baked from W' - W on the --base "
                                        "weights at strength 1: exact there, but the LoRA scales linearly with strength "
                                        "(they do not) and differs on other base models")
            fused = [r for r in summary.modules if network.parts.get(r.name, 1) > 1 and r.rank_in and r.rank_out
                     and r.action in (RESIZED, FLATTENED) and r.rank_out < r.rank_in]
            if fused:
                first = fused[0]
                summary.warnings.append(
                    f"{len(fused)} modules were assembled from the q/k/v(/mlp) parts of {source.name} into one kohya module "
                    f"and the rank applies to that module, not to each part (e.g. {first.name}: "
                    f"{network.parts[first.name]} parts, rank {first.rank_in} -> {first.rank_out}); to keep each part's "
                    "rank, ask for it times the number of parts")
            if ctx.saturated:
                modules = sorted(set(ctx.saturated))
                summary.warnings.append(f"{len(modules)} module(s) had values beyond the range of the output dtype and "
                                        f"were saturated to its largest value, not written as inf (e.g. {modules[0]})")
            summary.stray = sorted(network.stray)
            if summary.stray:
                reporter.log(f"{len(summary.stray)} tensors that belong to no module copied unchanged")
            for warning in summary.warnings:
                reporter.warn(warning)
            summary.warnings[:0] = early  # said when found (before any error); in the summary and --json too
            hashed = source.suffix.lower() == ".safetensors" and not options.strip_metadata
            autov3 = file_hashes(source).autov3 if hashed else None
            metadata = resized_metadata(network.metadata, options, rule, summary.modules, source, autov3)
            _, completed = complete_for_a1111(tensors, metadata=network.metadata)
            if completed:
                reporter.log(completed)
            write_safetensors(output, tensors, metadata, overwrite=options.overwrite, sshs=True,
                              strip_metadata=options.strip_metadata)
            if options.verify:
                with removed_on_failure(output):
                    summary.verify = verify_output(output, network.modules, infos, summary.modules, ctx)
                    if not summary.verify.ok:
                        raise LytoolsError(f"{output}: verification failed: {summary.verify.message}; output removed")
                reporter.log(summary.verify.message)
        finally:
            if base is not None:
                base.close()
        summary.seconds = time.perf_counter() - started
        if options.report is not None:  # a report that cannot be written fails the run: its output goes too
            with removed_on_failure(output):
                write_report(options.report, summary.modules)
    return summary
