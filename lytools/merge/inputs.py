"""Merge inputs: which file is a checkpoint and which a network, and networks loaded as modules."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch

from lytools.algos import ModuleInfo, NetworkModule, check_finite, describe_module
from lytools.errors import LytoolsError, NetworkError
from lytools.io import PICKLE_SUFFIXES, file_hashes, open_file

# key endings that only network files use (kohya/LyCORIS, diffusers/peft, old diffusers)
NETWORK_KEY_ENDINGS = (
    ".lora_up.weight", ".lora_down.weight", ".lora_mid.weight", ".alpha", ".lora_A.weight", ".lora_B.weight",
    ".lora.up.weight", ".lora.down.weight", "_lora.up.weight", "_lora.down.weight", ".lora_A", ".lora_B",
    ".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight", ".hada_w1_a", ".hada_w1_b",
    ".hada_w2_a", ".hada_w2_b", ".hada_t1", ".hada_t2", ".lokr_w1", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2",
    ".lokr_w2_a", ".lokr_w2_b", ".lokr_t2", ".diff", ".diff_b", ".oft_blocks", ".oft_diag", ".rescale",
    ".w_norm", ".b_norm", ".on_input", ".a1.weight", ".a2.weight", ".b1.weight", ".b2.weight", ".dora_scale",
    ".lora_magnitude_vector", ".lambda_layer", ".q_layer.weight", ".p_layer.weight", ".bias_indices",
    ".bias_values", ".bias_size", ".lora_B.bias",
    "_lora1.down.weight", "_lora1.up.weight", "_lora2.down.weight", "_lora2.up.weight",  # xlabs Flux processors
)


def looks_like_network(keys: Iterable[str]) -> bool:
    """True when most keys are network-module keys (a checkpoint has none of these endings)."""
    keys = list(keys)
    if not keys:
        return False
    hits = sum(1 for key in keys if key.endswith(NETWORK_KEY_ENDINGS))
    return hits * 2 >= len(keys)


def kind_of(keys: Iterable[str]) -> str:
    """Return "network", "checkpoint" or "empty" (no tensors) from a file's keys."""
    keys = list(keys)
    if not keys:
        return "empty"
    return "network" if looks_like_network(keys) else "checkpoint"


def file_kind(path: Path) -> str:
    """Return "network", "checkpoint" or "empty" (no tensors) from the file's keys (header only for safetensors)."""
    with open_file(path) as handle:
        return kind_of(handle.keys())


@dataclass
class NetworkInput:
    """One network file, loaded: canonical module names -> tensors (CPU), what each module is."""

    path: Path
    modules: dict[str, NetworkModule]
    infos: dict[str, ModuleInfo]
    metadata: dict[str, str]
    stray: list[str] = field(default_factory=list)
    autov3: str | None = None
    arch: str = "unknown"  # as lytools.convert.load_network detected it (unknown: a tie or no fit)
    tied: tuple[str, ...] = ()  # with arch unknown: the architectures its modules fit equally (Network.tied)
    unmapped: tuple[str, ...] = ()  # stored module names no name table knows, kept as stored (Network.unmapped)

    @property
    def name(self) -> str:
        return self.path.name


def kohya_named(path: Path, network, *, arch: str | None = None, reader=None):
    """Return `network` (a lytools.convert Network) with kohya names for the modules a tie left under their
    diffusers/peft paths (`unmapped`), where they have one: read as `arch` (the architecture the other inputs
    of a merge name), else as each tied architecture, when all of them name every module alike (CLIP-L+CLIP-G
    fits sdxl and sd3, both lora_te1_/lora_te2_). Otherwise `network` unchanged: a CLIP-L-only one is lora_te_
    for sd1 and lora_te1_ for sdxl (resize and merge then refuse it: check_kohya_names)."""
    from lytools.convert import load_network

    if not (network.tied and network.unmapped):
        return network
    archs = [arch] if arch is not None else list(network.tied)
    readings = [load_network(path, arch=each, hash_data=False, reader=reader) for each in archs]
    if any(reading.unmapped for reading in readings) or len({frozenset(reading.modules) for reading in readings}) > 1:
        return network
    named = readings[0]
    named.arch, named.tied, named.notes = network.arch, network.tied, list(network.notes)
    return named


def check_kohya_names(path: Path, network, arch: str | None = None) -> None:
    """Refuse a network whose modules fit several architectures equally and keep their diffusers/peft paths
    (no kohya name they agree on: kohya_named): written with kohya factors under those paths no loader reads
    them, and next to another input's kohya names they would spell the same layers twice."""
    if network.tied and network.unmapped:
        raise NetworkError(
            f"{path}: {len(network.unmapped)} module(s) have no kohya name ({network.unmapped[0]}): they fit "
            f"{' and '.join(network.tied)} equally; name them first with lytools convert {path.name} --to kohya "
            f"--arch {arch or 'ARCH'}"
        )


def _load_modules(
    path: Path, reader=None, arch: str | None = None, keep_parts: bool = False,
) -> tuple[dict[str, NetworkModule], dict[str, str], list[str], str, tuple[str, ...], tuple[str, ...]]:
    """Return (modules, metadata, stray keys, arch, tied, unmapped) through lytools.convert's reader (any key style),
    from `reader` (the file already open) when given; tied diffusers names in kohya names where known (kohya_named).
    keep_parts: q/k/v parts that do not fuse into one kohya module stay modules of their own (load_network)."""
    from lytools.convert import load_network  # the one reader of every network key style

    # merge hashes inputs itself (file_hashes), when it records them
    network = load_network(path, hash_data=False, reader=reader, keep_parts=keep_parts)
    network = kohya_named(path, network, arch=arch, reader=reader)
    return (dict(network.modules), dict(network.metadata), list(network.stray), network.arch, tuple(network.tied),
            tuple(network.unmapped))


def named_for(network: NetworkInput, arch: str | None) -> NetworkInput:
    """Return `network` read again as `arch` (the architecture the other inputs of a merge name) when a tie left
    its modules without kohya names; else `network`. A pickled file is unpickled again for it (a rare case:
    a tied diffusers-named .bin merged with networks that name the architecture)."""
    if arch is None or arch not in network.tied or not network.unmapped:
        return network
    modules, _, stray, _, _, unmapped = _load_modules(network.path, arch=arch)
    infos = {name: describe_module(module) for name, module in modules.items()}
    return NetworkInput(network.path, modules, infos, network.metadata, stray, network.autov3, network.arch,
                        network.tied, unmapped)


def load_network_input(path: str | os.PathLike, *, hash_file: bool = True, keep_parts: bool = False) -> NetworkInput:
    """Return a network input with every module detected; errors name the file. keep_parts (merge into a
    checkpoint): q/k/v parts that do not fuse into one kohya module stay modules of their own, each applied to its
    rows."""
    path = Path(path)
    network = _read_network_input(path, hash_file, keep_parts=keep_parts)
    if network is None:
        raise LytoolsError(f"{path}: no network modules found (is it a checkpoint? checkpoints go first)")
    return network


def _read_network_input(path: Path, hash_file: bool, reader=None, keep_parts: bool = False) -> NetworkInput | None:
    """Return the network input at `path` (read from `reader` when given), or None when it holds no network module."""
    try:
        modules, metadata, stray, arch, tied, unmapped = _load_modules(path, reader, keep_parts=keep_parts)
        infos = {name: describe_module(module) for name, module in modules.items()}
        check_finite(modules)
    except NetworkError as exc:  # named once: load_network's own errors already begin with the path
        message = str(exc)
        raise NetworkError(message if message.startswith(str(path)) else f"{path}: {message}") from None
    if not modules:
        return None
    autov3 = file_hashes(path).data_sha256 if hash_file and path.suffix.lower() == ".safetensors" else None  # as resize, convert
    return NetworkInput(path, modules, infos, metadata, stray, autov3, arch, tied, unmapped)


def is_pickled(path: Path) -> bool:
    """True for a single pickled file (.ckpt/.pt/.pth/.bin/.pkl): reading its keys means unpickling it whole."""
    return path.suffix.lower() in PICKLE_SUFFIXES and path.is_file()


class NetworkInputs:
    """The network inputs of one merge, each pickled one unpickled once for its kind, the merge and --verify.

    A .safetensors network is read again on each use (its kind comes from the header alone); a pickled one
    is loaded when its kind is asked (the first input: from the file run_merge opened for it) and kept for
    the rest of this merge (one per run_merge call).
    """

    def __init__(self) -> None:
        self._pickled: dict[Path, NetworkInput] = {}
        self.keep_parts = False  # into a checkpoint: q/k/v parts that do not fuse stay modules of their own

    def kind(self, path: Path, reader=None) -> str:
        """Return "network", "checkpoint" or "empty" from the file's keys, as file_kind does; from `reader`, the
        file already open (run_merge's first input), when given. A pickled network is loaded from the same
        opening, and a pickled checkpoint among the networks is unpickled once before the caller refuses it."""
        if reader is None:
            if not is_pickled(path):
                return file_kind(path)  # the header alone
            with open_file(path) as handle:
                return self.kind(path, handle)
        found = kind_of(reader.keys())
        if found == "network" and is_pickled(path):
            network = _read_network_input(path, hash_file=False, reader=reader, keep_parts=self.keep_parts)
            if network is not None:  # None: load() reads it again and says that it holds no module
                self._pickled[path] = network
        return found

    def load(self, path: str | os.PathLike, *, hash_file: bool = True) -> NetworkInput:
        """Return the network input at `path` (a pickled one from this merge's earlier load, when there was one)."""
        path = Path(path)
        if path in self._pickled:  # a pickled file has no AutoV3 hash: hash_file changes nothing for it
            return self._pickled[path]
        network = load_network_input(path, hash_file=hash_file, keep_parts=self.keep_parts)
        if is_pickled(path):
            self._pickled[path] = network
        return network


_ARCH_FAMILY = {"chroma": "flux"}  # Chroma is a pruned Flux: Flux-named modules fit it


def family(arch: str | None) -> str | None:
    """Return the architecture whose module names `arch` uses (chroma: flux)."""
    return _ARCH_FAMILY.get(arch, arch) if arch is not None else None


def same_family(first: str, second: str) -> bool:
    """True when modules made for architecture `first` fit `second` (equal, or Chroma and Flux)."""
    return family(first) == family(second)


def candidates(network: NetworkInput) -> set[str] | None:
    """Return the architecture families the network's modules may be for; None when nothing is known.

    A detected architecture is one candidate; a tie (e.g. a CLIP-L+CLIP-G text-encoder-only network: sdxl or
    sd3) gives the tied ones; a network that fits no architecture gives None (not judged)."""
    if network.arch != "unknown":
        return {family(network.arch)}
    if network.tied:
        return {family(arch) for arch in network.tied}
    return None


def detach(modules: dict[str, NetworkModule]) -> dict[str, NetworkModule]:
    """Return modules whose tensors own their memory (not views of a file map)."""
    return {name: NetworkModule(name, {k: t.clone() for k, t in m.tensors.items()}) for name, m in modules.items()}


def as_float(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.float() if tensor.is_floating_point() else tensor
