"""Model folders read as one file: a diffusers pipeline folder, or a folder holding one model.

A diffusers folder (FORMATS.md 2.1) has `model_index.json` and one sub-folder per component
(`unet/` or `transformer/`, `text_encoder/`, `text_encoder_2/`, `vae/`, ...), each with
`config.json` and its weights: `diffusion_pytorch_model.safetensors` (diffusers components) or
`model.safetensors` (transformers components), possibly sharded (`*.safetensors.index.json`), in
old repositories a pickled `.bin`. `DiffusersFolder` presents every component's tensors under
`<component>.<key>` (`unet.down_blocks.0...`, `text_encoder.text_model...`), the names
architecture detection and the resolver read as the diffusers layout; sub-folders without weights
(tokenizer, scheduler, feature extractor) are not components.

A folder without `model_index.json` opens as the one model it holds: a single diffusers/transformers
weights file, or a single `*.safetensors.index.json`.

`FolderWriter` writes a folder shaped like a DiffusersFolder it was planned from: each component's
weights as one `.safetensors` file, every other file copied, the whole folder built under a
temporary name beside the target and renamed into place when complete (nothing left on failure).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping

from lytools.errors import FileFormatError, LytoolsError, OutputExistsError
from lytools.io.safetensors import MultiFileReader

if TYPE_CHECKING:
    import torch

    from lytools.io.writer import PlannedTensor

WEIGHT_STEMS = ("diffusion_pytorch_model", "model")
PICKLED_WEIGHTS = ("diffusion_pytorch_model.bin", "pytorch_model.bin")
DENOISERS = ("unet", "transformer", "prior", "decoder")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".index.json", ".ckpt", ".pt", ".pth", ".msgpack", ".h5", ".onnx", ".onnx_data", ".gguf")


def weights_file(folder: Path) -> Path | None:
    """Return the weights file of one model folder (single file before an index, safetensors before
    a pickle), or None when it holds none of the known names."""
    for stem in WEIGHT_STEMS:
        for suffix in (".safetensors", ".safetensors.index.json"):
            candidate = folder / (stem + suffix)
            if candidate.is_file():
                return candidate
    for name in PICKLED_WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    return variant_weights(folder)


_VARIANT_FILE = re.compile(r"^(?:%s)\.([A-Za-z0-9_]+)\.safetensors$" % "|".join(WEIGHT_STEMS))
_VARIANT_INDEX = re.compile(r"^(?:%s)\.safetensors\.index\.([A-Za-z0-9_]+)\.json$" % "|".join(WEIGHT_STEMS))


def variant_weights(folder: Path) -> Path | None:
    """Return the weights of a folder holding only a diffusers `variant` (`diffusion_pytorch_model.fp16.safetensors`,
    `model.fp16.safetensors`, or a variant index `diffusion_pytorch_model.safetensors.index.fp16.json`), None when
    it holds none; more than one variant is ambiguous (FileFormatError naming them)."""
    found: dict[str, Path] = {}
    for file in sorted(folder.iterdir()) if folder.is_dir() else ():
        single, index = _VARIANT_FILE.match(file.name), _VARIANT_INDEX.match(file.name)
        match = single or index
        if match and file.is_file() and (single or match.group(1) not in found):
            found[match.group(1)] = file  # a single file wins over an index of the same variant
    if len(found) > 1:
        raise FileFormatError(f"{folder}: weights in {len(found)} variants ({', '.join(sorted(found))}) and none "
                              "under the default name; name the file to read")
    return next(iter(found.values()), None)


def peft_config_path(path: Path) -> Path | None:
    """Return the adapter_config.json that belongs to a peft adapter file, if there is one."""
    stem = path.name[: -len(".safetensors")] if path.name.lower().endswith(".safetensors") else path.stem
    beside = path.with_name(stem + ".adapter_config.json")
    for candidate in (beside, path.parent / "adapter_config.json"):
        if os.path.isfile(candidate):  # False, not an error, for a name too long to exist
            return candidate
    return None


PEFT_ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")  # what peft's save_pretrained writes (.bin: older peft)


def peft_adapter_file(path: str | os.PathLike) -> Path | None:
    """Return the adapter file of `path` when it is a peft adapter folder (what `save_pretrained` and
    `convert --to peft` write), else None: its adapter_model.safetensors when the folder holds no diffusers
    pipeline and no model weights or index, or the adapter_model.bin older peft saved, beside an
    adapter_config.json. Commands read that file, and its adapter_config.json beside it gives the scale."""
    path = Path(path)
    if not path.is_dir() or (path / "model_index.json").exists():
        return None
    adapter, pickled = (path / name for name in PEFT_ADAPTER_FILES)
    if adapter.is_file() and weights_file(path) is None and not any(path.glob("*.safetensors.index.json")):
        return adapter
    if pickled.is_file() and (path / "adapter_config.json").is_file():
        return pickled
    return None


def open_folder(path: Path):
    """Open a folder: a diffusers pipeline (model_index.json) or the one model it holds."""
    if (path / "model_index.json").is_file():
        return DiffusersFolder(path)
    weights = weights_file(path)
    if weights is None:
        indexes = sorted(path.glob("*.safetensors.index.json"))
        if len(indexes) == 1:
            weights = indexes[0]
        elif len(indexes) > 1:
            raise FileFormatError(f"{path}: a folder with {len(indexes)} safetensors indexes; name the one to read")
    if weights is None and (path / PEFT_ADAPTER_FILES[0]).is_file():
        # the commands give the adapter file for such a folder (peft_adapter_file), so that its config is found
        raise FileFormatError(f"{path}: a peft adapter folder (a network), not a model; commands that read "
                              "networks take it, or its adapter_model.safetensors")
    if weights is None:
        raise FileFormatError(f"{path}: a directory that is neither a diffusers folder (no model_index.json) nor holds "
                              "a model (no diffusion_pytorch_model/model .safetensors or *.safetensors.index.json)")
    return _open_weights(weights)


_SHARD_NAME = re.compile(r"-\d+-of-\d+\.safetensors$")


def lone_shard(path: str | os.PathLike) -> str | None:
    """Return a one-line error when `path` is one shard of a sharded checkpoint (an index beside it
    names it), else None. For commands that need the whole model (extract, merge into it); info and
    casting read a shard on its own."""
    path = Path(path)
    if not path.is_file() or not _SHARD_NAME.search(path.name):
        return None
    indexes = [p for p in sorted(path.parent.glob("*.safetensors.index*.json"))
               if p.name.endswith(".safetensors.index.json") or _VARIANT_INDEX.match(p.name)]
    for index in indexes:
        try:
            weight_map = json.loads(index.read_text()).get("weight_map") or {}
            shards = set(weight_map.values()) if isinstance(weight_map, dict) else set()
        except (OSError, ValueError, AttributeError, TypeError):
            continue
        if path.name in shards:
            return (f"{path}: one of the {len(shards)} shards of {index.name}; give the index "
                    f"(or the folder {path.parent.name or '.'}) to read the whole model")
    return None


def _open_weights(path: Path):
    from lytools.io import ShardedFile, open_file

    if _VARIANT_INDEX.match(path.name):  # `*.safetensors.index.fp16.json`: not a `.index.json` name
        return ShardedFile(path)
    return open_file(path)


def _disabled(entry: object) -> bool:
    """True for a model_index.json component set to null (`[null, null]` or `null`): the pipeline
    does not load it, so neither does lytools (its folder may be a leftover)."""
    return entry is None or (isinstance(entry, list) and all(part is None for part in entry))


class DiffusersFolder(MultiFileReader):
    """A diffusers pipeline folder opened as one file: keys `<component>.<key>` (see module doc)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        index_path = self.path / "model_index.json"
        try:
            index = json.loads(index_path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise FileFormatError(f"{index_path}: not a readable model_index.json ({type(exc).__name__})") from None
        if not isinstance(index, dict):
            raise FileFormatError(f"{index_path}: not a JSON object")
        self.components: dict[str, object] = {}  # component -> open file, in model_index order
        self.weights: dict[str, Path] = {}
        try:
            for name in index:
                if name.startswith("_") or not (self.path / name).is_dir() or _disabled(index[name]):
                    continue
                folder = self.path / name
                weights = weights_file(folder)
                if weights is None:
                    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors*")):
                        raise FileFormatError(f"{folder}: no diffusion_pytorch_model or model .safetensors (nor a "
                                              "variant of them); name the weights file to read")
                    if (folder / "config.json").is_file() and any(folder.glob("*.bin")):
                        raise FileFormatError(f"{folder}: weights under a name lytools does not know")
                    continue  # tokenizer, scheduler, feature extractor: no weights
                self.components[name] = _open_weights(weights)
                self.weights[name] = weights
        except BaseException:
            self.close()
            raise
        if not self.components:
            raise FileFormatError(f"{self.path}: a diffusers folder without any component weights")
        denoiser = next((c for c in DENOISERS if c in self.components), None)
        self.denoiser = denoiser
        self.metadata: dict[str, str] = dict(self.components[denoiser].metadata or {}) if denoiser else {}
        self._where = {}
        for component, handle in self.components.items():
            for key in handle.keys():
                self._where[f"{component}.{key}"] = (handle, key)

    def _files(self):
        return self.components.values()

    @property
    def file_bytes(self) -> int:
        """Bytes of every weights file read (shards included)."""
        total = 0
        for handle in self.components.values():
            total += getattr(handle, "file_bytes", None) or handle.path.stat().st_size
        return total

    def component_of(self, name: str) -> tuple[str, str]:
        """(component, key inside the component's file) of a folder key; a name the folder lacks (a
        bias a merge creates) goes to the component its prefix names."""
        if name not in self._where:
            component, _, key = name.partition(".")
            if component in self.components and key:
                return component, key
        handle, key = self._locate(name)
        return next(component for component, opened in self.components.items() if opened is handle), key


def output_name(weights: Path) -> str:
    """The single-file name a component's weights are written under (shards and pickles become one .safetensors)."""
    name = weights.name
    for stem in WEIGHT_STEMS:
        if name.startswith(stem + "."):
            return stem + ".safetensors"
    return "model.safetensors"


class FolderWriter:
    """Write a diffusers folder shaped like `source` (see the module docstring).

    `entries` plan every output tensor under its folder name (`<component>.<key>`); `order` is the
    order to write them in (component by component, each in file order). `metadata` goes into the
    denoiser's file (the first component when there is none); the other files keep their own
    (`strip_metadata`: only what lytools.io.metadata.stripped keeps of it, as for a checkpoint).
    """

    def __init__(self, out: str | os.PathLike, source: DiffusersFolder, entries: Iterable[PlannedTensor],
                 metadata: Mapping[str, str] | None, *, overwrite: bool = False, strip_metadata: bool = False):
        from lytools.io.metadata import stripped
        from lytools.io.writer import SafetensorsWriter, temp_path

        self.path = Path(out)
        self.source = source
        check_folder_output(self.path, overwrite)
        self.overwrite = overwrite
        self._temp = temp_path(self.path, hidden=True)
        self._main = source.denoiser or next(iter(source.components))
        grouped: dict[str, list[PlannedTensor]] = {c: [] for c in source.components}
        for entry in entries:
            component, key = source.component_of(entry.name)
            grouped[component].append(dataclasses.replace(entry, name=key))
        if self._temp.exists():
            shutil.rmtree(self._temp)
        try:
            _copy_tree_without_weights(source, self._temp, strip_metadata)
            self._writers: dict[str, SafetensorsWriter] = {}
            for component, planned in grouped.items():
                meta = metadata if component == self._main else dict(source.components[component].metadata or {})
                if strip_metadata and component != self._main:
                    meta = stripped(meta, checkpoint=True)
                target = self._temp / component / output_name(source.weights[component])
                self._writers[component] = SafetensorsWriter(target, planned, meta, overwrite=True)
        except BaseException:
            shutil.rmtree(self._temp, ignore_errors=True)
            raise
        self.order = [f"{component}.{key}" for component, writer in self._writers.items() for key in writer.order]
        self._open: list = []

    def __enter__(self) -> "FolderWriter":
        try:
            for writer in self._writers.values():
                writer.__enter__()
                self._open.append(writer)
        except BaseException:
            self.__exit__(*__import__("sys").exc_info())
            raise
        return self

    def write(self, name: str, tensor: torch.Tensor) -> None:
        component, key = self.source.component_of(name)
        self._writers[component].write(key, tensor)

    def patch_metadata(self, metadata: Mapping[str, str]) -> None:
        self._writers[self._main].patch_metadata(metadata)

    def __exit__(self, exc_type, exc, tb) -> None:
        failed = exc_type is not None
        try:
            for writer in self._open:
                writer.__exit__(exc_type, exc, tb) if failed else writer.__exit__(None, None, None)
        except BaseException:
            shutil.rmtree(self._temp, ignore_errors=True)
            raise
        if failed:
            shutil.rmtree(self._temp, ignore_errors=True)
            return
        try:
            _replace_folder(self._temp, self.path, self.overwrite)
        except BaseException:
            shutil.rmtree(self._temp, ignore_errors=True)
            raise


def check_folder_output(path: Path, overwrite: bool) -> None:
    """Refuse an output folder that exists (unless overwrite), is a file, or whose parent is missing."""
    if path.suffix.lower() in (".safetensors", ".ckpt", ".pt", ".pth", ".bin"):
        raise LytoolsError(f"{path}: the output of a diffusers folder is a folder like it; give a folder name, "
                           f"not a {path.suffix} file name")
    if path.exists() and not path.is_dir():
        raise LytoolsError(f"{path}: exists and is not a folder (the output of a diffusers folder is a folder)")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path}: already exists (use --overwrite to replace it)")
    if path.exists() and not (path / "model_index.json").is_file():
        raise LytoolsError(f"{path}: refusing to replace a folder that is not a diffusers folder")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise LytoolsError(f"{path}: {parent} is a file, not a folder" if parent.exists() else f"{path}: folder {parent} does not exist")


def _copy_tree_without_weights(source: DiffusersFolder, temp: Path, strip_metadata: bool = False) -> None:
    """Copy the pipeline folder except the weights of its components (and hidden files); with
    `strip_metadata`, JSON configs lose `_name_or_path` (where the files were loaded from, often a
    local path: transformers writes it into config.json; diffusers and transformers fill it in
    again on loading)."""
    skip: set[Path] = set()
    for component, weights in source.weights.items():
        skip.add(weights.resolve())
        if weights.name.endswith(".index.json"):
            handle = source.components[component]
            for shard in getattr(handle, "shard_paths", ()):
                skip.add(Path(shard).resolve())
    root = source.path
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = Path(folder).relative_to(root)
        (temp / rel).mkdir(parents=True, exist_ok=True)
        for name in files:
            file = Path(folder) / name
            # other weights (fp16 variants, flax, single-file copies) would be stale: not copied
            if (name.startswith(".") or file.resolve() in skip or name.lower().endswith(WEIGHT_SUFFIXES)
                    or _VARIANT_INDEX.match(name)):
                continue
            if strip_metadata and name.lower().endswith(".json") and _write_without_origin(file, temp / rel / name):
                continue
            shutil.copy2(file, temp / rel / name)


ORIGIN_KEY = "_name_or_path"


def _write_without_origin(source: Path, target: Path) -> bool:
    """Write the JSON object in `source` to `target` without its top-level `_name_or_path`; False
    (nothing written) when the file is not such an object or has no such key."""
    try:
        text = source.read_text(encoding="utf-8")
        if ORIGIN_KEY not in text:
            return False
        config = json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return False
    if not isinstance(config, dict) or ORIGIN_KEY not in config:
        return False
    del config[ORIGIN_KEY]
    target.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return True


def _replace_folder(temp: Path, target: Path, overwrite: bool) -> None:
    if target.exists():
        if not overwrite:
            raise OutputExistsError(f"{target}: already exists (use --overwrite to replace it)")
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        os.rename(target, old)
        os.rename(temp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(temp, target)
