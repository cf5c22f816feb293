"""Merge networks into a checkpoint, streaming: every output tensor is read, changed by all the
networks that touch it (in input order), cast once, written and freed (STYLE.md pipeline).

Memory stays near the largest group of tensors in flight (one layer, or the q/k/v pieces of a
fused module), whatever the checkpoint's size. The base's AutoV3 hash for the provenance record
is computed by a background thread reading the base sequentially (which also warms the page
cache for the main loop) and patched into the header before the output is renamed into place.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from lytools.algos import apply_module
from lytools.algos.dora import check_mode
from lytools.arch.network import LORA_DOWN, LORA_UP
from lytools.device import resolve_device
from lytools.errors import LytoolsError, MatchError
from lytools.io import SafetensorsFile, SafetensorsWriter, ShardedFile, open_file, plan_entry
from lytools.io.dtypes import FP8_NAMES, TORCH_DTYPES, saturating_cast
from lytools.io.folders import DiffusersFolder, FolderWriter
from lytools.io.hashes import DataHashThread
from lytools.io.metadata import add_provenance, carried, modelspec_date, source_entry, stripped
from lytools.io.pickled import PickledFile
from lytools.merge.fp8 import dequantize, requantize, surviving_share
from lytools.merge.inputs import NetworkInput, NetworkInputs
from lytools.merge.plan import CheckpointPlan, Group, Touch, plan_checkpoint_merge
from lytools.merge.ratios import Ratios
from lytools.ui import QUIET, Reporter

HASH_PLACEHOLDER = "0" * 12
LOSS_REPORT_BELOW = 0.5  # report fp8 tensors keeping less than half of their intended change


@dataclass
class Fp8Loss:
    """An fp8 tensor whose change did not survive requantization (fully or mostly)."""

    tensor: str
    modules: list[str]
    kept: float  # share of the intended change left (0 = lost entirely)

    def as_dict(self) -> dict:
        return {"tensor": self.tensor, "modules": self.modules, "kept": round(self.kept, 4)}


@dataclass
class CheckpointResult:
    """What a merge into a checkpoint did."""

    plan: CheckpointPlan
    output: Path | None
    seconds: float = 0.0
    fp8_losses: list[Fp8Loss] = field(default_factory=list)
    scale_raised: list[str] = field(default_factory=list)
    saturated: list[str] = field(default_factory=list)
    base_autov3: str | None = None
    verification: object | None = None  # VerifyReport when --verify ran
    overflowed: list[str] = field(default_factory=list)  # non-fp8 tensors saturated at their dtype's limit

    def summary(self) -> str:
        """One line for stderr: what was merged into what, and how long it took."""
        plan = self.plan
        inputs = ", ".join(f"{Path(s.path).name} x {s.ratio:g}" for s in plan.inputs)
        return (f"merged {inputs} into {plan.base.name} in {self.seconds:.1f} s: the networks target "
                f"{len(plan.touched)} of its {len(plan.out_dtypes)} tensors")

    def as_dict(self) -> dict:
        result = {"mode": "checkpoint", "output": str(self.output) if self.output else None, **self.plan.as_dict()}
        result.update({
            "seconds": round(self.seconds, 3),
            "fp8_changes_lost": [loss.as_dict() for loss in self.fp8_losses],
            "fp8_scale_raised": self.scale_raised,
            "fp8_saturated": self.saturated,
            "saturated": self.overflowed,
        })
        if self.verification is not None:
            result["verify"] = self.verification.as_dict()
        return result


class _WriteBehind:
    """Writes tensors on a background thread (file writes release the GIL), so that the disk works
    while the next group is computed. At most `depth` tensors wait; errors surface on the next call."""

    _DONE = object()

    def __init__(self, writer: SafetensorsWriter, depth: int = 3):
        self.writer = writer
        self.pending: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.pending.get()
            if item is self._DONE:
                return
            if self.error is None:
                try:
                    self.writer.write(*item)
                except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                    self.error = exc

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self.error is not None:
            raise self.error
        self.pending.put((name, tensor))

    def finish(self) -> None:
        """Wait until every queued tensor is written; raise the first write error."""
        self.pending.put(self._DONE)
        self.thread.join()
        if self.error is not None:
            raise self.error


def compute_threads(device: torch.device) -> int:
    """Intra-op threads for the merge math: all but one core on CPU, leaving it to reading and writing.

    The per-module products are small (inner dimension = rank), so extra threads mostly spin; the
    I/O threads gain more from the core.
    """
    if device.type != "cpu":
        return torch.get_num_threads()
    return max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) - 1))


def merged_metadata(
    base_meta: dict[str, str], base: Path, base_hash: str | None, networks: Sequence[NetworkInput], ratios: Ratios,
    *, title: str | None = None, date: str | None = None,
) -> dict[str, str]:
    """Return the base's metadata (minus stale hashes) plus what was merged (lytools.*).

    A base that carries a modelspec gets it updated as FORMATS.md 5.3 asks and sd-scripts' merge does:
    dated `date` (default now), titled `title` (the output's name), `merged_from` the base and the
    networks. A base without one gets none (a checkpoint's modelspec is not ours to invent).
    """
    sources = [source_entry(base, base_hash)]
    for index, network in enumerate(networks):
        entry = dict(source_entry(network.path, network.autov3))
        entry["ratio"] = format(ratios.per_input[index], "g")
        sources.append(entry)
    meta = carried(base_meta)
    if title is not None and any(key.startswith("modelspec.") for key in meta):
        meta["modelspec.date"] = date or modelspec_date()
        meta["modelspec.title"] = title
        meta["modelspec.merged_from"] = ", ".join([base.name, *(network.name for network in networks)])
    meta = add_provenance(meta, sources=sources)
    meta["lytools.merge"] = json.dumps(ratios.describe(), separators=(",", ":"))
    return meta


class _Engine:
    """Executes a CheckpointPlan against an open checkpoint."""

    def __init__(self, plan: CheckpointPlan, reader, networks: Sequence[NetworkInput], device: torch.device):
        self.plan, self.reader, self.networks, self.device = plan, reader, networks, device
        self.result_losses: list[Fp8Loss] = []
        self.scale_raised: list[str] = []
        self.saturated: list[str] = []
        self.overflowed: list[str] = []  # non-fp8 outputs with values beyond their dtype's range (saturated)
        self.scale_keys = set(plan.fp8.scale_of.values())
        self.dequantize_scaled = bool(plan.dropped)

    # -- order -------------------------------------------------------------------------------
    def processing_order(self, file_order: Sequence[str]) -> list[str]:
        """File order, except that each changed fp8 weight's scale follows its weight (it may change)."""
        late = {name for name in file_order if name in self.scale_keys and name in self.plan.group_of}
        order: list[str] = []
        for name in file_order:
            if name in late:
                continue
            order.append(name)
            scale = self.plan.fp8.scale_of.get(name)
            if scale in late:
                order.append(scale)
        return order

    # -- tensors ------------------------------------------------------------------------------
    def out_dtype(self, name: str) -> torch.dtype:
        return TORCH_DTYPES[self.plan.out_dtypes[name]]

    def untouched(self, name: str) -> torch.Tensor:
        stored = self.reader.get(name)
        dtype = self.out_dtype(name)
        scale_key = self.plan.fp8.scale_of.get(name)
        if self.dequantize_scaled and scale_key is not None:
            return self._cast(name, dequantize(stored, self.reader.get(scale_key)), dtype)
        return stored if stored.dtype == dtype else self._cast(name, stored, dtype)

    def _cast(self, name: str, value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """value.to(dtype), except that values beyond the dtype's range saturate (fp16: no inf), noted."""
        out, beyond = saturating_cast(value, dtype)
        if beyond and name not in self.overflowed:  # a row-sliced tensor passes here twice
            self.overflowed.append(name)
        return out

    def _work_dtype(self, name: str) -> torch.dtype:
        info = self.reader.info(name) if name in self.reader else None
        return torch.float64 if info is not None and info.dtype == "F64" else torch.float32

    def _load(self, name: str) -> torch.Tensor:
        """Return a float working copy of a tensor on the device (fp8 scaled: the true weight)."""
        if name not in self.reader:  # a bias a module creates
            return torch.zeros(self.plan.shapes[name], dtype=torch.float32, device=self.device)
        stored = self.reader.get(name).to(self.device)
        scale_key = self.plan.fp8.scale_of.get(name)
        scale = self.reader.get(scale_key) if scale_key else None
        return dequantize(stored, scale, self._work_dtype(name))

    # -- one group ------------------------------------------------------------------------------
    def compute(self, group: Group) -> dict[str, torch.Tensor]:
        """Return every output tensor of a group: all touches applied in order, cast once."""
        working, rows_touched, modules_of = self.apply_all(group)
        outputs: dict[str, torch.Tensor] = {}
        for key, value in working.items():
            outputs.update(self._finish(key, value, rows_touched.get(key, [None]), modules_of.get(key, [])))
        return outputs

    def apply_all(self, group: Group):
        """Return (float working tensors with every touch applied, rows touched per key, modules per key)."""
        working = {key: self._load(key) for key in group.keys if key not in self.scale_keys}
        rows_touched: dict[str, list[tuple[int, int] | None]] = {}
        modules_of: dict[str, list[str]] = {}
        for touch in group.touches:
            self._apply(touch, working)
            for piece in touch.pieces:
                rows_touched.setdefault(piece.key, []).append(piece.rows)
                modules_of.setdefault(piece.key, []).append(touch.module)
            for bias in touch.bias_keys:
                if bias:
                    rows_touched.setdefault(bias, []).append(None)
        return working, rows_touched, modules_of

    def _apply(self, touch: Touch, working: dict[str, torch.Tensor]) -> None:
        network = self.networks[touch.network]
        module, info = network.modules[touch.module], network.infos[touch.module]
        precision = "float64" if working[touch.pieces[0].key].dtype == torch.float64 else "float32"
        options = dict(device=self.device, precision=precision, info=info, dora_mode=self.plan.dora_mode)
        if len(touch.pieces) == 1 and self._add_plain_lora(touch, module, info, working):
            return
        if len(touch.pieces) == 1:
            piece = touch.pieces[0]
            rows = slice(*piece.rows) if piece.rows else slice(None)
            weight = working[piece.key]
            target = weight[rows] if touch.pad_in is None else weight[rows, : touch.pad_in]
            bias_key = touch.bias_keys[0]
            bias = working[bias_key][rows] if bias_key else None
            merged = apply_module(module, target, bias, touch.ratio, **options)
            if touch.pad_in is None:
                weight[rows] = merged.weight
            else:
                weight[rows, : touch.pad_in] = merged.weight
            if bias_key and merged.bias is not None:
                working[bias_key][rows] = merged.bias
            return
        pieces = sorted(touch.pieces, key=lambda p: p.module_rows[0] if p.module_rows else 0)
        position = 0
        for piece in pieces:
            if piece.module_rows is None or piece.module_rows[0] != position:
                raise MatchError(f"module {touch.module}: its pieces do not tile the fused weight change")
            position = piece.module_rows[1]
        parts = [working[p.key][slice(*p.rows) if p.rows else slice(None)] for p in pieces]
        fused = torch.cat(parts)
        bias = None
        if any(touch.bias_keys):
            by_key = dict(zip((p.key for p in touch.pieces), touch.bias_keys))
            bias = torch.cat([working[by_key[p.key]][slice(*p.rows) if p.rows else slice(None)] for p in pieces])
        merged = apply_module(module, fused, bias, touch.ratio, **options)
        for piece in pieces:
            a, b = piece.module_rows
            rows = slice(*piece.rows) if piece.rows else slice(None)
            working[piece.key][rows] = merged.weight[a:b]
            if bias is not None and merged.bias is not None:
                bias_key = dict(zip((p.key for p in touch.pieces), touch.bias_keys))[piece.key]
                working[bias_key][rows] = merged.bias[a:b]

    def _add_plain_lora(self, touch: Touch, module, info, working: dict[str, torch.Tensor]) -> bool:
        """W += ratio·s·up@down in place with one addmm (no ΔW temporary), for plain LoRA/LoCon.

        The most common module by far; the same math as lytools.algos' LoRA delta (ALGORITHMS.md 2)
        without the temporaries. Returns False for anything else (Tucker, DoRA, sparse correction,
        zero-padded or fused-row targets with biases), which goes through `apply_module`.
        """
        if info.algo != "lora" or info.dora or info.tucker or info.sparse_bias or info.bias_delta or info.scale is None:
            return False
        if touch.pad_in is not None or any(touch.bias_keys):
            return False
        piece = touch.pieces[0]
        weight = working[piece.key]
        target = weight[slice(*piece.rows)] if piece.rows else weight
        if not target.is_contiguous():
            return False
        up = module[LORA_UP]
        down = module[LORA_DOWN]
        flat = target.view(target.shape[0], -1)
        up = up.reshape(up.shape[0], -1).to(flat.device, flat.dtype)
        down = down.reshape(down.shape[0], -1).to(flat.device, flat.dtype)
        if up.shape[0] != flat.shape[0] or down.shape[1] != flat.shape[1]:
            return False
        flat.addmm_(up, down, alpha=touch.ratio * info.scale)
        return True

    def _finish(
        self, key: str, value: torch.Tensor, rows: list[tuple[int, int] | None], modules: list[str]
    ) -> dict[str, torch.Tensor]:
        """Return the output tensor(s) for one working tensor: cast once (fp8: requantize, with its scale)."""
        dtype = self.out_dtype(key)
        partial = None if any(r is None for r in rows) else _untouched_spans(rows, value.shape[0])
        if self.plan.out_dtypes[key] not in FP8_NAMES:
            out = self._cast(key, value, dtype)
            if partial:
                original = self.untouched(key).to(self.device)
                for a, b in partial:
                    out[a:b] = original[a:b]
            return {key: out.cpu()}
        scale_key = self.plan.fp8.scale_of.get(key)
        scale = self.reader.get(scale_key) if scale_key else None
        stored = self.reader.get(key).to(self.device)
        requantized = requantize(value, dtype, scale)
        out = requantized.stored
        if partial and not requantized.scale_raised:
            for a, b in partial:
                out[a:b] = stored[a:b]
        if requantized.scale_raised:
            self.scale_raised.append(key)
        if requantized.saturated:
            self.saturated.append(key)
        before = dequantize(stored, scale)
        intended = value - before
        realized = dequantize(out, requantized.scale) - before
        kept = surviving_share(intended, realized)
        if kept < LOSS_REPORT_BELOW:
            self.result_losses.append(Fp8Loss(key, sorted(set(modules)), kept))
        outputs = {key: out.cpu()}
        if scale_key is not None:
            outputs[scale_key] = requantized.scale.cpu()
        return outputs


def _untouched_spans(rows: list[tuple[int, int] | None], total: int) -> list[tuple[int, int]]:
    spans, position = [], 0
    for a, b in sorted(r for r in rows if r is not None):
        if a > position:
            spans.append((position, a))
        position = max(position, b)
    if position < total:
        spans.append((position, total))
    return spans


def merge_into_checkpoint(
    base: str | Path,
    network_paths: Sequence[str | Path],
    output: str | Path | None,
    *,
    ratios: Sequence[float] | None = None,
    ratio_for: Sequence[str] = (),
    allow_unmatched: bool = False,
    save_dtype: torch.dtype | None = None,
    device: str = "auto",
    dry_run: bool = False,
    overwrite: bool = False,
    dora_mode: str | None = None,
    keep_ema: bool = False,
    reporter: Reporter = QUIET,
    reader: SafetensorsFile | ShardedFile | PickledFile | DiffusersFolder | None = None,
    loaded: NetworkInputs | None = None,
    strip_metadata: bool = False,
) -> CheckpointResult:
    """Merge networks (any algorithm and key style) into a checkpoint; return what was done.

    Each network is applied with its ratio (times every matching `ratio_for` rule), in input
    order. With `dry_run` only the plan is made (headers and network files are read, nothing
    is written). Errors leave no output file. dora_mode: "lycoris" (the reference: the full
    direction change, the magnitude interpolated by the ratio) or "comfy" (ComfyUI: the ratio
    interpolates between the base and the full DoRA result); they agree at ratio 1. None: lycoris,
    without the warning an explicit mode gets when no network holds DoRA. `reader`: the base already
    opened (with `keep_ema`) by the caller, who closes it; a pickled base is unpickled once that way.
    `loaded`: the caller's NetworkInputs (pickled networks it already loaded are not unpickled again).
    """
    started = time.perf_counter()
    given_mode, dora_mode = dora_mode, dora_mode or "lycoris"
    check_mode(dora_mode)
    base = Path(base)
    where = resolve_device(device)
    if loaded is None:  # q/k/v parts that do not fuse into one kohya module are applied each to its own rows
        loaded = NetworkInputs()
        loaded.keep_parts = True
    networks = [loaded.load(path, hash_file=not (dry_run or strip_metadata)) for path in network_paths]
    if given_mode is not None and not any(info.dora for n in networks for info in n.infos.values()):
        reporter.warn(f"--dora-mode {given_mode}: no network holds DoRA modules, so it changes nothing")
    rule_set = Ratios.build(len(networks), ratios, ratio_for)
    cast = " (cast by --save-dtype)" if save_dtype is not None else ""
    for text in rule_set.zero_warnings(networks, f"the output is a plain copy of {base.name}{cast}",
                                       dora_applies=dora_mode == "lycoris"):
        reporter.warn(text)
    for network in networks:
        if network.stray:
            reporter.log(f"{network.name}: {len(network.stray)} key(s) outside any module ignored (first: {network.stray[0]})")
    with open_file(base, keep_ema=keep_ema) if reader is None else nullcontext(reader) as reader:
        for note in reader.notes() if isinstance(reader, PickledFile) else ():
            reporter.warn(f"{base.name}: {note}")  # read whole into memory / EMA copy left out
        if keep_ema and not (isinstance(reader, PickledFile) and reader.ema_count):
            reporter.warn(f"--keep-ema changes nothing: only a pickled checkpoint's EMA copy (model_ema.*) is left out "
                          f"by default, and {base.name} holds none")
        infos = {info.name: info for info in reader.infos()}
        plan = plan_checkpoint_merge(
            base, infos, dict(reader.metadata), networks, rule_set,
            save_dtype=save_dtype, allow_unmatched=allow_unmatched,
        )
        plan.dora_mode = dora_mode
        plan.keep_ema = keep_ema
        plan.strip_metadata = strip_metadata
        for text in rule_set.unused_rules():
            reporter.warn(f"--ratio-for {text} matched no module")
        if plan.unmatched_count:
            reporter.warn(f"{plan.unmatched_count} network module(s) matched no checkpoint tensor and were skipped")
        for summary in plan.inputs:
            if summary.padded:
                reporter.warn(
                    f"{Path(summary.path).name}: {len(summary.padded)} module(s) zero-padded into wider input "
                    f"channels (inpainting conv_in, as A1111 does)"
                )
        if dry_run or output is None:
            return CheckpointResult(plan, None, time.perf_counter() - started)
        result = _execute(plan, reader, networks, rule_set, Path(output), where, overwrite, reporter, strip_metadata)
    result.seconds = time.perf_counter() - started
    return result


def _execute(plan, reader, networks, rule_set, output, where, overwrite, reporter, strip=False) -> CheckpointResult:
    hasher = None
    if isinstance(reader, SafetensorsFile) and not strip:  # --strip-metadata records no sources: nothing to hash
        hasher = DataHashThread(reader.path, reader.header.data_start)
    # planned with a placeholder hash, patched once the base is hashed: the same date both times
    dated = dict(title=output.stem, date=modelspec_date())
    metadata = merged_metadata(dict(reader.metadata), plan.base, HASH_PLACEHOLDER if hasher else None, networks,
                               rule_set, **dated)
    if strip:
        metadata = stripped(metadata, checkpoint=True)
    entries = [plan_entry(name, dtype, plan.shapes[name]) for name, dtype in plan.out_dtypes.items()]
    if isinstance(reader, DiffusersFolder):  # a folder like the base, each component's file streamed
        writer = FolderWriter(output, reader, entries, metadata, overwrite=overwrite, strip_metadata=strip)
    else:
        writer = SafetensorsWriter(output, entries, metadata, overwrite=overwrite)
    engine = _Engine(plan, reader, networks, where)
    order = engine.processing_order(writer.order)
    if hasher:
        hasher.start()
    threads = torch.get_num_threads()
    torch.set_num_threads(compute_threads(where))
    try:
        with writer:
            behind = _WriteBehind(writer)
            try:
                ready: dict[str, torch.Tensor] = {}
                for name in reporter.progress(order, total=len(order), desc="merge"):
                    if name not in ready:
                        index = plan.group_of.get(name)
                        if index is None:
                            behind.write(name, engine.untouched(name))
                            continue
                        ready.update(engine.compute(plan.groups[index]))
                    behind.write(name, ready.pop(name))
            finally:
                behind.finish()
            if ready:
                raise LytoolsError(f"{output}: internal error: {len(ready)} computed tensors were never written")
            base_hash = None
            if hasher:
                hasher.join()
                if hasher.error is not None:
                    raise LytoolsError(f"{plan.base}: read error while hashing ({hasher.error})")
                base_hash = hasher.digest
                writer.patch_metadata(merged_metadata(dict(reader.metadata), plan.base, base_hash, networks, rule_set,
                                                      **dated))
    except BaseException:
        if hasher:
            hasher.cancel()
        raise
    finally:
        torch.set_num_threads(threads)
    losses = engine.result_losses
    if losses:  # one line for them all (a LoRA can touch hundreds of tensors); each with -v
        worst = min(losses, key=lambda loss: loss.kept)
        kept = sorted(loss.kept for loss in losses)
        reporter.warn(f"fp8: in {len(losses)} tensor(s) only part of the change survives requantization "
                      f"(median {kept[len(kept) // 2]:.0%} kept, least {worst.kept:.0%} in {worst.tensor}); -v lists them")
        for loss in losses:
            reporter.detail(f"fp8: {loss.tensor}: only {loss.kept:.0%} of the change from {', '.join(loss.modules)} "
                            "survives requantization")
    if engine.scale_raised:
        reporter.log(f"fp8: {len(engine.scale_raised)} tensor scale(s) raised so the merged weights fit fp8 (no saturation)")
    if engine.saturated:
        reporter.warn(f"fp8: {len(engine.saturated)} tensor(s) saturated at the fp8 limit")
    if engine.overflowed:
        reporter.warn(f"{len(engine.overflowed)} tensor(s) had values beyond the range of their output dtype and "
                      f"were saturated to its largest value (e.g. {engine.overflowed[0]})")
    return CheckpointResult(
        plan, output, 0.0, engine.result_losses, engine.scale_raised, engine.saturated,
        base_hash[:12] if base_hash else None, overflowed=engine.overflowed,
    )
