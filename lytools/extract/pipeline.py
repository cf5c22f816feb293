"""`lytools extract`: BASE and TUNED in, a LoRA/LoCon approximating TUNED − BASE out, streaming.

    plan (headers only) -> for each paired module: read both weights (a loader thread keeps the
    next modules ready, pinned for the GPU), D = tuned − base in float32 on the device, factor,
    append the factors to a spill file -> write the safetensors from the spill in file order
    (atomic) -> optional verify (reload, rebuild each module, compare with D again).

Memory: the pair of tensors being factored, a few prefetched ones (bounded in bytes) and the
small factors; the output waits on disk, not in memory.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Iterator

import torch

from lytools.algos import delta as module_delta
from lytools.algos import group_keys, load_module
from lytools.arch.a1111 import complete_for_a1111
from lytools.arch.network import ALPHA
from lytools.device import resolve_device
from lytools.errors import LytoolsError, MatchError
from lytools.extract.factor import SATURATED_NOTE, Extracted, FactorOptions, ModuleRecord, extract_module
from lytools.extract.plan import ExtractPlan, PairedModule, plan_extraction
from lytools.extract.ranks import RankRule
from lytools.extract.report import Summary, summarize, write_report
from lytools.extract.spill import SpillStore
from lytools.extract.svd import SvdFailure, energy
from lytools.io import PickledFile, SafetensorsFile, open_file, removed_on_failure, same_file, write_safetensors
from lytools.io.folders import lone_shard
from lytools.io.dtypes import st_name
from lytools.io.hashes import DataHashThread
from lytools.io.metadata import add_provenance, kohya_network_metadata, network_modelspec, source_entry
from lytools.io.writer import check_output_path, check_report_path
from lytools.info import detection_metadata
from lytools.ui import QUIET, Reporter

PREFETCH_BYTES = 256 << 20  # float32 bytes of weights the loader may hold ahead of the SVDs
VERIFY_TOLERANCE = 1e-3  # |reloaded error − reported error| allowed, relative to ‖D‖


class VerifyError(LytoolsError):
    """The written file does not reproduce what was extracted."""


@dataclass(frozen=True)
class ExtractOptions:
    linear: RankRule = RankRule("fixed", 32)
    conv: RankRule = RankRule("fixed", 32)
    factor: FactorOptions = FactorOptions()
    min_diff: float = 0.0
    unet: bool = True
    text_encoder: bool = True
    arch: str = "auto"
    device: str = "auto"
    verify: bool = False
    overwrite: bool = False
    report: Path | None = None
    command: str | None = None  # recorded as lytools.command (default: sys.argv)
    strip_metadata: bool = False  # --strip-metadata: lytools.io.metadata.stripped, inputs not hashed


@dataclass
class ExtractResult:
    output: Path
    plan: ExtractPlan
    records: list[ModuleRecord]
    summary: Summary
    seconds: float
    verified: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    uncovered: list[str] = field(default_factory=list)  # other tensors that differ (see uncovered_changes)


# -- reading ----------------------------------------------------------------------------------------
def _bias_key(key: str) -> str | None:
    if key.endswith("in_proj_weight"):
        return key[: -len("weight")] + "bias"
    if key.endswith(".weight"):
        return key[: -len("weight")] + "bias"
    return None


def read_module(source: Any, placements, shape: tuple[int, ...], *, bias: bool = False,
                stored_dtype: bool = False) -> torch.Tensor | None:
    """Return the module's weight (or bias with bias=True) as float32 on the CPU, rows assembled;
    with stored_dtype=True in the dtype it is stored in (a private copy all the same)."""
    pieces = []
    for placement in placements:
        key = placement.key
        if bias:
            key = _bias_key(key)
            if key is None or key not in source.keys_set:
                return None
        if placement.rows is not None:
            piece = source.get_rows(key, placement.rows[0], placement.rows[1])
        else:
            piece = source.get(key)
        pieces.append(piece.float() if piece.dtype != torch.float32 and not stored_dtype else piece.clone())
    tensor = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
    if bias:
        return tensor.reshape(-1)
    return tensor.reshape(shape)


class _Source:
    """An open input file plus a set of its keys (for bias look-ups)."""

    def __init__(self, path: Path):
        from lytools.merge.fp8 import detect_fp8

        self.file = open_file(path)
        self.keys_set = set(self.file.keys())
        self.path = path
        # scaled fp8 (ComfyUI): the weight is fp8 x its scale, never the fp8 value alone (FORMATS.md 1.2)
        self.fp8 = detect_fp8({info.name: info for info in self.file.infos()})

    def get(self, key: str) -> torch.Tensor:
        from lytools.merge.fp8 import read_weight

        return read_weight(self.file, self.fp8, key)

    def get_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        from lytools.merge.fp8 import read_weight

        return read_weight(self.file, self.fp8, key, (start, stop))

    def close(self) -> None:
        self.file.close()


_WIDTHS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "F8_E4M3": 8, "F8_E5M2": 8}


def rounding_of(module: PairedModule, base: _Source, tuned: _Source) -> tuple[tuple[torch.dtype, bool], ...]:
    """The roundings a difference may be nothing but, as (dtype, whether BASE is the rounded file), when BASE
    and TUNED store this module in different float dtypes: an fp32 base and an fp16 fine-tune (the narrower
    file holds the other's values rounded), or fp16 and bf16 (either may hold the other's values rounded: a
    bf16 fine-tune of an fp16 base, or the reverse). A difference that is only such a rounding is no change.
    Plain fp8 counts as the narrowest; F64 (read as float32, a second rounding) and scaled fp8 (its values are
    not a plain cast of the other file's) are left out."""
    if base.fp8.kind == "scaled" or tuned.fp8.kind == "scaled":
        return ()
    try:
        infos = (base.file.info(module.base[0].key), tuned.file.info(module.tuned[0].key))
    except (KeyError, LytoolsError):
        return ()
    widths = [_WIDTHS.get(info.dtype) for info in infos]
    if None in widths or 64 in widths or infos[0].dtype == infos[1].dtype:
        return ()
    if widths[0] == widths[1]:  # F16 and BF16: neither holds the other exactly
        return (infos[1].torch_dtype, False), (infos[0].torch_dtype, True)
    base_is_narrow = widths[0] < widths[1]
    return ((infos[0 if base_is_narrow else 1].torch_dtype, base_is_narrow),)


def _rounding_only(base_w: torch.Tensor, tuned_w: torch.Tensor,
                   roundings: tuple[tuple[torch.dtype, bool], ...]) -> torch.dtype | None:
    """The dtype of the first rounding (see rounding_of) by which one file holds exactly the other's values."""
    for dtype, base_is_rounded in roundings:
        source, rounded = (tuned_w, base_w) if base_is_rounded else (base_w, tuned_w)
        if torch.equal(source.to(dtype).float(), rounded):
            return dtype
    return None


@dataclass
class _Loaded:
    module: PairedModule
    base: torch.Tensor | None
    tuned: torch.Tensor | None
    base_bias: torch.Tensor | None = None
    tuned_bias: torch.Tensor | None = None
    error: BaseException | None = None


def _prefetch(modules: list[PairedModule], base: _Source, tuned: _Source, pin: bool, want_bias: Callable[[PairedModule], bool]) -> Iterator[_Loaded]:
    """Yield each module's two weights, read by a background thread a bounded number of bytes ahead.

    pin=True (a CUDA device): the weights stay in their stored dtype, in pinned memory, and are
    widened to float32 on the device, so the reader thread only copies bytes and a 16-bit
    checkpoint pins and sends half as many (no change in time was measurable on an H100)."""
    slots = queue.Queue()
    budget = threading.Semaphore(max(1, PREFETCH_BYTES // (16 << 20)))
    stop = threading.Event()

    def units(module: PairedModule) -> int:
        return max(1, min(PREFETCH_BYTES // (16 << 20), (2 * module.nbytes32) // (16 << 20)))

    def work() -> None:
        for module in modules:
            needed = units(module)
            for _ in range(needed):
                while not budget.acquire(timeout=0.1):
                    if stop.is_set():
                        return
            if stop.is_set():
                return
            try:
                base_w = read_module(base, module.base, module.shape, stored_dtype=pin)
                tuned_w = read_module(tuned, module.tuned, module.shape, stored_dtype=pin)
                base_b = tuned_b = None
                if want_bias(module):
                    base_b = read_module(base, module.base, module.shape, bias=True)
                    tuned_b = read_module(tuned, module.tuned, module.shape, bias=True)
                if pin:
                    base_w, tuned_w = base_w.pin_memory(), tuned_w.pin_memory()
                slots.put((_Loaded(module, base_w, tuned_w, base_b, tuned_b), needed))
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
                slots.put((_Loaded(module, None, None, error=exc), needed))
                return

    thread = threading.Thread(target=work, name="lytools-extract-reader", daemon=True)
    thread.start()
    try:
        for _ in modules:
            loaded, needed = slots.get()
            try:
                if loaded.error is not None:
                    raise loaded.error
                yield loaded
            finally:
                loaded.base = loaded.tuned = None
                for _ in range(needed):
                    budget.release()
    finally:
        stop.set()
        thread.join(timeout=5)


# -- metadata -----------------------------------------------------------------------------------------
def _start_hashes(sources: list[_Source]) -> dict[Path, DataHashThread]:
    """Start hashing every safetensors input's data section (its AutoV3) in the background, one
    thread per input: the two files are read and hashed side by side (hashlib releases the GIL)."""
    threads = {source.path: DataHashThread(source.path, source.file.header.data_start)
               for source in sources if isinstance(source.file, SafetensorsFile)}
    for thread in threads.values():
        thread.start()
    return threads


def build_metadata(out: Path, plan: ExtractPlan, records: list[ModuleRecord], options: ExtractOptions,
                   sources: list[dict[str, str]]) -> dict[str, str]:
    """Return ss_* and modelspec.* as sd-scripts' extractor writes them, plus lytools provenance."""
    arch = None if plan.generic else plan.arch
    stored = [r for r in records if r.stored != "skipped"]
    lycoris = any(r.stored in ("full", "lora+mid") for r in stored) or options.factor.sparse_bias
    fixed = options.linear.mode == "fixed"
    dim: str = str(int(options.linear.value)) if fixed else "Dynamic"
    alpha: str = str(float(int(options.linear.value))) if fixed else "Dynamic"
    if options.linear.mode == "full":
        dim = alpha = "Dynamic"
    args: dict[str, str] = {}
    has_conv = any(r.kind in ("conv3x3", "conv") for r in stored)
    if has_conv:
        if options.conv.mode == "fixed":
            args = {"conv_dim": str(int(options.conv.value)), "conv_alpha": str(float(int(options.conv.value)))}
        else:
            args = {"conv_dim": "Dynamic", "conv_alpha": "Dynamic"}
    if lycoris:
        # LyCORIS names a network of `diff` modules only "full" (its algo for whole differences)
        every_full = bool(stored) and all(r.stored == "full" for r in stored)
        args = {"algo": "full"} if every_full else {"algo": "locon", **args}  # whole differences have no conv dim
        if options.factor.tucker:
            args["use_tucker"] = "True"
    module = "lycoris.kohya" if lycoris else "networks.lora"
    metadata = kohya_network_metadata(arch, dim, alpha, args, module=module)
    metadata.update(network_modelspec(arch, out.stem))
    _variant_metadata(metadata, arch, plan.base_arch.variant)
    _prediction_metadata(metadata, arch, prediction_of(plan))
    comment = f"extracted by lytools: linear {options.linear.describe()}, conv {options.conv.describe()}"
    metadata["ss_training_comment"] = comment
    return add_provenance(metadata, options.command, sources)


# sd-scripts' names for the variants the architecture defaults do not cover (FORMATS.md, metadata keys)
_SD3_TYPES = {"3.5-large": "5-large", "3.5-medium": "5-medium"}


def _variant_metadata(metadata: dict[str, str], arch: str | None, variant: str | None) -> None:
    """Name SD3.5 (large/medium) and Flux schnell bases in ss_base_model_version / modelspec.architecture:
    the defaults say SD3 medium and Flux dev."""
    if arch == "sd3" and variant in _SD3_TYPES:
        metadata["ss_base_model_version"] = _SD3_TYPES[variant]
        metadata["modelspec.architecture"] = f"stable-diffusion-3-{_SD3_TYPES[variant]}/lora"
    elif arch == "flux" and variant == "schnell":
        metadata["modelspec.architecture"] = "flux-1-schnell/lora"


def prediction_of(plan: ExtractPlan) -> str:
    """epsilon | v | unknown: what BASE and TUNED say (metadata or marker keys; FORMATS.md 2.2), unknown
    when neither says or they disagree. The weights cannot tell (SD2 512 and 768-v have the same shapes)."""
    said = {plan.base_arch.prediction, plan.tuned_arch.prediction} - {"unknown"}
    return said.pop() if len(said) == 1 else "unknown"


def _prediction_metadata(metadata: dict[str, str], arch: str | None, prediction: str) -> None:
    """Label a v-prediction network as sd-scripts does with --v_parameterization (ss_base_model_version
    `sd_v1_v` / `sd_v2_v`, stable-diffusion-v2-768-v, modelspec.prediction_type v, SD2 at 768x768);
    an SD2 network that is not v is stable-diffusion-v2-512 at 512x512, like sd-scripts' default."""
    if arch not in ("sd1", "sd2", "sdxl"):
        return
    if prediction == "v":
        metadata["modelspec.prediction_type"] = "v"
        if arch in ("sd1", "sd2"):
            metadata["ss_base_model_version"] += "_v"
        if arch == "sd2":
            metadata["modelspec.architecture"] = "stable-diffusion-v2-768-v/lora"
            metadata["modelspec.resolution"] = "768x768"
    elif arch == "sd2":
        metadata["modelspec.resolution"] = "512x512"


def _warn_labels(plan: ExtractPlan, reporter: Reporter) -> None:
    """Say what the metadata of the output cannot know for sure, and variants that differ."""
    base, tuned = plan.base_arch, plan.tuned_arch
    if plan.arch == "sd2" and prediction_of(plan) == "unknown":
        said = {base.prediction, tuned.prediction} - {"unknown"}
        why = ("BASE and TUNED disagree about the prediction type" if len(said) > 1 else
               "neither BASE nor TUNED names its prediction type in its metadata (SD2 512 is epsilon, 768-v is v)")
        reporter.warn(f"{why}: the network is labelled stable-diffusion-v2-512 / epsilon, as sd-scripts labels "
                      "it without --v_parameterization")
    if not plan.generic and base.variant != tuned.variant:
        reporter.warn(f"BASE is {base.arch} {base.variant or 'plain'} and TUNED {tuned.arch} {tuned.variant or 'plain'}: "
                      "layers a LoRA does not cover that differ between the variants (such as conv_in's input "
                      "channels for inpainting) are not in the network")


# -- the run -------------------------------------------------------------------------------------------
def _input_files(source: _Source) -> list[Path]:
    """Every file an input reads: the file itself, the shards of an index, a folder's weights."""
    files = [source.path]
    files += list(getattr(source.file, "shard_paths", []) or [])
    weights = getattr(source.file, "weights", None)
    if isinstance(weights, dict):
        files += list(weights.values())
    return files


def _refuse_input_as_output(out: Path, sources: dict[str, _Source]) -> None:
    """OUT naming an input (with --overwrite) would replace a checkpoint with the network."""
    if not out.exists():
        return
    for which, source in sources.items():
        for path in _input_files(source):
            if Path(path).is_file() and same_file(out, path):  # a folder input: its files are listed too
                # exit 1, as merge, resize and convert refuse an output naming an input
                raise LytoolsError(f"{out}: the output would replace {which} ({source.path.name}); choose another name")


def _component_of_key(key: str, components: dict[str, str]) -> str | None:
    """unet | te for a checkpoint key, by the longest component prefix; None for the VAE, schedule
    buffers and keys outside every component."""
    found = max(((c, p) for c, p in components.items() if p and key.startswith(p)), key=lambda cp: len(cp[1]), default=None)
    if found is None:
        found = ("unet", "") if components.get("unet") == "" else None
    if found is None or found[0] in ("vae", "schedule"):
        return None
    return "unet" if found[0] == "unet" else "te"


def uncovered_changes(plan: ExtractPlan, records: list[ModuleRecord], base: _Source, tuned: _Source,
                      options: ExtractOptions) -> list[str]:
    """Keys of the selected components that both files hold with one shape, that no extracted module
    carries, and whose values differ beyond the rounding of the lower precision: biases of low-rank
    modules, norms, embeddings, conv_in/conv_out... A LoRA cannot hold them; saying so explains a
    network weaker than its fine-tune. Compared one tensor at a time, in the stored dtypes."""
    wanted = {name for name, on in (("unet", options.unet), ("te", options.text_encoder)) if on}
    whole = {r.name for r in records if r.stored == "full"}
    carried: set[str] = set()
    for module in plan.modules:
        for placement in (*module.base, *module.tuned):
            carried.add(placement.key)
            if module.name in whole:  # stored whole with its bias (diff_b)
                carried.add(_bias_key(placement.key) or placement.key)
    scales = {key for source in (base, tuned) if source.fp8.kind != "none"
              for key in source.keys_set if source.fp8.is_scale_or_marker(key)}
    found = []
    for key in sorted(base.keys_set & tuned.keys_set - carried):
        # generic naming (an unknown architecture) puts every module under lora_unet_: so is every key
        component = "unet" if plan.generic else _component_of_key(key, plan.base_arch.components)
        if key in scales or component not in wanted:
            continue
        base_info, tuned_info = base.file.info(key), tuned.file.info(key)
        if tuple(base_info.shape) != tuple(tuned_info.shape) or not {base_info.dtype, tuned_info.dtype} <= set(_WIDTHS) | {"F8_E4M3", "F8_E5M2"}:
            continue
        old, new = base.get(key), tuned.get(key)
        narrow, wide = sorted((old, new), key=lambda t: t.element_size())
        if narrow.element_size() < wide.element_size():  # equal when the narrower holds the wider rounded
            same = torch.equal(wide.to(narrow.dtype), narrow)
        elif old.dtype != new.dtype:  # fp16 and bf16: equal when either holds the other rounded
            same = torch.equal(old.float().to(new.dtype), new) or torch.equal(new.float().to(old.dtype), old)
        else:
            same = torch.equal(old, new)
        if not same:
            found.append(key)
    return found


def _rule_for(module: PairedModule, options: ExtractOptions) -> RankRule:
    return options.conv if module.kxk else options.linear


def extract(base: str | Path, tuned: str | Path, out: str | Path, options: ExtractOptions = ExtractOptions(),
            reporter: Reporter = QUIET) -> ExtractResult:
    """Extract TUNED − BASE into a LoRA/LoCon at `out`; see the module docstring."""
    started = time.perf_counter()
    base, tuned = Path(base), Path(tuned)
    out = check_output_path(out, options.overwrite)
    if options.report is not None:
        check_report_path(options.report, out, options.overwrite, (base, tuned))
    device = resolve_device(options.device)
    for path in (base, tuned):  # a lone shard would give a network of part of the model
        problem = lone_shard(path)
        if problem:
            raise LytoolsError(problem)
    base_source, tuned_source = _Source(base), _Source(tuned)
    try:
        _refuse_input_as_output(out, {"BASE": base_source, "TUNED": tuned_source})
    except BaseException:
        base_source.close()
        tuned_source.close()
        raise
    for source in (base_source, tuned_source):  # FORMATS.md 6: a legacy pickle is read whole, say so
        if isinstance(source.file, PickledFile) and source.file.legacy:
            reporter.warn(f"{source.path.name}: {source.file.notes()[0]}")
    hashers = {} if options.strip_metadata else _start_hashes([base_source, tuned_source])
    try:
        plan = plan_extraction(
            {info.name: tuple(info.shape) for info in base_source.file.infos()},
            {info.name: tuple(info.shape) for info in tuned_source.file.infos()},
            base_path=base, tuned_path=tuned,
            base_metadata=detection_metadata(base_source.file), tuned_metadata=detection_metadata(tuned_source.file),
            arch=options.arch, unet=options.unet, text_encoder=options.text_encoder,
        )
        records: list[ModuleRecord] = list(plan.skipped)
        todo: list[PairedModule] = []
        for module in plan.modules:
            rule = _rule_for(module, options)
            if rule.skips:
                records.append(ModuleRecord(module.name, module.component, module.kind, module.shape, "skipped",
                                            reason="conv dim 0" if module.kxk else "linear dim 0"))
            else:
                todo.append(module)
        reporter.detail(f"{base.name}: {plan.base_arch.arch} ({plan.base_arch.layout}); {tuned.name}: "
                        f"{plan.tuned_arch.arch} ({plan.tuned_arch.layout}); naming: {plan.arch}")
        _warn_labels(plan, reporter)
        rules = [f"linear {options.linear.describe()}"]
        kxk = any(module.kxk for module in todo)  # none from text encoders alone (--no-unet) or transformers
        if kxk:
            rules.append(f"conv {options.conv.describe()}")
        reporter.log(f"extracting {len(todo)} modules on {device.type} ({', '.join(rules)})")
        if options.factor.tucker and not kxk:
            reporter.warn(f"--tucker changes nothing: none of the {len(todo)} modules to extract is a kxk conv")
        # bias deltas go with modules stored whole (`diff_b`); they are a few KiB, so read them always
        want_bias = lambda module: _rule_for(module, options).mode == "full" or options.factor.full_fallback  # noqa: E731
        with SpillStore(out.parent) as spill:
            loaded_iter = _prefetch(todo, base_source, tuned_source, device.type == "cuda", want_bias)
            for loaded in reporter.progress(loaded_iter, total=len(todo), desc="extract"):
                rounding = rounding_of(loaded.module, base_source, tuned_source)
                record, extracted = _extract_one(loaded, options, device, rounding)
                records.append(record)
                if extracted is not None:
                    for suffix, tensor in extracted.tensors.items():
                        spill.append(f"{loaded.module.name}.{suffix}", tensor)
                    if record.stored == "full":
                        reporter.detail(f"{record.name}: {record.reason}")
                for note in record.notes:
                    reporter.detail(f"{record.name}: {note}")
            saturated = [record.name for record in records if SATURATED_NOTE in record.notes]
            if saturated:
                reporter.warn(f"{len(saturated)} module(s) had values beyond the range of --save-dtype "
                              f"{st_name(options.factor.save_dtype)} and were saturated to its largest value, "
                              f"not written as inf (e.g. {saturated[0]})")
            uncovered = uncovered_changes(plan, records, base_source, tuned_source, options)
            tensors = spill.tensors()
            if not tensors:
                rounded = sum(1 for r in records if (r.reason or "").startswith("differs only by rounding"))
                raise MatchError(f"{base.name} and {tuned.name}: no module differs (nothing to write)"
                                 + (f"; {rounded} differ only by the rounding of one file's lower precision" if rounded else ""))
            for thread in hashers.values():
                thread.join()
            sources = [source_entry(path, hashers[path].digest if path in hashers else None) for path in (base, tuned)]
            metadata = build_metadata(out, plan, records, options, sources)
            completed, note = complete_for_a1111(tensors, plan.arch)
            if note:
                reporter.log(note)
            write_safetensors(out, tensors, metadata, overwrite=options.overwrite, sshs=True,
                              strip_metadata=options.strip_metadata)
            del tensors
        records.sort(key=lambda r: r.name)
        verified = None
        if options.verify:
            with removed_on_failure(out):
                verified = verify_output(out, records, plan, base_source, tuned_source, device, reporter, completed)
    finally:
        base_source.close()
        tuned_source.close()
    summary = summarize(records)
    if options.report is not None:  # a report that cannot be written fails the run: its output goes too
        with removed_on_failure(out):
            write_report(options.report, records, summary)
    return ExtractResult(out, plan, records, summary, time.perf_counter() - started, verified, metadata, uncovered)


NONFINITE = "NaN or infinite values"


def _nonfinite_reason(base: torch.Tensor, difference: torch.Tensor) -> str:
    """Why a module's difference (TUNED − BASE, TUNED's own copy overwritten) is not finite: which input holds
    NaN/inf weights (a broken file). Where BASE is finite, a non-finite difference comes from TUNED (or,
    with values near the float32 limit, from an overflow of the subtraction)."""
    finite_base = torch.isfinite(base.to(difference.device))
    broken = [which for which, bad in (("BASE", not bool(finite_base.all())),
                                       ("TUNED", bool((~torch.isfinite(difference) & finite_base).any()))) if bad]
    return f"{NONFINITE} in the weights of {' and '.join(broken)}"


def _extract_one(loaded: _Loaded, options: ExtractOptions, device: torch.device,
                 rounding: tuple[tuple[torch.dtype, bool], ...] = ()) -> tuple[ModuleRecord, Extracted | None]:
    module = loaded.module
    rule = _rule_for(module, options)
    base_w = loaded.base.to(device, non_blocking=True).float()
    tuned_w = loaded.tuned.to(device, non_blocking=True).float()
    rounded = _rounding_only(base_w, tuned_w, rounding) if rounding else None
    if rounded is not None:
        # an fp32 base and the same weights saved in fp16: extracting the rounding noise helps no one
        return ModuleRecord(module.name, module.component, module.kind, module.shape, "skipped",
                            reason=f"differs only by rounding to {st_name(rounded)}"), None
    difference = tuned_w.sub_(base_w)  # private copies (read_module's, or .float()'s): in place is safe
    del base_w
    largest = float(difference.abs().max()) if difference.numel() else 0.0
    if not math.isfinite(largest):
        return ModuleRecord(module.name, module.component, module.kind, module.shape, "skipped",
                            reason=_nonfinite_reason(loaded.base, difference)), None
    if largest <= options.min_diff:
        reason = "identical in both files" if largest == 0 else f"max |difference| {largest:.3g} <= min-diff {options.min_diff:g}"
        return ModuleRecord(module.name, module.component, module.kind, module.shape, "skipped", reason=reason), None
    bias_delta = None
    if loaded.base_bias is not None and loaded.tuned_bias is not None:
        bias_delta = (loaded.tuned_bias - loaded.base_bias).to(device)
    try:
        extracted = extract_module(module.name, difference, rule, options.factor,
                                   component=module.component, kind=module.kind, bias_delta=bias_delta)
    except SvdFailure as exc:
        return ModuleRecord(module.name, module.component, module.kind, module.shape, "skipped",
                            reason=f"decomposition failed: {exc}"), None
    return extracted.record, extracted


# -- verification ----------------------------------------------------------------------------------------
def verify_output(out: Path, records: list[ModuleRecord], plan: ExtractPlan, base: _Source, tuned: _Source,
                  device: torch.device, reporter: Reporter = QUIET, completed: Collection[str] = ()) -> int:
    """Reload `out`, rebuild every stored module and compare it with TUNED − BASE; return the count.

    Each module's relative error must match the report (the factors as written) within
    VERIFY_TOLERANCE; any missing, extra or mismatching module raises VerifyError. The zero
    modules added for A1111 (`completed`, lytools.arch.a1111) must be there and all zeros.
    """
    stored = {r.name: r for r in records if r.stored != "skipped"}
    modules = {m.name: m for m in plan.modules}
    with open_file(out) as written:
        groups = group_keys(written.keys())
        for name in completed:
            keys = groups.modules.get(name, {})
            if not keys or any(written.get(key).any() for suffix, key in keys.items() if suffix != ALPHA):
                raise VerifyError(f"{out}: module {name}, added as zeros for A1111, is missing or not zero")
        extra = sorted(set(groups.modules) - set(stored) - set(completed))
        missing = sorted(set(stored) - set(groups.modules))
        if extra or missing or groups.stray:
            what = (extra or missing or groups.stray)[0]
            raise VerifyError(f"{out}: module set differs from the extraction (e.g. {what})")
        for name in reporter.progress(sorted(stored), total=len(stored), desc="verify"):
            record, module = stored[name], modules[name]
            network_module = load_module(written, name, groups.modules[name])
            rebuilt = module_delta(network_module, module.shape, device=device).float()
            difference = read_module(tuned, module.tuned, module.shape).to(device) - read_module(base, module.base, module.shape).to(device)
            total = energy(difference)
            error = math.sqrt(energy(difference - rebuilt) / total) if total > 0 else 0.0
            expected = record.rel_error_with_sparse if record.rel_error_with_sparse is not None else record.rel_error
            if expected is None or abs(error - expected) > VERIFY_TOLERANCE:
                raise VerifyError(f"{out}: module {name} rebuilds with relative error {error:.4g}, extraction reported {expected}")
    return len(stored)


__all__ = ["ExtractOptions", "ExtractResult", "VerifyError", "extract", "read_module", "verify_output"]
