"""lytools.io: header validation, the atomic writer, dtypes, safe pickles, hashes."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

from lytools.errors import FileFormatError, OutputExistsError, UnsafeFileError, LytoolsError
from lytools.io import (
    SafetensorsWriter,
    plan_layout,
    file_hashes,
    modelspec_hash,
    open_file,
    plan_entry,
    read_header,
    sd_scripts_hashes,
    with_sshs_hashes,
    write_safetensors,
)
from lytools.io.hashes import LEGACY_LENGTH, LEGACY_OFFSET

REPO = Path(__file__).resolve().parents[1]


def raw_file(path: Path, header: dict | bytes, data: bytes = b"", length: int | None = None) -> Path:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(body) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + body + data)
    return path


def entry(dtype: str, shape: list[int], begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


# -- malformed files ---------------------------------------------------------------------------
MALFORMED = {
    "empty": (lambda p: p.write_bytes(b""), "shorter than the 8-byte header length"),
    "five_bytes": (lambda p: p.write_bytes(b"abcde"), "shorter than the 8-byte header length"),
    "header_longer_than_file": (lambda p: raw_file(p, b"{}", length=5000), "exceeds file size"),
    "header_over_limit": (lambda p: raw_file(p, b"{}", length=100_000_001), "100 MB"),
    "invalid_json": (lambda p: raw_file(p, b"{not json"), "not valid JSON"),
    "not_utf8": (lambda p: raw_file(p, b"\xff\xfe{}"), "not UTF-8"),
    "not_an_object": (lambda p: raw_file(p, b"[1, 2]"), "not a JSON object"),
    "unknown_dtype": (lambda p: raw_file(p, {"a": entry("F12", [2], 0, 4)}, b"\0" * 4), "unknown dtype"),
    "shape_size_mismatch": (lambda p: raw_file(p, {"a": entry("F32", [3], 0, 8)}, b"\0" * 8), "needs 12 bytes"),
    "truncated_data": (lambda p: raw_file(p, {"a": entry("F32", [4], 0, 16)}, b"\0" * 10), "truncated"),
    "overlap": (
        lambda p: raw_file(p, {"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 4, 12)}, b"\0" * 12),
        "overlap",
    ),
    "gap": (lambda p: raw_file(p, {"a": entry("F32", [2], 4, 12)}, b"\0" * 12), "gap"),
    "trailing_bytes": (lambda p: raw_file(p, {"a": entry("F32", [2], 0, 8)}, b"\0" * 12), "trailing bytes"),
    "duplicate_keys": (
        lambda p: raw_file(p, b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', b"\0" * 4),
        "duplicate key 'a'",
    ),
    "metadata_not_string": (lambda p: raw_file(p, {"__metadata__": {"x": 1}}), "is not a string"),
    "negative_shape": (lambda p: raw_file(p, {"a": entry("F32", [-1], 0, 0)}), "non-negative"),
    "missing_field": (lambda p: raw_file(p, {"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4), "lacks data_offsets"),
    "text_file": (lambda p: p.write_text("hello, this is not a model at all\n" * 4), "not a safetensors file"),
    "pickle_renamed": (lambda p: torch.save({"a": torch.zeros(2)}, p), "not a safetensors file"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_file_is_one_clear_error(tmp_path, case):
    make, phrase = MALFORMED[case]
    path = tmp_path / f"{case}.safetensors"
    make(path)
    with pytest.raises(FileFormatError) as info:
        read_header(path)
    message = str(info.value)
    assert str(path) in message
    assert phrase in message
    assert "\n" not in message


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(FileFormatError, match="no such file"):
        open_file(tmp_path / "absent.safetensors")
    with pytest.raises(FileFormatError, match="directory"):
        open_file(tmp_path)


def test_reader_matches_safetensors_and_reports_extra_fields(tmp_path):
    tensors = {"w": torch.randn(4, 3), "b": torch.arange(5, dtype=torch.int64), "alpha": torch.tensor(2.0).half()}
    path = tmp_path / "x.safetensors"
    safetensors.torch.save_file(tensors, path, {"k": "v"})
    with open_file(path) as handle:
        assert sorted(handle.keys()) == sorted(tensors)
        assert handle.metadata == {"k": "v"}
        for name, tensor in tensors.items():
            assert torch.equal(handle.get(name), tensor)
        assert torch.equal(handle.get_rows("w", 1, 3), tensors["w"][1:3])
    # an unknown extra field per tensor is ignored by the reader but reported
    raw = tmp_path / "extra.safetensors"
    raw_file(raw, {"a": {**entry("F32", [1], 0, 4), "note": "x"}}, b"\0" * 4)
    assert read_header(raw).extra_fields == {"a": ["note"]}


def test_empty_network_and_zero_sized_tensor(tmp_path):
    path = tmp_path / "empty.safetensors"
    write_safetensors(path, {}, {"a": "b"})
    assert read_header(path).tensors == {}
    path2 = tmp_path / "zero.safetensors"
    write_safetensors(path2, {"z": torch.zeros(0, 3)})
    with open_file(path2) as handle:
        assert handle.get("z").shape == (0, 3)


# -- writer ------------------------------------------------------------------------------------
@pytest.mark.parametrize("vectored", [True, False])
def test_writer_survives_short_writes(tmp_path, monkeypatch, vectored):
    """The kernel may accept fewer bytes than asked: the writer goes on where it stopped."""
    tensors = {f"t{i}": torch.randn(i + 1, 3) for i in range(40)} | {"big": torch.randn(700, 400)}
    real_pwritev, real_pwrite = os.pwritev, os.pwrite
    calls = []

    def short_pwritev(fd, buffers, offset):
        calls.append(len(buffers))
        first = memoryview(buffers[0])[:65_537]  # at most 64 KiB + 1 of the first buffer per call
        return real_pwritev(fd, [first], offset)

    def short_pwrite(fd, data, offset):
        calls.append(1)
        return real_pwrite(fd, memoryview(data)[:100_003], offset)

    ours, theirs = _write_with(monkeypatch, vectored, short_pwritev, short_pwrite, tmp_path, tensors, {"ss_network_dim": "8"})
    assert len(calls) > 40 and ours.read_bytes() == theirs.read_bytes()


@pytest.mark.parametrize("outcome", ["reserved", "refused", "missing"])
def test_writer_reserves_the_file_size_up_front_and_copes_without(tmp_path, monkeypatch, outcome):
    """The writer asks fallocate(2) for the whole file before writing; a file system that refuses
    (or a C library without the call) changes nothing in what is written."""
    import lytools.io.writer as writer_module

    real = writer_module._libc_function
    calls = []

    def fake_libc_function(name, *argtypes):
        if not name.startswith("fallocate"):
            return real(name, *argtypes)
        if outcome == "missing":
            return None
        function = real(name, *argtypes)

        def fallocate(fd, mode, offset, size):
            calls.append((mode, offset, size, os.fstat(fd).st_size))
            return function(fd, mode, offset, size) if outcome == "reserved" and function else -1
        return fallocate

    monkeypatch.setattr(writer_module, "_libc_function", fake_libc_function)
    tensors = {f"t{i}": torch.randn(i + 1, 7) for i in range(30)} | {"big": torch.randn(300, 200).half()}
    ours, theirs = _write_with(monkeypatch, True, os.pwritev, os.pwrite, tmp_path, tensors, {"ss_network_dim": "8"})
    assert ours.read_bytes() == theirs.read_bytes()
    if outcome == "missing":
        assert calls == []
    else:  # one call for the whole planned size, on the empty temporary file
        assert calls == [(0, 0, ours.stat().st_size, 0)]


def test_libc_lookup_is_none_for_a_missing_function_or_library(monkeypatch):
    import ctypes

    from lytools.io.writer import _libc_function

    assert _libc_function("lytools_no_such_function") is None

    def no_library(*args, **kwargs):
        raise TypeError("no C library by that name here")  # what CDLL(None) does off POSIX

    monkeypatch.setattr(ctypes, "CDLL", no_library)
    _libc_function.cache_clear()
    try:
        assert _libc_function("fallocate64", ctypes.c_int) is None
    finally:
        _libc_function.cache_clear()


def _write_with(monkeypatch, vectored, pwritev, pwrite, folder, tensors, metadata):
    """Write `tensors` with lytools through the given os.pwritev (vectored) or os.pwrite (the
    fallback, with pwritev gone), and with safetensors; return (ours, theirs)."""
    if vectored:
        monkeypatch.setattr(os, "pwritev", pwritev)
    else:
        monkeypatch.delattr(os, "pwritev")
        monkeypatch.setattr(os, "pwrite", pwrite)
    ours, theirs = folder / "ours.safetensors", folder / "theirs.safetensors"
    write_safetensors(ours, tensors, metadata)
    safetensors.torch.save_file(tensors, theirs, metadata)
    return ours, theirs


def test_writer_bytes_identical_to_safetensors(tmp_path):
    tensors = {
        "b.weight": torch.randn(7, 5),
        "a": torch.randn(3),
        "alpha": torch.tensor(8.0),
        "x.lora_down.weight": torch.randn(8, 32).half(),
        "x.alpha": torch.tensor(8.0).half(),
        "ids": torch.arange(77).reshape(1, 77),
        "mask": torch.tensor([True, False]),
        "bf": torch.randn(2, 2).bfloat16(),
        'quote"back\\slash\ttab': torch.ones(2),  # names JSON must escape
        "ünïcode.weight": torch.zeros(1),
        "big": torch.randn(600, 600),  # written directly, not queued
    }
    # one metadata key: the reference writer orders several keys by hash-map iteration (random)
    meta = {"ss_network_dim": "8"}
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    writer = write_safetensors(ours, tensors, meta)
    safetensors.torch.save_file(tensors, theirs, meta)
    assert ours.read_bytes() == theirs.read_bytes()
    richer = {"ss_network_dim": "8", "modelspec.title": "t", "ss_network_alpha": "4.0"}
    write_safetensors(ours, tensors, richer, overwrite=True)
    safetensors.torch.save_file(tensors, theirs, richer)
    ours_header, theirs_header = read_header(ours), read_header(theirs)
    assert ours_header.metadata == theirs_header.metadata
    assert ours_header.tensors == theirs_header.tensors
    assert ours.read_bytes()[ours_header.data_start :] == theirs.read_bytes()[theirs_header.data_start :]
    loaded = safetensors.torch.load_file(ours)
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    with safe_open(ours, framework="pt") as handle:
        assert handle.metadata() == richer
    header_len = struct.unpack("<Q", theirs.read_bytes()[:8])[0]
    assert writer.data_sha256 == hashlib.sha256(theirs.read_bytes()[8 + header_len :]).hexdigest()


ALL_DTYPES = [
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64,
    torch.uint16, torch.uint32, torch.uint64,
]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_every_dtype_round_trips(tmp_path, dtype):
    if dtype.is_floating_point or dtype.is_complex:
        tensor = torch.randn(3, 4, dtype=torch.float32 if not dtype.is_complex else torch.complex64).to(dtype)
    elif dtype == torch.bool:
        tensor = torch.rand(3, 4) > 0.5
    else:
        tensor = torch.randint(0, 100, (3, 4)).to(dtype)
    path = tmp_path / "d.safetensors"
    write_safetensors(path, {"t": tensor, "s": tensor[0, 0].clone()})
    with open_file(path) as handle:
        back = handle.get("t")
        assert back.dtype == dtype and back.shape == tensor.shape
        assert torch.equal(back.view(torch.uint8), tensor.view(torch.uint8))
        assert handle.get("s").shape == ()
    if dtype not in (torch.uint16, torch.uint32, torch.uint64):
        assert torch.equal(safetensors.torch.load_file(path)["t"].view(torch.uint8), tensor.view(torch.uint8))


def test_writer_refuses_existing_output_and_pickle_names(tmp_path):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"precious")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        write_safetensors(out, {"a": torch.zeros(1)})
    assert out.read_bytes() == b"precious"
    write_safetensors(out, {"a": torch.zeros(1)}, overwrite=True)
    assert read_header(out).tensors["a"].shape == (1,)
    with pytest.raises(LytoolsError, match="always .safetensors"):
        write_safetensors(tmp_path / "x.ckpt", {"a": torch.zeros(1)})
    with pytest.raises(LytoolsError, match="does not exist"):
        write_safetensors(tmp_path / "nope" / "x.safetensors", {"a": torch.zeros(1)})


def test_writer_checks_plan(tmp_path):
    out = tmp_path / "p.safetensors"
    writer = SafetensorsWriter(out, [plan_entry("a", torch.float16, (2, 2)), plan_entry("b", "F32", (1,))])
    with pytest.raises(LytoolsError, match="planned as F16"):
        with writer:
            writer.write("a", torch.zeros(2, 2))
    assert not out.exists() and not list(tmp_path.iterdir())
    writer = SafetensorsWriter(out, [plan_entry("a", torch.float16, (2, 2)), plan_entry("b", "F32", (1,))])
    with pytest.raises(LytoolsError, match="never written"):
        with writer:
            writer.write("a", torch.zeros(2, 2, dtype=torch.float16))
    assert not list(tmp_path.iterdir())


def test_out_of_order_writes_are_correct(tmp_path):
    tensors = {f"t{i}": torch.randn(i + 1, 3) for i in range(5)}
    out = tmp_path / "o.safetensors"
    writer = SafetensorsWriter(out, [plan_entry(n, t.dtype, t.shape) for n, t in tensors.items()], hash_data=True)
    with writer:
        for name in reversed(writer.order):
            writer.write(name, tensors[name])
    assert writer.data_sha256 is None
    loaded = safetensors.torch.load_file(out)
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())


def test_failure_keeps_existing_output_untouched(tmp_path):
    out = tmp_path / "keep.safetensors"
    write_safetensors(out, {"old": torch.ones(3)})
    before = out.read_bytes()
    writer = SafetensorsWriter(out, [plan_entry("a", torch.float32, (4,)), plan_entry("b", torch.float32, (4,))], overwrite=True)
    with pytest.raises(RuntimeError):
        with writer:
            writer.write("a", torch.zeros(4))
            raise RuntimeError("boom")
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.safetensors"]


SLOW_WRITER = textwrap.dedent(
    """
    import sys, time, torch
    from lytools.io import SafetensorsWriter, plan_entry
    from lytools.cli import _raise_interrupt
    import signal
    signal.signal(signal.SIGTERM, _raise_interrupt)
    names = [f"t{i:03d}" for i in range(200)]
    writer = SafetensorsWriter(sys.argv[1], [plan_entry(n, torch.float32, (256, 256)) for n in names], overwrite=True)
    with writer:
        for i, name in enumerate(writer.order):
            writer.write(name, torch.full((256, 256), float(i)))
            if i == 3:
                print("writing", flush=True)
            time.sleep(0.05)
    """
)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_killed_mid_write_leaves_nothing(tmp_path, sig):
    out = tmp_path / "big.safetensors"
    out.write_bytes(b"old contents")
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_WRITER, str(out)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.stdout.readline().strip() == b"writing"
    assert any(p.name.startswith("big.safetensors.tmp-") for p in tmp_path.iterdir())
    proc.send_signal(sig)
    proc.wait(timeout=30)
    assert proc.returncode != 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.safetensors"]
    assert out.read_bytes() == b"old contents"


# -- pickles -----------------------------------------------------------------------------------
class _Exploit:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": _Exploit(str(marker))}, path)
    with pytest.raises(UnsafeFileError, match="refusing to load"):
        open_file(path)
    assert not marker.exists()
    raw = tmp_path / "evil.pt"
    raw.write_bytes(pickle.dumps(_Exploit(str(marker)), protocol=2))
    with pytest.raises(FileFormatError):
        open_file(raw)
    assert not marker.exists()


def test_pickled_checkpoint_unwraps_state_dict(tmp_path):
    weights = {"model.diffusion_model.out.2.weight": torch.randn(4, 4), "alphas_cumprod": torch.rand(10)}
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": weights, "epoch": 3, "global_step": 100}, path)
    with open_file(path) as handle:
        assert sorted(handle.keys()) == sorted(weights)
        assert handle.info("alphas_cumprod").dtype == "F32"
        assert torch.equal(handle.get("model.diffusion_model.out.2.weight"), weights["model.diffusion_model.out.2.weight"])
    flat = tmp_path / "flat.pt"
    torch.save(weights, flat)
    assert sorted(open_file(flat).keys()) == sorted(weights)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"\x00" * 100)
    with pytest.raises(FileFormatError, match="not a readable checkpoint"):
        open_file(garbage)


def test_sharded_index(tmp_path):
    write_safetensors(tmp_path / "m-1.safetensors", {"a": torch.ones(2)})
    write_safetensors(tmp_path / "m-2.safetensors", {"b": torch.zeros(3)})
    index = tmp_path / "m.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 20}, "weight_map": {"a": "m-1.safetensors", "b": "m-2.safetensors"}}))
    with open_file(index) as handle:
        assert sorted(handle.keys()) == ["a", "b"]
        assert torch.equal(handle.get("b"), torch.zeros(3))
    index.write_text(json.dumps({"weight_map": {"c": "m-1.safetensors"}}))
    with pytest.raises(FileFormatError, match="lacks it"):
        open_file(index)


# -- hashes ------------------------------------------------------------------------------------
def test_file_hashes_match_hashlib(tmp_path):
    tensors = {"big": torch.randn(600, 600), "small": torch.randn(3).half()}  # > 1 MiB + 64 KiB
    path = tmp_path / "h.safetensors"
    safetensors.torch.save_file(tensors, path, {"ss_x": "1", "other": "2"})
    data = path.read_bytes()
    header_len = struct.unpack("<Q", data[:8])[0]
    hashes = file_hashes(path)
    assert hashes.sha256 == hashlib.sha256(data).hexdigest()
    assert hashes.autov2 == hashlib.sha256(data).hexdigest()[:10]
    assert hashes.data_sha256 == hashlib.sha256(data[8 + header_len :]).hexdigest()
    assert hashes.legacy == hashlib.sha256(data[LEGACY_OFFSET : LEGACY_OFFSET + LEGACY_LENGTH]).hexdigest()[:8]
    small = tmp_path / "s.safetensors"
    safetensors.torch.save_file({"a": torch.zeros(2)}, small)
    assert file_hashes(small).legacy == hashlib.sha256(b"").hexdigest()[:8]


def test_data_sha256_through_a_map_in_pieces_and_by_reading(tmp_path, monkeypatch):
    import threading

    import lytools.io.hashes as hashes

    data = os.urandom(5000)
    path = tmp_path / "d.bin"
    path.write_bytes(data)
    monkeypatch.setattr(hashes, "MAPPED_PIECE", 777)  # several pieces, the last one short
    for start in (0, 8, 1234, 4999):
        assert hashes.data_sha256(path, start) == hashlib.sha256(data[start:]).hexdigest()
    assert hashes.data_sha256(path, 5000) == hashlib.sha256(b"").hexdigest()  # nothing after the start
    assert hashes.data_sha256(path, 6000) == hashlib.sha256(b"").hexdigest()
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    assert hashes.data_sha256(empty, 0) == hashlib.sha256(b"").hexdigest()  # a map of 0 bytes is never asked for
    cancelled = threading.Event()
    cancelled.set()
    assert hashes.data_sha256(path, 8, cancelled) is None

    def no_map(*args, **kwargs):
        raise OSError("no maps on this file system")

    monkeypatch.setattr(hashes.mmap, "mmap", no_map)
    monkeypatch.setattr(hashes, "CHUNK", 1000)
    assert hashes.data_sha256(path, 8) == hashlib.sha256(data[8:]).hexdigest()
    assert hashes.data_sha256(path, 8, cancelled) is None


def test_sd_scripts_hashes_match_the_ss_only_serialisation(tmp_path):
    tensors = {"big": torch.randn(600, 600), "x.alpha": torch.tensor(4.0)}
    metadata = {"ss_network_dim": "4", "modelspec.title": "ignored by the hash"}
    model, legacy = sd_scripts_hashes(tensors, metadata)
    reference = safetensors.torch.save(tensors, {"ss_network_dim": "4"})
    header_len = struct.unpack("<Q", reference[:8])[0]
    assert model == hashlib.sha256(reference[8 + header_len :]).hexdigest()
    assert legacy == hashlib.sha256(reference[LEGACY_OFFSET : LEGACY_OFFSET + LEGACY_LENGTH]).hexdigest()[:8]
    fresh = with_sshs_hashes(tensors, {**metadata, "sshs_model_hash": "stale"})
    assert fresh["sshs_model_hash"] == model and fresh["sshs_legacy_hash"] == legacy
    out = tmp_path / "n.safetensors"
    write_safetensors(out, tensors, fresh)
    assert file_hashes(out).data_sha256 == model


@pytest.mark.parametrize("in_order", [True, False])
@pytest.mark.parametrize("header_names", [3, 9000])  # 9000 names: the header alone passes 1 MiB
def test_writer_embeds_sshs_hashes_as_sd_scripts_computes_them(tmp_path, in_order, header_names):
    tensors = {"big": torch.randn(600, 600), "x.alpha": torch.tensor(4.0)}
    tensors.update({f"pad_{i:05d}_{'n' * 80}": torch.zeros(1, dtype=torch.float16) for i in range(header_names)})
    metadata = {"ss_network_dim": "4", "modelspec.title": "t", "sshs_model_hash": "stale", "sshs_legacy_hash": "stale"}
    out = tmp_path / "w.safetensors"
    writer = SafetensorsWriter(out, [plan_entry(n, t.dtype, t.shape) for n, t in tensors.items()], metadata, sshs=True)
    with writer:
        for name in writer.order if in_order else reversed(writer.order):
            writer.write(name, tensors[name])
    model, legacy = sd_scripts_hashes(tensors, metadata)
    stored = read_header(out).metadata
    assert (stored["sshs_model_hash"], stored["sshs_legacy_hash"]) == (model, legacy)
    assert stored["modelspec.title"] == "t" and writer.data_sha256 == model == file_hashes(out).data_sha256
    # the same bytes as writing the metadata computed up front
    reference = tmp_path / "r.safetensors"
    write_safetensors(reference, tensors, with_sshs_hashes(tensors, metadata))
    assert out.read_bytes() == reference.read_bytes()


def test_modelspec_hash_is_state_dict_order():
    a, b = torch.arange(4, dtype=torch.float32), torch.ones(2, dtype=torch.float16)
    expected = hashlib.sha256(a.numpy().tobytes() + b.numpy().tobytes()).hexdigest()
    assert modelspec_hash([("a", a), ("b", b)]) == "0x" + expected
    assert modelspec_hash([("b", b), ("a", a)]) != "0x" + expected


def test_patch_metadata_before_rename(tmp_path):
    out = tmp_path / "patched.safetensors"
    writer = SafetensorsWriter(out, [plan_entry("a", torch.float32, (3,))], {"hash": "0" * 64})
    with writer:
        writer.write("a", torch.ones(3))
        writer.patch_metadata({"hash": "f" * 64})
        with pytest.raises(LytoolsError, match="changes the header length"):
            writer.patch_metadata({"hash": "short"})
    assert read_header(out).metadata == {"hash": "f" * 64}
    assert torch.equal(safetensors.torch.load_file(out)["a"], torch.ones(3))


def test_writer_write_bytes_matches_write_and_checks_the_size(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64), "c": torch.randn(2).half()}
    entries = [plan_entry(n, t.dtype, t.shape) for n, t in tensors.items()]
    raw_out, tensor_out = tmp_path / "raw.safetensors", tmp_path / "tensor.safetensors"
    writer = SafetensorsWriter(raw_out, entries, {"k": "v"})
    with writer:
        for name in writer.order:
            writer.write_bytes(name, tensors[name].numpy().tobytes())
    write_safetensors(tensor_out, tensors, {"k": "v"})
    assert raw_out.read_bytes() == tensor_out.read_bytes()
    writer = SafetensorsWriter(tmp_path / "bad.safetensors", entries)
    with pytest.raises(LytoolsError, match="has 3 bytes but was planned with 48"):
        with writer:
            writer.write_bytes("a", b"abc")
    assert not (tmp_path / "bad.safetensors").exists()


@pytest.mark.parametrize("sshs", [False, True])
def test_write_all_with_a_shared_layout_matches_safetensors(tmp_path, monkeypatch, sshs):
    """One layout serves several files (different metadata); write_all splits more tensors than one
    vectored write takes and goes on after short writes."""
    tensors = {f"t{i:04d}": torch.randn(i % 7 + 1, 3) for i in range(1500)} | {"big": torch.randn(300, 200).half()}
    layout = plan_layout([plan_entry(n, t.dtype, t.shape) for n, t in tensors.items()])
    real_pwritev = os.pwritev
    calls = []

    def short_pwritev(fd, buffers, offset):
        calls.append(len(buffers))
        assert len(buffers) <= 1024
        done = real_pwritev(fd, buffers, offset)
        return max(1, done - 5) if done > 5 and len(calls) % 3 == 0 else done  # now and then 5 bytes short

    monkeypatch.setattr(os, "pwritev", short_pwritev)
    for index, meta in enumerate(({"ss_network_dim": "8"}, {"ss_network_dim": "16", "other": "é"})):
        ours, theirs = tmp_path / f"ours{index}.safetensors", tmp_path / f"theirs{index}.safetensors"
        writer = SafetensorsWriter(ours, layout, meta, sshs=sshs)
        with writer:
            writer.write_all([tensors[name].numpy().tobytes() for name in writer.order])
        monkeypatch.setattr(os, "pwritev", real_pwritev)
        write_safetensors(theirs, tensors, meta, sshs=sshs)  # tensor by tensor
        monkeypatch.setattr(os, "pwritev", short_pwritev)
        assert ours.read_bytes() == theirs.read_bytes()
        loaded = safetensors.torch.load_file(ours)
        assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], v) for k, v in tensors.items())
        with safe_open(ours, "pt") as handle:
            assert handle.metadata() == (with_sshs_hashes(tensors, meta) if sshs else meta)
    assert len(calls) >= 4 and max(calls) == 1024


def test_write_all_checks_what_it_is_given(tmp_path):
    entries = [plan_entry("a", "F32", (2,)), plan_entry("b", "F16", (3,))]
    out = tmp_path / "o.safetensors"
    for given, problem in (([b"x" * 8], "1 tensors given for 2 planned"),
                           ([b"x" * 8, b"x" * 5], "tensor 'b' has 5 bytes but was planned with 6")):
        with pytest.raises(LytoolsError, match=problem):
            with SafetensorsWriter(out, entries) as writer:
                writer.write_all(given)
        assert not list(tmp_path.iterdir())
    with pytest.raises(LytoolsError, match="already holds tensors"):
        with SafetensorsWriter(out, entries) as writer:
            writer.write_bytes("a", b"x" * 8)
            writer.write_all([b"x" * 8, b"x" * 6])
    assert not list(tmp_path.iterdir())
    with pytest.raises(LytoolsError, match="both named 'a'"):
        plan_layout([plan_entry("a", "F32", (2,)), plan_entry("a", "F16", (3,))])


@pytest.mark.parametrize("vectored", [True, False])
def test_writes_are_cut_into_pieces_the_page_cache_takes_cheaply(tmp_path, monkeypatch, vectored):
    from lytools.io.writer import WRITE_PIECE

    tensors = {"big": torch.randn(1000, 900), "a": torch.randn(3), "mid": torch.randn(200_000), "z": torch.randn(5, 5)}
    sizes = []
    real_pwritev, real_pwrite = os.pwritev, os.pwrite

    def counting_pwritev(fd, buffers, offset):
        sizes.append(sum(len(memoryview(b)) for b in buffers))
        return real_pwritev(fd, buffers, offset)

    def counting_pwrite(fd, data, offset):
        sizes.append(len(memoryview(data)))
        return real_pwrite(fd, data, offset)

    ours, theirs = _write_with(monkeypatch, vectored, counting_pwritev, counting_pwrite, tmp_path, tensors, {"k": "v"})
    assert ours.read_bytes() == theirs.read_bytes()
    assert max(sizes) <= WRITE_PIECE and sum(sizes) == ours.stat().st_size and len(sizes) >= 8
