"""The fast path of `convert --to diffusers`: plain LoRA/LoCon networks in kohya/LyCORIS names.

Most batch conversions are ordinary kohya LoRAs going to diffusers names. For those this module
does the whole job on the file's bytes, without torch: it validates the header, maps every
module through the same name tables, folds alpha / rank into the factors and writes the result.
What a header's tensor entries decide (the checks, the name mapping, the output layout) is worked
out once per structure and shared by the later files of a batch with the same one.
A file it takes comes out byte for byte as the general path (load.py + write.py) writes it; the
tests hold the two side by side. Anything else (other algorithms, DoRA, Tucker, fused q/k/v
parts, swapped halves, diffusers/peft-named inputs, stray keys, bf16/fp8 factors, non-finite
values to scale, --save-dtype, --no-fold, --arch overrides, ...) gets `None` back and goes the
general way.

Scaling matches torch's `tensor * factor` exactly: float32 factors multiply in float32; float16
ones by a power of two (alpha and rank are usually powers of two) have their exponent field
moved, and the few values that would leave the normal range (zeros, subnormals) are looked up in
a table of every float16 bit pattern times the factor (the float32 product rounded to nearest
even, as torch computes it); any other float16 factor is looked up in that table for every value.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import json
import math
import mmap
import os
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from lytools.arch.detect import arch_from_metadata
from lytools.arch.network import layout_of_module
from lytools.convert import names
from lytools.convert.layout import ALPHA, DOWN, FOLDED_NOTE, UP, fold_split, lora_config, unloaded_note
from lytools.convert.run import FileResult, output_metadata
from lytools.errors import FileFormatError
from lytools.io import Layout, SafetensorsWriter, parse_header, plan_entry, plan_layout, read_header
from lytools.io.safetensors import TensorInfo, duplicate_key_hook

if TYPE_CHECKING:
    from lytools.convert.run import ConvertOptions

FACTOR_DTYPES = frozenset({"F16", "F32"})
ALPHA_DTYPES = {"F16": "<e", "F32": "<f", "F64": "<d"}  # struct formats
SIZE_LIMIT = 1 << 30  # larger files are not networks this path is for
METADATA_START = '{"__metadata__":'  # how safetensors (and lytools) begin a header that has metadata
CACHE_LIMIT = 16  # structures remembered per process


@dataclass(frozen=True)
class _Slot:
    """One output tensor, in file order: its bytes in the input's data section, the module whose
    folded scale it takes, and which half of fold_split's (down, up) pair applies."""

    begin: int
    end: int
    module: int
    up: bool
    dtype: str


@dataclass(frozen=True)
class _ScalingPlan:
    """Which tensors a set of module factors scales, grouped by (dtype, factor): groups of (dtype,
    factor, their slices of the input's data section, first, last), scaled back to back into
    scratch[first:last]. `sources`: where each output tensor's bytes come from, in file order:
    (0, slice of the input's data section) or (1, slice of the scratch buffer)."""

    groups: tuple[tuple[str, float, tuple[slice, ...], int, int], ...]
    total: int
    sources: tuple[tuple[int, slice], ...]


@dataclass(frozen=True)
class _Structure:
    """All that an input's tensor entries decide, worked out once and shared by every input whose
    header has the same tensor part (the files of a batch from one trainer): the checks, the name
    mapping, the output layout and the adapter metadata. `taken` False: not for this path."""

    taken: bool
    metadata: dict[str, str]  # the first input's; used only when the metadata is part of the key
    arch: str = ""
    notes: tuple[str, ...] = ()
    ranks: tuple[int, ...] = ()  # per module
    alphas: tuple[tuple[Callable, int] | None, ...] = ()  # per module: (unpack_from, offset) of its alpha, if any
    alpha_bytes: tuple[slice, ...] = ()  # every alpha's bytes in the data section: the key of `plans`
    slots: tuple[_Slot, ...] = ()
    layout: Layout | None = None
    adapter_json: str = ""
    plans: dict[bytes, _ScalingPlan] = field(default_factory=dict)  # by alpha bytes: files mostly share one


_STRUCTURES: dict[tuple, _Structure] = {}
_STRUCTURES_LOCK = threading.Lock()  # inserts and evictions (lookups need none)


def try_convert(source: Path, output: Path, options: ConvertOptions) -> FileResult | None:
    """Convert `source` to diffusers names when it is a plain LoRA/LoCon network; else None."""
    collecting = gc.isenabled()
    gc.disable()  # thousands of short-lived, acyclic objects per file: collections only cost time
    try:
        return _convert(source, output, options)
    finally:
        if collecting:
            gc.enable()


def _convert(source: Path, output: Path, options: ConvertOptions) -> FileResult | None:
    if (options.target != "diffusers" or options.save_dtype is not None or options.fold is False
            or options.component is not None or not source.name.lower().endswith(".safetensors")):
        return None
    started = time.perf_counter()
    try:
        size = os.stat(source).st_size
    except OSError:
        read_header(source)  # raises the error the general path would give
        return None
    if not 8 < size <= SIZE_LIMIT:
        return None  # the general path reports files too short to be safetensors
    data = _read(source, size)
    (header_len,) = struct.unpack_from("<Q", data, 0)
    if header_len > size - 8:
        return None  # the general path names the problem
    raw = bytes(data[8:8 + header_len])
    structure, metadata = _structure_of(source, raw, size, options)
    if not structure.taken:
        return None
    body = data[8 + header_len:]
    plan = _plan_for(structure, body)
    if plan is None:
        return None  # an alpha is not finite: the general path names it
    scaled = _SCRATCH.get("scaled", plan.total)
    for dtype, factor, inputs, first, last in plan.groups:
        if not _scale_into([body[where] for where in inputs], dtype, factor, scaled[first:last]):
            return None  # a value to scale is not finite: the general path names it
        if dtype == "F16" and abs(factor) > 1 and _any_infinite(scaled[first:last]):
            return None  # a product beyond float16's range: the general path saturates it, with a note
    buffers = (body, scaled)
    views = [buffers[which][where] for which, where in plan.sources]
    strip = options.strip_metadata  # no provenance: the input's AutoV3 is not computed
    autov3 = None if strip else hashlib.sha256(body).hexdigest()
    metadata = output_metadata(metadata, source, "diffusers",  # stale sshs_* dropped there (not changed in place)
                               {"lora_adapter_metadata": structure.adapter_json}, autov3, structure.arch, folded=True,
                               strip=strip)
    writer = SafetensorsWriter(output, structure.layout, metadata, overwrite=options.overwrite, durable=options.fsync)
    with writer:
        writer.write_all(views)
    result = FileResult(source, outputs=[output], notes=[*structure.notes, FOLDED_NOTE],
                        details=[f"read as a kohya {structure.arch} network of {len(structure.ranks)} modules "
                                 f"(plain LoRA: the torch-free fast path)"])
    result.seconds = time.perf_counter() - started
    return result


def _structure_of(source: Path, raw: bytes, size: int, options: ConvertOptions) -> tuple[_Structure, dict[str, str]]:
    """Return (the structure of the header `raw`, the input's metadata).

    A header that starts with its metadata (as safetensors writes it) is keyed by what follows
    the metadata: only the metadata is parsed for each file. The first file of a structure gets
    every check the reader makes (parse_header); a later one shares its text byte for byte after
    a well-formed metadata object, so it would pass them all the same."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    metadata = None
    key_text = text
    if text is not None and text.startswith(METADATA_START):
        try:
            parsed, end = json.JSONDecoder(object_pairs_hook=duplicate_key_hook(source)).raw_decode(text, len(METADATA_START))
        except (ValueError, RecursionError, FileFormatError):
            parsed = None
        if type(parsed) is dict and all(type(value) is str for value in parsed.values()):
            metadata, key_text = parsed, text[end:].rstrip(" \t\n\r")  # padding depends on the metadata
    key = (key_text, size - 8 - len(raw), options.arch, metadata is None,
           arch_from_metadata(metadata) if metadata is not None else None)
    structure = _STRUCTURES.get(key) if text is not None else None
    if structure is None:
        header = parse_header(source, raw, size)  # every check the general path's reader makes
        structure = _study(header, options)
        with _STRUCTURES_LOCK:
            if len(_STRUCTURES) >= CACHE_LIMIT:
                _STRUCTURES.pop(next(iter(_STRUCTURES)))  # the oldest
            _STRUCTURES[key] = structure
        metadata = header.metadata
    return structure, metadata if metadata is not None else structure.metadata


def _study(header, options: ConvertOptions) -> _Structure:
    """Work out the structure of a validated header (see _Structure)."""
    refused = _Structure(False, header.metadata)
    detected = names.detect_cached({name: info.shape for name, info in header.tensors.items()}, header.metadata)
    arch = detected.arch
    if (arch not in ("sd1", "sd2", "sdxl", "sd3", "flux") or (options.arch and options.arch != arch)
            or detected.layout not in ("kohya", "lycoris") or not detected.modules or detected.stray):
        return refused
    plan = _plan(arch, detected.modules, header.tensors)
    if plan is None:
        return refused
    entries, slots, ranks, alphas, alpha_bytes = [], {}, [], [], []
    per_component: dict[str, list[tuple[str, int, float]]] = {}
    for index, (part, down, up, alpha) in enumerate(plan):
        for suffix, info, is_up in (("lora_A.weight", down, False), ("lora_B.weight", up, True)):
            name = f"{part.component}.{part.path}.{suffix}"
            entries.append(plan_entry(name, info.dtype, info.shape))
            slots[name] = _Slot(info.begin, info.end, index, is_up, info.dtype)
        rank = down.shape[0]
        ranks.append(rank)
        alphas.append(None if alpha is None else (struct.Struct(ALPHA_DTYPES[alpha.dtype]).unpack_from, alpha.begin))
        if alpha is not None:
            alpha_bytes.append(slice(alpha.begin, alpha.end))
        per_component.setdefault(part.component, []).append((part.path, rank, float(rank)))
    layout = plan_layout(entries)
    adapter = {f"{component}.{key}": value for component, modules in per_component.items()
               for key, value in lora_config(modules, False).items()}
    unloaded = unloaded_note(arch, {component: len(modules) for component, modules in per_component.items()})
    return _Structure(
        True, header.metadata, arch=arch, notes=(*detected.notes, *([unloaded] if unloaded else [])), ranks=tuple(ranks), alphas=tuple(alphas),
        alpha_bytes=tuple(alpha_bytes),
        slots=tuple(slots[entry.name] for entry in layout.entries), layout=layout,
        adapter_json=json.dumps(adapter, sort_keys=True),
    )


PLAN_LIMIT = 8  # scaling plans remembered per structure


def _plan_for(structure: _Structure, body: memoryview) -> _ScalingPlan | None:
    """Return the scaling plan for the alphas stored in `body` (a data section of `structure`);
    None when one is not finite. Plans are remembered by the alphas' bytes: the files of a batch
    mostly share their alphas, and then one join of a few hundred bytes finds the plan."""
    key = b"".join([body[where] for where in structure.alpha_bytes])
    plan = structure.plans.get(key)
    if plan is not None:
        return plan
    factors: list[tuple[float, float]] = []
    split: dict[float, tuple[float, float]] = {}
    for rank, alpha in zip(structure.ranks, structure.alphas):
        value = alpha[0](body, alpha[1])[0] if alpha is not None else None
        if value is not None and not math.isfinite(value):
            return None
        scale = 1.0 if not value else value / rank  # a missing or zero alpha means alpha = rank
        pair = split.get(scale)
        if pair is None:
            pair = split[scale] = fold_split(scale)
        factors.append(pair)
    plan = _scaling_plan(structure, factors)
    if len(structure.plans) >= PLAN_LIMIT:
        structure.plans.clear()
    structure.plans[key] = plan
    return plan


def _scaling_plan(structure: _Structure, factors: list[tuple[float, float]]) -> _ScalingPlan:
    """Return the scaling plan of `structure` for these (down, up) factors per module."""
    groups: dict[tuple[str, float], list[int]] = {}  # (dtype, factor) -> slots, scaled together
    for index, slot in enumerate(structure.slots):
        factor = factors[slot.module][slot.up]
        if factor != 1.0 and slot.begin != slot.end:
            groups.setdefault((slot.dtype, factor), []).append(index)
    planned, position = [], 0
    sources = [(0, slice(slot.begin, slot.end)) for slot in structure.slots]
    for (dtype, factor), members in groups.items():
        inputs, first = tuple(sources[index][1] for index in members), position
        for index in members:
            slot = structure.slots[index]
            sources[index] = (1, slice(position, position + slot.end - slot.begin))
            position += slot.end - slot.begin
        planned.append((dtype, factor, inputs, first, position))
    return _ScalingPlan(tuple(planned), position, tuple(sources))


def _plan(arch: str, modules: dict[str, dict[str, str]], infos: dict[str, TensorInfo]):
    """Return [(DiffusersPart, down info, up info, alpha info or None)] in the general path's module
    order when every module is a plain LoRA/LoCon with one whole diffusers module; else None."""
    table = names.diffusers_parts(arch)
    seen: set[str] = set()
    plan = []
    for stored, suffix_keys in modules.items():
        if not {DOWN, UP} <= set(suffix_keys) <= {DOWN, UP, ALPHA} or layout_of_module(stored) not in ("kohya", "lycoris"):
            return None
        found = names.candidates(arch, stored)
        if len(found) != 1 or found[0].module_rows is not None or found[0].swap_halves or found[0].module in seen:
            return None
        seen.add(found[0].module)
        parts = table.get(found[0].module)
        if not parts or len(parts) != 1 or parts[0].module_rows is not None or parts[0].swap_halves:
            return None
        down, up = infos[suffix_keys[DOWN]], infos[suffix_keys[UP]]
        alpha = infos[suffix_keys[ALPHA]] if ALPHA in suffix_keys else None
        if not _plain_factors(down, up) or (alpha is not None and (alpha.dtype not in ALPHA_DTYPES or alpha.numel != 1)):
            return None
        plan.append((parts[0], down, up, alpha))
    return plan


def _plain_factors(down: TensorInfo, up: TensorInfo) -> bool:
    """True for float16/float32 factors of one dtype that chain: up [out, r, 1...] after down [r, in, k...]."""
    if down.dtype != up.dtype or down.dtype not in FACTOR_DTYPES:
        return False
    if not 2 <= len(down.shape) <= 5 or len(up.shape) != len(down.shape):
        return False
    return down.shape[0] >= 1 and up.shape[1] == down.shape[0] and all(k == 1 for k in up.shape[2:])


class _Scratch(threading.local):
    """Buffers kept from one file to the next (per thread): a batch converts thousands of files of
    about the same size, and fresh memory costs page faults and zeroing every time. Buffers over
    KEEP_LIMIT are not kept."""

    KEEP_LIMIT = 64 << 20

    def __init__(self) -> None:
        self.buffers: dict[str, bytearray] = {}

    def get(self, role: str, size: int) -> memoryview:
        if size > self.KEEP_LIMIT:
            return memoryview(bytearray(size))
        buffer = self.buffers.get(role)
        if buffer is None or len(buffer) < size:
            buffer = self.buffers[role] = bytearray(min(self.KEEP_LIMIT, max(size, int(len(buffer or b"") * 1.25))))
        return memoryview(buffer)[:size]


_SCRATCH = _Scratch()


def _read(path: Path, size: int) -> memoryview:
    """Return the whole file as a read-only map of the page cache: the bytes are hashed, sliced and
    written from there without a copy into this process."""
    with open(path, "rb") as handle:
        if os.fstat(handle.fileno()).st_size != size:
            raise FileFormatError(f"{path}: file changed while reading")
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    return memoryview(mapped)


CHUNK = 1 << 17  # float16 values scaled and checked at a time (with the step's flags, about the size of L2)


def _scale_into(raws: list[memoryview], dtype: str, factor: float, out: memoryview) -> bool:
    """Write each float16/float32 tensor of `raws` times `factor` into `out`, back to back, exactly
    as torch computes `tensor * factor`; False when a value to scale is not finite (left to the
    general path)."""
    if dtype == "F32":
        position = 0
        for raw in raws:
            values = np.frombuffer(raw, dtype="<f4")
            if not np.isfinite(values).all():
                return False
            np.multiply(values, np.float32(factor), out=np.frombuffer(out[position:position + len(raw)], dtype="<f4"))
            position += len(raw)
        return True
    result = np.frombuffer(out, dtype="<u2")
    mantissa, power = math.frexp(factor)
    shift = power - 1
    if mantissa != 0.5 or not -29 <= shift <= 29:  # not a (usable) power of two: looked up, value by value
        table, position = _half_products(factor), 0
        for raw in raws:
            bits = np.frombuffer(raw, dtype="<u2")
            if len(bits) and int(np.bitwise_and(bits, np.uint16(0x7FFF)).max()) >= 0x7C00:
                return False
            np.take(table, bits, out=result[position:position + len(bits)], mode="clip")
            position += len(bits)
        return True
    # Magnitudes (the bits without the sign) in [low, low + span] are normal numbers that stay
    # normal: only their exponent field moves, so every value gets `moved` added to its bits. The
    # others (zeros, subnormals, results that leave the normal range, inf/nan) are flagged a
    # cache-sized step at a time and recomputed through float32, rounded to nearest even.
    moved = np.uint16((shift << 10) & 0xFFFF)
    low = max(1, 1 - shift) << 10
    span = ((min(30, 30 - shift) << 10) | 0x3FF) - low
    # from a result r: 2 * (magnitude - low) = (r << 1) - 2 * (moved + low), modulo 2**16; it wraps
    # to above 2 * span for magnitudes below `low` (the sign bit is shifted out)
    offset, limit = np.uint16((2 * (int(moved) + low)) & 0xFFFF), np.uint16(2 * span)
    if raws:  # one copy of every tensor (a C loop), then each step is worked on in the cache
        np.concatenate([np.frombuffer(raw, dtype="<u2") for raw in raws], out=result)
    total = len(result)
    odd = np.frombuffer(_SCRATCH.get("odd", -(-total // 8) * 8), dtype=np.bool_)
    odd[total:] = False  # the padding to whole 8-byte words (see _sparse_nonzero)
    step = np.frombuffer(_SCRATCH.get("magnitudes", 2 * min(total, CHUNK)), dtype="<u2")
    add, left_shift, subtract, greater = np.add, np.left_shift, np.subtract, np.greater
    for begin in range(0, total, CHUNK):
        chunk = result[begin:begin + CHUNK]
        magnitudes = step[:len(chunk)]
        add(chunk, moved, out=chunk)
        left_shift(chunk, 1, out=magnitudes)
        subtract(magnitudes, offset, out=magnitudes)
        greater(magnitudes, limit, out=odd[begin:begin + len(chunk)])
    where = _sparse_nonzero(odd)
    if len(where):
        values = result[where] - moved  # the stored bits again
        if int(np.bitwise_and(values, np.uint16(0x7FFF)).max()) >= 0x7C00:
            return False
        result[where] = _half_products(factor)[values]
    return True


def _any_infinite(raw: memoryview) -> bool:
    """True when float16 bytes hold an inf or nan (products of finite values: only an overflow)."""
    bits = np.frombuffer(raw, dtype="<u2")
    return bool(len(bits)) and int(np.bitwise_and(bits, np.uint16(0x7FFF)).max()) >= 0x7C00


def _sparse_nonzero(flags: np.ndarray) -> np.ndarray:
    """np.flatnonzero for a bool array (of a length that is a multiple of 8) with few True values:
    finds the 8-byte words with any flag first, then the flags within those words only."""
    words = flags.view(np.uint64)
    if not np.count_nonzero(words):
        return np.empty(0, dtype=np.intp)  # nothing to fix up (a quick scan of whole words)
    marked = np.flatnonzero(words != 0)  # numpy finds the True values of a bool array far faster
    inside = np.flatnonzero(words[marked].view(np.bool_))
    return marked[inside >> 3] * 8 + (inside & 7)


@functools.lru_cache(maxsize=16)
def _half_products(factor: float) -> np.ndarray:
    """Return every float16 bit pattern times `factor` as torch computes it: the float32 product,
    rounded to the nearest float16 (ties to even; beyond float16's range is inf)."""
    with np.errstate(all="ignore"):
        product = np.arange(1 << 16, dtype=np.uint32).astype("<u2").view("<f2").astype(np.float32) * np.float32(factor)
        return product.astype("<f2").view("<u2")
