"""The fast path of `convert --to diffusers`: plain LoRA/LoCon networks in kohya/LyCORIS names.

Most batch conversions are ordinary kohya LoRAs going to diffusers names. For those this module
does the whole job on the file's bytes, without torch: it validates the header, maps every
module through the same name tables, folds alpha / rank into the factors and writes the result.
A file it takes comes out byte for byte as the general path (load.py + write.py) writes it; the
tests hold the two side by side. Anything else (other algorithms, DoRA, Tucker, fused q/k/v
parts, swapped halves, diffusers/peft-named inputs, stray keys, bf16/fp8 factors, non-finite
values to scale, --save-dtype, --no-fold, --arch overrides, ...) gets `None` back and goes the
general way.

Scaling matches torch's `tensor * factor` exactly: float32 factors multiply in float32; float16
ones by a power of two (alpha and rank are usually powers of two) have their exponent field
moved, with the few values that would leave the normal range (zeros, subnormals) computed in
float32 and rounded to nearest even, as torch does; any other float16 factor is computed in
float32 and rounded the same way.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import mmap
import os
import struct
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lytools.arch.network import layout_of_module
from lytools.convert import names
from lytools.convert.layout import ALPHA, DOWN, FOLDED_NOTE, UP, fold_split, lora_config
from lytools.convert.run import FileResult, output_metadata
from lytools.errors import FileFormatError
from lytools.io import SafetensorsWriter, plan_entry, read_header
from lytools.io.safetensors import TensorInfo

if TYPE_CHECKING:
    from lytools.convert.run import ConvertOptions

FACTOR_DTYPES = frozenset({"F16", "F32"})
ALPHA_DTYPES = {"F16": "<e", "F32": "<f", "F64": "<d"}  # struct formats
SIZE_LIMIT = 1 << 30  # larger files are not networks this path is for


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
    header = read_header(source)
    if header.file_size > SIZE_LIMIT:
        return None
    detected = names.detect_cached({name: info.shape for name, info in header.tensors.items()}, header.metadata)
    arch = detected.arch
    if (arch not in ("sd1", "sd2", "sdxl", "sd3", "flux") or (options.arch and options.arch != arch)
            or detected.layout not in ("kohya", "lycoris") or not detected.modules or detected.stray):
        return None
    plan = _plan(arch, detected.modules, header.tensors)
    if plan is None:
        return None
    data = _read(source, header.file_size)
    start = header.data_start
    tensors: dict[str, tuple[TensorInfo, memoryview]] = {}
    to_scale: dict[tuple[str, float], list[str]] = {}  # (dtype, factor) -> output names, scaled together
    per_component: dict[str, list[tuple[str, int, float]]] = {}
    for part, down, up, alpha in plan:
        rank = down.shape[0]
        value = _scalar(data, start, alpha) if alpha is not None else None
        if value is not None and not math.isfinite(value):
            return None  # the general path names the bad alpha
        scale = 1.0 if not value else value / rank  # a missing or zero alpha means alpha = rank
        for suffix, info, factor in zip(("lora_A.weight", "lora_B.weight"), (down, up), fold_split(scale)):
            name = f"{part.component}.{part.path}.{suffix}"
            tensors[name] = (info, data[start + info.begin:start + info.end])
            if factor != 1.0 and info.nbytes:
                to_scale.setdefault((info.dtype, factor), []).append(name)
        per_component.setdefault(part.component, []).append((part.path, rank, float(rank)))
    for index, ((dtype, factor), group) in enumerate(to_scale.items()):
        scaled = _scaled([tensors[name][1] for name in group], dtype, factor, index)
        if scaled is None:
            return None
        for name, raw in zip(group, scaled):
            tensors[name] = (tensors[name][0], raw)
    adapter = {f"{component}.{key}": value for component, entries in per_component.items()
               for key, value in lora_config(entries, False).items()}
    autov3 = hashlib.sha256(data[start:]).hexdigest()
    metadata = output_metadata(dict(header.metadata), source, "diffusers",  # stale sshs_* dropped there
                               {"lora_adapter_metadata": json.dumps(adapter, sort_keys=True)}, autov3, arch)
    entries = [plan_entry(name, info.dtype, info.shape) for name, (info, _) in tensors.items()]
    writer = SafetensorsWriter(output, entries, metadata, overwrite=options.overwrite, durable=options.fsync)
    with writer:
        for name in writer.order:
            writer.write_bytes(name, tensors[name][1])
    result = FileResult(source, outputs=[output], notes=[*detected.notes, FOLDED_NOTE])
    result.seconds = time.perf_counter() - started
    return result


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


def _scalar(data: memoryview, start: int, info: TensorInfo) -> float:
    return float(struct.unpack_from(ALPHA_DTYPES[info.dtype], data, start + info.begin)[0])


def _scaled(raws: list[memoryview], dtype: str, factor: float, slot: int = 0) -> list[memoryview] | None:
    """Return each raw factor times `factor` as torch computes `tensor * factor` (all of them in one
    numpy pass, into scratch buffer `slot`), or None when a value to scale is not finite (left to
    the general path)."""
    sizes = [len(raw) for raw in raws]
    total = sum(sizes)
    joined_bytes = _SCRATCH.get("scale-in", total)
    position = 0
    for raw, size in zip(raws, sizes):
        joined_bytes[position:position + size] = raw
        position += size
    kind = "<u2" if dtype == "F16" else "<u4"
    joined = np.frombuffer(joined_bytes, dtype=kind)
    out = np.frombuffer(_SCRATCH.get(f"scale-out-{slot}", total), dtype=kind)
    if dtype == "F32":
        values = joined.view("<f4")
        if not np.isfinite(values).all():
            return None
        np.multiply(values, np.float32(factor), out=out.view("<f4"))
    elif not _scaled_f16(joined, factor, out):
        return None
    flat = memoryview(out).cast("B")
    views, position = [], 0
    for size in sizes:
        views.append(flat[position:position + size])
        position += size
    return views


def _scaled_f16(bits: np.ndarray, factor: float, out: np.ndarray) -> bool:
    """Write bits (float16) times factor into `out`; False when a value is inf or nan."""
    exponent = bits & 0x7C00
    largest, smallest = int(exponent.max(initial=0)), int(exponent.min(initial=0x7C00))
    if largest == 0x7C00:
        return False
    mantissa, power = math.frexp(factor)
    shift = power - 1
    if mantissa != 0.5 or not -29 <= shift <= 29:  # not a (usable) power of two: float32 product, rounded
        out[:] = _via_float32(bits, factor)
        return True
    # normal results: only the exponent field moves; the rest (zeros, subnormals, results that
    # leave the normal range) go through float32 and round to nearest even
    low, high = max(1, 1 - shift) << 10, min(30, 30 - shift) << 10
    np.add(bits, np.uint16((shift << 10) & 0xFFFF), out=out)
    if smallest < low or largest > high:
        np.subtract(exponent, np.uint16(low), out=exponent)  # below `low` wraps around to large values
        rest = exponent > np.uint16(high - low)
        out[rest] = _via_float32(bits[rest], factor)
    return True


def _via_float32(bits: np.ndarray, factor: float) -> np.ndarray:
    with np.errstate(over="ignore"):  # beyond float16's range is inf, as in torch
        product = bits.view("<f2").astype(np.float32) * np.float32(factor)
        return product.astype("<f2").view("<u2")
