"""One file or many: convert a network's key layout and/or any file's dtype, atomically.

Output naming with --output-dir (documented in `lytools convert --help`):
    kohya, diffusers, dtype only:  DIR/<input name without .safetensors/.ckpt/...>.safetensors
    peft:                          DIR/<input stem>/adapter_model.safetensors + adapter_config.json
With -o OUT and --to peft: OUT ending in .safetensors is the adapter file and its config goes
beside it (`adapter_config.json` when OUT is named adapter_model.safetensors, else
`<stem>.adapter_config.json`); any other OUT is a folder that receives both files.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import signal
import stat
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from lytools.convert.layout import ALPHA, DORA, TARGETS
from lytools.errors import (LytoolsError, UnsupportedError, UsageError, debugging, os_error_line, os_reason,
                            print_debug_traceback)
from lytools.io import SafetensorsWriter, check_output_path, file_hashes, open_file, plan_entry
from lytools.io.writer import output_file_path, spelled_as_folder, temp_path, write_text_atomic
from lytools.io.folders import PEFT_ADAPTER_FILES, DiffusersFolder, FolderWriter, peft_config_path
from lytools.io.dtypes import is_float, saturating_cast, st_name
from lytools.io.metadata import IMPLEMENTATIONS, MODELSPEC_ARCHITECTURES, add_provenance, carried, carried_into_tensors, source_entry, stripped

if TYPE_CHECKING:
    import torch

INPUT_SUFFIXES = (".safetensors.index.json", ".safetensors", ".ckpt", ".pt", ".pth", ".bin")
_ADAPTER_KEYS = ("lora_adapter_metadata",)


@dataclass(frozen=True)
class ConvertOptions:
    """What to do with each input: target layout (None: dtype only) and how to write it."""

    target: str | None = None  # kohya | diffusers | peft | None
    save_dtype: torch.dtype | None = None
    fold: bool | None = None  # None: the target's default (diffusers/peft fold, kohya keeps)
    component: str | None = None  # peft: unet | te | te1 | te2 | te3
    arch: str | None = None
    overwrite: bool = False
    fsync: bool = False  # flush each output to disk before reporting it (durable against power loss)
    keep_ema: bool = False  # a pickled checkpoint's EMA copy (model_ema.*) is cast and written too
    strip_metadata: bool = False  # only what loaders read (lytools.io.metadata.stripped); inputs not hashed
    flatten_dora: bool = False  # DoRA modules baked into plain LoRA on `base` (lytools.convert.dora)
    base: Path | None = None  # the checkpoint --flatten-dora flattens on
    verify: bool = False  # reload each output as its target loader reads it, compare with the input (verify.py)
    check: bool = False  # every output module name must resolve in its target loader's table (check.py)


@dataclass
class FileResult:
    """The outcome of one input."""

    source: Path
    outputs: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0
    details: list[str] = field(default_factory=list)  # what -v shows: how the file was read and written
    warnings: list[str] = field(default_factory=list)  # what the user should know about the output (shown with -q too)
    report: dict[str, dict] = field(default_factory=dict)  # --check / --verify / --flatten-dora figures, for --json

    def as_dict(self) -> dict:
        return {"input": str(self.source), "outputs": [str(p) for p in self.outputs], "notes": self.notes,
                "warnings": self.warnings, **self.report, "error": self.error, "seconds": round(self.seconds, 4)}


def input_stem(path: Path) -> str:
    """Return the file name without its model suffix (`a.safetensors` -> `a`); a peft adapter file
    (`x/adapter_model.safetensors`, older peft's `x/adapter_model.bin`) is named by its folder (`x`), as peft names
    adapters."""
    name = path.name
    if name in PEFT_ADAPTER_FILES and path.parent.name not in ("", ".", ".."):
        return path.parent.name
    for suffix in INPUT_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def peft_paths(output: Path) -> tuple[Path, Path]:
    """Return (adapter file, adapter_config.json) for a peft output named OUT (see module docstring)."""
    if output.name.lower().endswith(".safetensors"):
        if output.name == "adapter_model.safetensors":
            return output, output.parent / "adapter_config.json"
        return output, output.with_name(input_stem(output) + ".adapter_config.json")
    return output / "adapter_model.safetensors", output / "adapter_config.json"


def single_output(source: Path, output: str | os.PathLike, target: str | None) -> Path:
    """Return -o OUT as a Path. OUT spelled as a folder (a trailing separator, which Path drops) is refused
    unless the output is a folder: a peft adapter folder (OUT not ending in .safetensors) or the cast of a
    folder input; an existing folder is refused when the file is written (check_output_path)."""
    if spelled_as_folder(output):
        name = str(output).rstrip(os.sep + (os.altsep or "")).lower()
        if not ((target == "peft" and not name.endswith(".safetensors")) or (target is None and source.is_dir())):
            return output_file_path(output)  # raises
    return Path(output)


def output_for(source: Path, output_dir: Path, target: str | None) -> Path:
    """Return the output path of `source` under --output-dir (the naming rule)."""
    stem = input_stem(source)
    if target is None and (source / "model_index.json").is_file():
        return output_dir / source.name  # a diffusers folder cast: a folder of the same name
    if target == "peft":
        return output_dir / stem
    return output_dir / f"{stem}.safetensors"


def real_path(path: Path) -> Path:
    """Return the file `path` names, links followed; a symlink loop is returned as given (Path.resolve raised
    RuntimeError on it: an internal error instead of the loop's own 'no such file' when the file is read)."""
    return Path(os.path.realpath(path))


def plan_outputs(sources: Sequence[Path], output: str | os.PathLike | None, output_dir: Path | None,
                 target: str | None) -> list[tuple[Path, Path]]:
    """Return (input, output) pairs; refuse clashes between outputs and outputs that are inputs.
    An input listed twice (the same file, however spelled: `find ... | lytools convert - ...` over
    overlapping folders) is converted once."""
    unique: dict[Path, Path] = {}
    for source in sources:
        unique.setdefault(real_path(source), source)
    sources = list(unique.values())
    if output is not None and output_dir is not None:
        raise UsageError("give either -o/--output or --output-dir, not both")
    if output is None and output_dir is None:
        raise UsageError("say where to write: -o OUT for one input, --output-dir DIR for many")
    if output is not None:
        if len(sources) != 1:
            raise LytoolsError(f"-o takes one input ({len(sources)} given); use --output-dir DIR for many")
        pairs = [(sources[0], single_output(sources[0], output, target))]
    else:
        if output_dir.exists() and not output_dir.is_dir():
            raise LytoolsError(f"{output_dir}: not a folder (--output-dir names the folder the outputs go to)")
        pairs = [(source, output_for(source, output_dir, target)) for source in sources]
    seen: dict[Path, Path] = {}
    inputs = {real_path(source) for source in sources}
    configs = (peft_config_path(source) for source in sources)  # read for a peft input's scales: part of it
    inputs |= {real_path(config) for config in configs if config is not None}
    for source, out in pairs:
        key = real_path(out)
        if key in seen:
            raise LytoolsError(f"{seen[key]} and {source} would both be written to {out}; rename one or use separate runs")
        written = {key, *(real_path(path) for path in peft_paths(out))} if target == "peft" else {key}  # -o DIR holding it
        if written & inputs:
            raise LytoolsError(f"{out}: the output would replace its own input; choose another folder")
        seen[key] = source
    return pairs


def make_output_dir(output_dir: Path) -> list[Path]:
    """Create --output-dir (and its parents) when missing, as `mkdir -p` would; return the folders created,
    outermost first."""
    missing = [folder for folder in (output_dir, *output_dir.parents) if not folder.exists()][::-1]
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LytoolsError(f"{output_dir}: cannot create the output folder ({os_reason(exc)})") from None
    return missing


def remove_empty_dirs(created: Sequence[Path]) -> None:
    """Remove the folders make_output_dir created that are still empty (every file failed): a failed run
    leaves nothing behind."""
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:  # not empty (something was written there) or gone: keep the rest
            return


# -- metadata ----------------------------------------------------------------------------------------
def _alpha_is_rank(meta: dict[str, str]) -> None:
    """After folding, the trainer's alpha is the rank: say so in ss_network_alpha and in
    ss_network_args' conv_alpha (written as sd-scripts writes them, a float after an int dim)."""
    def like_alpha(dim: str) -> str:
        try:
            return str(float(int(dim)))
        except ValueError:
            return dim  # "Dynamic" and the like

    if "ss_network_alpha" in meta and "ss_network_dim" in meta:
        meta["ss_network_alpha"] = like_alpha(meta["ss_network_dim"])
    try:
        args = json.loads(meta.get("ss_network_args", ""))
    except ValueError:
        return
    if isinstance(args, dict) and "conv_alpha" in args and "conv_dim" in args:
        args["conv_alpha"] = like_alpha(str(args["conv_dim"]))
        meta["ss_network_args"] = json.dumps(args)


def output_metadata(stored: dict[str, str], source: Path, target: str | None, extra: dict[str, str],
                    autov3: str | None = None, arch: str | None = None, folded: bool = False, *,
                    strip: bool = False, checkpoint: bool = False) -> dict[str, str]:
    """Return an output's metadata: the input's carried forward (never stale hashes), adapted to the
    target layout (and to folded scales), with `extra` and lytools' provenance (the input's AutoV3) added.
    strip (--strip-metadata): only what lytools.io.metadata.stripped keeps of that (`checkpoint`: the
    output is a checkpoint), and the input is not hashed."""
    # a layout's LoraConfig is rebuilt from the tensors' scales (diffusers) or carried in alpha tensors
    meta = carried(stored) if target is None else carried_into_tensors(stored)
    if folded:
        _alpha_is_rank(meta)
    if "modelspec.implementation" in meta and target in ("diffusers", "peft"):
        meta["modelspec.implementation"] = "diffusers"  # the names are diffusers module paths now
    elif "modelspec.implementation" in meta and target == "kohya" and arch in IMPLEMENTATIONS:
        meta["modelspec.implementation"] = IMPLEMENTATIONS[arch]
    meta.update(extra)
    if strip:
        return stripped(meta, checkpoint=checkpoint)
    if autov3 is None and source.name.lower().endswith(".safetensors"):
        autov3 = file_hashes(source).data_sha256
    return add_provenance(meta, sources=[source_entry(source, autov3)])


# -- one network ----------------------------------------------------------------------------------------
def convert_file(source: Path, output: Path, options: ConvertOptions) -> FileResult:
    """Convert one network to `options.target` (and dtype) and write it atomically."""
    started = time.perf_counter()
    result = FileResult(source)
    from lytools.convert.load import load_network
    from lytools.convert.write import convert_network

    net = load_network(source, arch=options.arch, hash_data=not options.strip_metadata)
    if not net.modules:
        raise LytoolsError(f"{source}: no network modules found (a checkpoint? cast checkpoints with --save-dtype and no --to)")
    result.notes.extend(net.notes)
    if net.tied:  # detection states the tie; this command is the one that can be told which
        result.notes.append("say which with --arch (" + " or ".join(net.tied) + ")")
    result.details.append(f"read as a {net.layout} {net.arch} network of {len(net.modules)} modules"
                          + (f", {len(net.stray)} stray keys" if net.stray else ""))
    if options.flatten_dora or options.target == "kohya":  # DoRA: flattened, or the UIs' caveat
        from lytools.convert.dora import prepare

        net = prepare(net, options, result)
    converted = convert_network(net, options.target, fold=options.fold, save_dtype=options.save_dtype,
                                component=options.component)
    result.notes.extend(converted.notes)
    stored = dict(net.metadata)
    if options.target == "kohya" and any(k in stored for k in _ADAPTER_KEYS):
        result.notes.append("lora_adapter_metadata dropped: its scales are in the alpha tensors now")
    if options.target == "peft":
        adapter, config_path = peft_paths(output)
        meta = output_metadata(stored, source, options.target, {"format": "pt"}, net.data_sha256, net.arch, converted.folded,
                               strip=options.strip_metadata)
        from lytools.arch.detect import arch_from_metadata
        if arch_from_metadata(meta) is None and net.arch in MODELSPEC_ARCHITECTURES and not options.strip_metadata:
            # a peft adapter's names lose the component, and a CLIP-L one fits sd1, sdxl, sd3 and
            # flux alike: say which model it was for, so that it converts back without --arch
            meta["modelspec.architecture"] = MODELSPEC_ARCHITECTURES[net.arch] + "/lora"
        elif options.strip_metadata and ((options.component or "").startswith("te")
                                         or all(name.startswith("lora_te") for name in net.modules)):
            result.notes.append(f"--strip-metadata: the adapter does not record that it is for {net.arch}, which its text-"
                                f"encoder paths cannot tell; converting it back needs --arch {net.arch}")
        made_folder = adapter.parent != output.parent and not adapter.parent.exists()
        if made_folder:
            adapter.parent.mkdir()
        try:
            _write_peft(adapter, config_path, converted.tensors, meta, converted.adapter_config, options.overwrite,
                        durable=options.fsync)
        except BaseException:
            if made_folder and not any(adapter.parent.iterdir()):
                adapter.parent.rmdir()
            raise
        result.outputs = [adapter, config_path]
    else:
        meta = output_metadata(stored, source, options.target, converted.metadata, net.data_sha256, net.arch,
                               converted.folded, strip=options.strip_metadata)
        write_network(output, converted.tensors, meta, overwrite=options.overwrite, durable=options.fsync,
                      sshs=options.target == "kohya" and not options.strip_metadata)
        result.outputs = [output]
    result.seconds = time.perf_counter() - started
    return result


def write_network(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], *, overwrite: bool,
                  durable: bool = True, sshs: bool = True) -> None:
    """Write a network atomically, with fresh sshs_model_hash / sshs_legacy_hash (hashed as written)
    or, with sshs=False, none: diffusers and peft never read them, and A1111/Forge hash the file
    themselves (the same data-section SHA-256) when a network has none. Stale ones are never kept."""
    entries = [plan_entry(name, tensor.dtype, tuple(tensor.shape)) for name, tensor in tensors.items()]
    if not sshs:
        metadata = {key: value for key, value in metadata.items() if not key.startswith("sshs_")}
    writer = SafetensorsWriter(path, entries, metadata, overwrite=overwrite, sshs=sshs, durable=durable)
    with writer:
        for name in writer.order:
            writer.write(name, tensors[name])


def _write_peft(adapter: Path, config_path: Path, tensors, metadata, config, overwrite: bool, durable: bool = True) -> None:
    """Write the adapter and its config; the config appears only once the adapter is complete."""
    check_output_path(adapter, overwrite)
    check_output_path(config_path, overwrite)
    temp = temp_path(config_path, hidden=True)
    try:
        with open(temp, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(config, indent=2, sort_keys=True) + "\n")
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        write_network(adapter, tensors, metadata, overwrite=overwrite, durable=durable, sshs=False)
        try:
            os.replace(temp, config_path)
        except OSError:
            adapter.unlink(missing_ok=True)
            raise
    finally:
        temp.unlink(missing_ok=True)


# -- dtype only (networks and checkpoints) -----------------------------------------------------------------
_SCALED_FP8_MARKERS = ("scaled_fp8", ".scale_weight", ".weight_scale", ".input_scale")


PRECISE_SUFFIXES = (f".{ALPHA}", f".{DORA}", ".lora_magnitude_vector")  # kept float32 when casting to fp8


def cast_file(source: Path, output: Path, dtype: torch.dtype, *, overwrite: bool = False, durable: bool = True,
              keep_ema: bool = False, strip_metadata: bool = False) -> FileResult:
    """Write `source` with every floating tensor in `dtype`, streaming tensor by tensor.

    Integer and bool tensors keep their dtype; values beyond the target's finite range (fp16, fp8)
    saturate to it, with a note.
    Files whose embedded sshs hashes A1111 reads (networks) get them recomputed; other stale
    hashes are dropped. Scaled-fp8 checkpoints (per-tensor scale siblings) are refused: their
    true weights are fp8 x scale and a plain cast would change them.
    strip_metadata: only what lytools.io.metadata.stripped keeps (for a network or a checkpoint), no hashes.
    """
    import torch

    from lytools.convert.write import cast, rounds_scalar
    from lytools.io.pickled import PickledFile

    started = time.perf_counter()
    result = FileResult(source)
    with open_file(source, keep_ema=keep_ema) as reader:
        if isinstance(reader, PickledFile):
            result.notes.extend(reader.notes())  # read whole into memory / EMA copy left out
        if keep_ema and not (isinstance(reader, PickledFile) and reader.ema_count):
            result.notes.append("--keep-ema changes nothing here: only a pickled checkpoint's EMA copy (model_ema.*) "
                                "is left out by default, and this file holds none")
        keys = list(reader.keys())
        result.details.append(f"{len(keys)} tensors cast to {st_name(dtype)}, streamed")
        marked = [k for k in keys if k == "scaled_fp8" or k.endswith(_SCALED_FP8_MARKERS[1:])]
        if marked:
            raise UnsupportedError(f"{source}: scaled fp8 file ({marked[0]}): its weights are fp8 x scale; "
                                   f"a plain dtype cast would change them")
        stored = dict(reader.metadata or {})
        if strip_metadata:
            from lytools.merge.inputs import looks_like_network

            checkpoint = isinstance(reader, DiffusersFolder) or not looks_like_network(keys)
            meta = output_metadata(stored, source, None, {}, strip=True, checkpoint=checkpoint)
        else:
            meta = output_metadata(stored, source, None, {})
        # a peft adapter's scale is in its adapter_config.json (lora_alpha, alpha_pattern): it goes beside the cast
        config_source = peft_config_path(source) if any(".lora_A." in key for key in keys) else None
        config_output = peft_paths(output)[1] if config_source is not None else None
        if config_output is not None and config_output.resolve() == config_source.resolve():
            raise UsageError(f"{output}: its adapter config would be {config_output}, the input's own; choose another name")
        if config_output is not None:
            check_output_path(config_output, overwrite)
        infos = {info.name: info for info in reader.infos()}
        # a network's alphas and DoRA magnitudes are not narrowed to fp8 (as with --to): an fp8 alpha
        # of 11 would read 12, every module's scale off by 9%
        precise = {name for name in infos if name.endswith(PRECISE_SUFFIXES)} if dtype.itemsize == 1 else set()
        # an alpha fp16/bf16 would round stays float32 too (one value each: read now, for the plan)
        precise |= {name for name, info in infos.items() if name.endswith(PRECISE_SUFFIXES[0]) and info.shape in ((), (1,))
                    and is_float(info.torch_dtype) and rounds_scalar(reader.get(name), dtype)}
        planned = []
        for name, info in infos.items():
            out_dtype = (torch.float32 if name in precise else dtype) if is_float(info.torch_dtype) else info.torch_dtype
            planned.append(plan_entry(name, out_dtype, info.shape))
        saturated = 0

        def produce(name: str) -> torch.Tensor:
            nonlocal saturated
            tensor = reader.get(name)
            if name in precise:
                return cast(tensor, dtype, keep_precise=True)
            if is_float(tensor.dtype):
                out, beyond = saturating_cast(tensor, dtype)  # fp16 too: never an inf the input lacked
                saturated += beyond
                return out
            return cast(tensor, dtype)

        if isinstance(reader, DiffusersFolder):  # a diffusers folder is written as a folder like it
            writer = FolderWriter(output, reader, planned, meta, overwrite=overwrite, strip_metadata=strip_metadata)
        else:
            # embedded sshs hashes are recomputed as the data streams past (the whole file in memory
            # before: a checkpoint that carried them cost its full size in RAM)
            writer = SafetensorsWriter(output, planned, meta, overwrite=overwrite, durable=durable,
                                       sshs="sshs_model_hash" in stored and not strip_metadata)
        with writer:
            for name in writer.order:
                writer.write(name, produce(name))
        if config_output is not None:
            _copy_peft_config(config_source, config_output, output, strip_metadata, durable)
            result.notes.append(f"{config_source.name} written beside it as {config_output.name} (the adapter's scale)")
    if saturated:
        result.notes.append(f"{saturated} tensors had values beyond the {st_name(dtype)} range "
                            f"and were saturated to ±{torch.finfo(dtype).max:g}")
    result.outputs = [output] if config_output is None else [output, config_output]
    result.seconds = time.perf_counter() - started
    return result


def _copy_peft_config(source: Path, config_path: Path, adapter: Path, strip_metadata: bool, durable: bool) -> None:
    """Write a cast peft adapter's config (with --strip-metadata, less the base model's name, often a
    local path); the adapter written just before is removed when this fails."""
    try:
        text = source.read_text(encoding="utf-8")
        if strip_metadata:
            config = json.loads(text)
            for key in ("base_model_name_or_path", "revision"):
                if key in config:
                    config[key] = None
            text = json.dumps(config, indent=2, sort_keys=True) + "\n"
        write_text_atomic(config_path, text, durable)
    except (OSError, ValueError, LytoolsError) as exc:
        adapter.unlink(missing_ok=True)
        raise LytoolsError(f"{source}: cannot write its copy {config_path}: {exc}") from None


def process(source: Path, output: Path, options: ConvertOptions) -> FileResult:
    """Run one input, then --check / --verify on what it wrote (lytools.convert.check.examine, which
    removes the output when they fail); a LytoolsError becomes the result's error (the batch goes on)."""
    if not (options.check or options.verify):
        return _process(source, output, options)
    if options.check and options.target is None:  # a checkpoint is refused before it is cast, not after
        from lytools.convert.check import precheck_cast

        try:
            precheck_cast(source)
        except LytoolsError as exc:
            return _failed(source, exc)
    existed = output.exists()
    result = _process(source, output, options)
    if result.error is None:
        started = time.perf_counter()
        try:
            from lytools.convert.check import examine

            examine(source, output, result, options, folder_existed=existed)
        except (LytoolsError, MemoryError, OSError) as exc:
            return _failed(source, exc)
        result.seconds += time.perf_counter() - started
    return result


def _process(source: Path, output: Path, options: ConvertOptions) -> FileResult:
    """Convert or cast one input; a LytoolsError becomes the result's error."""
    try:
        if options.target is None:
            if options.save_dtype is None:
                raise LytoolsError("nothing to do: give --to LAYOUT and/or --save-dtype DTYPE")
            with one_torch_thread():
                return cast_file(source, output, options.save_dtype, overwrite=options.overwrite, durable=options.fsync,
                                 keep_ema=options.keep_ema, strip_metadata=options.strip_metadata)
        if options.target not in TARGETS:
            raise LytoolsError(f"unknown target layout {options.target!r} (kohya, diffusers, peft)")
        from lytools.convert.fast import try_convert

        # plain LoRAs to diffusers, without torch (--flatten-dora checks every file against its base)
        fast = None if options.flatten_dora else try_convert(source, output, options)
        if fast is not None:
            return fast
        with one_torch_thread():
            return convert_file(source, output, options)
    except (LytoolsError, MemoryError, OSError) as exc:
        return _failed(source, exc)


def _failed(source: Path, exc: Exception) -> FileResult:
    """Return the result of a file that failed: a lytools error's one line, naming the file when it does
    not already; a memory or I/O error with its kind. LYTOOLS_DEBUG=1 prints its traceback first."""
    print_debug_traceback(exc)
    if isinstance(exc, LytoolsError):
        message = str(exc)
        return FileResult(source, error=message if str(source) in message else f"{source}: {message}")
    if isinstance(exc, OSError):
        line = os_error_line(exc)
        return FileResult(source, error=line if line.startswith(f"{source}: ") else f"{source}: {line}")
    return FileResult(source, error=f"{source}: {type(exc).__name__}: {exc}")


@contextlib.contextmanager
def one_torch_thread():
    """Run torch work of one file on one thread (network tensors are small: thread wake-ups cost
    more than they give), restoring the count afterwards; imports torch."""
    import torch

    before = torch.get_num_threads()
    if before != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if before != 1:
            torch.set_num_threads(before)


_STOPPING = None  # in a pool worker: the batch's Event, set by the parent when it is interrupted


def _worker_init(stopping=None) -> None:
    global _STOPPING
    _STOPPING = stopping
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"  # for a torch imported later
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # between files: Ctrl-C is the parent's to handle


def _process_in_worker(source: Path, output: Path, options: ConvertOptions) -> FileResult:
    """process() in a pool worker: Ctrl-C interrupts the file under way (its temporary output is
    removed), while a worker waiting for its next file ignores it; a file handed over after the
    parent was interrupted is not started."""
    if _STOPPING is not None and _STOPPING.is_set():
        raise KeyboardInterrupt
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return process(source, output, options)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


PREFETCH_LIMIT = 256 << 20  # inputs up to this size are read ahead while earlier ones convert


def prefetch(path: Path) -> None:
    """Ask the kernel to start reading a network-sized input into the page cache in the background
    (Linux posix_fadvise WILLNEED; nothing elsewhere), so a batch does not wait on the disk."""
    advise = getattr(os, "posix_fadvise", None)
    if advise is None:
        return
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode) or info.st_size > PREFETCH_LIMIT:
            return  # never open a pipe or device (that could block or consume it)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return  # the conversion itself reports unreadable inputs
    try:
        advise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


def run_batch(pairs: Sequence[tuple[Path, Path]], options: ConvertOptions, *, jobs: int = 1,
              on_done: Callable[[FileResult], None] | None = None) -> list[FileResult]:
    """Convert every (input, output) pair, `jobs` at a time in separate processes; call `on_done`
    with each result as it finishes (in completion order). Returns results in input order.
    The next inputs are read ahead (`prefetch`) while the current ones convert."""
    results: dict[int, FileResult] = {}
    ahead = 0  # inputs prefetched so far

    def read_ahead(upto: int) -> None:
        nonlocal ahead
        while ahead < min(upto, len(pairs)):
            prefetch(pairs[ahead][0])
            ahead += 1

    if jobs <= 1 or len(pairs) <= 1:
        for index, (source, output) in enumerate(pairs):
            read_ahead(index + 2)
            try:
                results[index] = process(source, output, options)
            except Exception as exc:  # noqa: BLE001 - an unexpected failure fails its file, as in a --jobs worker
                if debugging() or len(pairs) == 1:
                    raise  # the traceback asked for; a single file: the CLI's one line says it
                first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
                results[index] = FileResult(source, error=f"{source}: internal error {type(exc).__name__}: {first}")
            if on_done:
                on_done(results[index])
    else:
        import multiprocessing

        from lytools.convert.names import warm_tables

        warm_tables()  # build the name tables once here: the forked workers inherit them
        if options.target == "diffusers":  # the fast path and numpy: imported once here, not once per worker
            importlib.import_module("lytools.convert.fast")
        workers = min(jobs, len(pairs))
        read_ahead(2 * workers)
        context = multiprocessing.get_context("fork")
        stopping = context.Event()
        with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_worker_init,
                                 initargs=(stopping,)) as pool:
            futures = {pool.submit(_process_in_worker, source, output, options): index
                       for index, (source, output) in enumerate(pairs)}
            try:
                for finished, future in enumerate(as_completed(futures), 1):
                    read_ahead(finished + 2 * workers)
                    _collect(future, futures[future], pairs, results, on_done)
            except BaseException:
                # Ctrl-C (or SIGTERM, which the CLI turns into the same): start no other file, let
                # the ones under way end (interrupted in the workers, or done), and report every
                # file that was written, so no output is left behind unannounced
                stopping.set()  # the files already handed to the workers' queue are not started
                pool.shutdown(wait=True, cancel_futures=True)
                for future, index in futures.items():
                    if index not in results and future.done() and not future.cancelled() and future.exception() is None:
                        _collect(future, index, pairs, results, on_done)
                raise
    return [results[i] for i in range(len(pairs))]


def _collect(future, index: int, pairs: Sequence[tuple[Path, Path]], results: dict[int, FileResult],
             on_done: Callable[[FileResult], None] | None) -> None:
    """Record the result of one finished future (a crashed worker fails its file, not the batch)."""
    try:
        results[index] = future.result()
    except Exception as exc:  # noqa: BLE001
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        results[index] = FileResult(pairs[index][0], error=f"{pairs[index][0]}: {type(exc).__name__}: {first}")
    if on_done:
        on_done(results[index])
