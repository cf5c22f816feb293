"""The torch-free fast path of `convert --to diffusers` writes exactly what the general path writes,
and hands everything it does not take back to it."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from lytools.convert.fast import _scale_into, _sparse_nonzero, try_convert
from lytools.convert.run import ConvertOptions, convert_file
from lytools.errors import FileFormatError
from lytools.io import parse_header, read_header, write_safetensors
from lytools.testing import build_network
from tests.shared import read_tensors

DIFFUSERS = ConvertOptions(target="diffusers")
REPO = Path(__file__).resolve().parents[1]


def both(source: Path, tmp_path: Path, options: ConvertOptions = DIFFUSERS):
    """Return (fast result or None, general result, fast output, general output)."""
    fast_out, general_out = tmp_path / "fast.safetensors", tmp_path / "general.safetensors"
    for path in (fast_out, general_out):
        path.unlink(missing_ok=True)
    fast = try_convert(source, fast_out, options)
    general = convert_file(source, general_out, options)
    return fast, general, fast_out, general_out


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("dtype,alpha,rank", [
    (torch.float16, 8.0, 16),  # scale 1/2: a power of two, the exponent path
    (torch.float16, 1.0, 16),  # 1/16 folded as 1/4 x 1/4
    (torch.float16, 5.0, 3),  # not a power of two: float32 products rounded to float16
    (torch.float16, None, 4),  # no alpha: scale 1, nothing to scale
    (torch.float32, 3.0, 4),
])
def test_fast_path_output_is_byte_identical_to_the_general_path(tmp_path, arch, dtype, alpha, rank):
    source = build_network(tmp_path / "n.safetensors", arch, rank=rank, alpha=alpha, dtype=dtype, conv_rank=rank,
                           modules="c3lier" if arch == "sd1" else "lierla", seed=3,
                           metadata={"ss_network_dim": str(rank), "sshs_model_hash": "stale", "modelspec.title": "t"})
    fast, general, fast_out, general_out = both(source, tmp_path)
    assert fast is not None, "the fast path should take a plain LoRA"
    assert fast_out.read_bytes() == general_out.read_bytes()
    assert fast.notes == general.notes and fast.outputs == [fast_out] and fast.error is None


def _scaled(raws: list[memoryview], dtype: str, factor: float) -> list[bytes] | None:
    out = bytearray(sum(map(len, raws)))
    if not _scale_into(raws, dtype, factor, memoryview(out)):
        return None
    sizes = np.cumsum([0] + [len(raw) for raw in raws])
    return [bytes(out[a:b]) for a, b in zip(sizes[:-1], sizes[1:])]


@pytest.mark.parametrize("density", [0.0, 0.001, 0.05, 0.5, 1.0])
def test_sparse_nonzero_finds_every_flag(density):
    rng = np.random.default_rng(int(density * 1000))
    for length in (0, 8, 64, 4096, 100_000):
        flags = rng.random(length) < density
        assert np.array_equal(_sparse_nonzero(flags), np.flatnonzero(flags)), (density, length)


def test_fast_path_scales_tensors_of_any_length_like_torch():
    """Lengths that are not a multiple of 8 (the odd-value flags are scanned in 8-byte words)."""
    rng = np.random.default_rng(1)
    sizes = [1, 3, 7, 9, 13, 1021]
    values = (rng.standard_normal(sum(sizes)) * 1e-4).astype(np.float16)  # many subnormal products
    cuts = np.cumsum([0] + sizes)
    raws = [memoryview(values[a:b].tobytes()) for a, b in zip(cuts[:-1], cuts[1:])]
    for count in range(1, len(raws) + 1):
        for factor in (0.5, 0.125, 4.0):
            ours = np.frombuffer(b"".join(_scaled(raws[:count], "F16", factor)), dtype=np.uint16)
            expected = (torch.from_numpy(values[:cuts[count]].copy()) * factor).numpy().view(np.uint16)
            assert np.array_equal(ours, expected), (count, factor)


def test_fast_path_scales_subnormals_zeros_and_overflow_like_torch():
    rng = np.random.default_rng(0)
    values = np.concatenate([
        rng.standard_normal(20000), rng.standard_normal(2000) * 1e-6, rng.standard_normal(2000) * 3e3,
        [0.0, -0.0, 6e-8, -6e-8, 6.1e-5, 1.2e-4, 65504.0, -65504.0],
    ]).astype(np.float16)
    raws = [memoryview(values[:7000].tobytes()), memoryview(values[7000:].tobytes())]
    for factor in (0.5, 0.25, 2.0, 16.0, 2.0 ** -20, 2.0 ** -40, 2.0 ** 40, 0.1875, 5 / 3, 0.7, 3.0, 1e-3):
        ours = np.frombuffer(b"".join(_scaled(raws, "F16", factor)), dtype=np.uint16)
        expected = (torch.from_numpy(values.copy()) * factor).numpy().view(np.uint16)
        assert np.array_equal(ours, expected), factor
    wide = rng.standard_normal(5000).astype(np.float32)
    for factor in (0.5, 0.7, 5 / 3, 1e-3):
        ours = np.frombuffer(b"".join(_scaled([memoryview(wide.tobytes())], "F32", factor)), dtype=np.uint32)
        assert np.array_equal(ours, (torch.from_numpy(wide.copy()) * factor).numpy().view(np.uint32))
    assert _scaled([memoryview(np.array([1.0, np.inf], dtype=np.float16).tobytes())], "F16", 0.5) is None
    assert _scaled([memoryview(np.array([1.0, np.nan], dtype=np.float32).tobytes())], "F32", 0.5) is None


def _with(path: Path, extra: dict[str, torch.Tensor], out: Path) -> Path:
    tensors = read_tensors(path)
    tensors.update(extra)
    write_safetensors(out, tensors, dict(read_header(path).metadata))
    return out


@pytest.mark.parametrize("case", [
    "sd3", "flux", "loha", "dora", "bf16", "diffusers-input", "stray", "inf", "inf-alpha", "save-dtype", "no-fold", "peft",
    "kohya", "arch", "te1-quirk",
])
def test_everything_else_goes_the_general_way(tmp_path, case):
    options = DIFFUSERS
    kwargs = {"rank": 4, "alpha": 2.0}
    if case in ("sd3", "flux"):
        source = build_network(tmp_path / "n.safetensors", case, **kwargs)  # fused q/k/v: split into parts
    elif case == "loha":
        source = build_network(tmp_path / "n.safetensors", "sd1", algo="loha", **kwargs)
    elif case == "dora":
        source = build_network(tmp_path / "n.safetensors", "sd1", dora=True, **kwargs)
    elif case == "bf16":
        source = build_network(tmp_path / "n.safetensors", "sd1", dtype=torch.bfloat16, **kwargs)
    elif case == "diffusers-input":
        source = build_network(tmp_path / "n.safetensors", "sd1", layout="diffusers", **kwargs)
    else:
        source = build_network(tmp_path / "n.safetensors", "sd1", **kwargs)
    if case == "stray":
        source = _with(source, {"text_projection.weight": torch.zeros(2, 2)}, tmp_path / "s.safetensors")
    elif case == "inf":
        up = next(k for k in read_tensors(source) if k.endswith("lora_up.weight"))
        bad = read_tensors(source)[up].clone()
        bad[0, 0] = float("inf")
        source = _with(source, {up: bad}, tmp_path / "s.safetensors")
    elif case == "inf-alpha":  # after a file of the same structure with finite alphas (its plan remembered)
        assert try_convert(source, tmp_path / "first.safetensors", options) is not None
        alpha, stored = next((k, v) for k, v in read_tensors(source).items() if k.endswith(".alpha"))
        source = _with(source, {alpha: torch.full_like(stored, float("inf"))}, tmp_path / "s.safetensors")
    elif case == "te1-quirk":  # diffusers' old kohya export of SD1 text-encoder names
        tensors = {k.replace("lora_te_", "lora_te1_"): v for k, v in read_tensors(source).items()}
        source = tmp_path / "q.safetensors"
        write_safetensors(source, tensors)
    options = {
        "save-dtype": replace(options, save_dtype=torch.float32), "no-fold": replace(options, fold=False),
        "peft": replace(options, target="peft", component="unet"), "kohya": replace(options, target="kohya"),
        "arch": replace(options, arch="sd2"),
    }.get(case, options)
    out = tmp_path / "out.safetensors"
    assert try_convert(source, out, options) is None
    assert not out.exists()


def test_convert_of_plain_loras_never_imports_torch(tmp_path):
    sources = [build_network(tmp_path / f"n{i}.safetensors", "sdxl", rank=4, alpha=2.0, seed=i) for i in range(2)]
    out = tmp_path / "out"
    out.mkdir()
    script = (
        "import sys\n"
        "from lytools.cli import main\n"
        "try:\n"
        f"    main(['convert', *sys.argv[1:], '--output-dir', {str(out)!r}, '--to', 'diffusers', '-q', '-j', '2'])\n"
        "except SystemExit as exc:\n"
        "    assert not exc.code, exc.code\n"
        "print('torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, *map(str, sources)], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.split()
    assert lines[-1] == "False" and sorted(lines[:-1]) == sorted(str(out / s.name) for s in sources)


def test_fast_path_is_safe_from_several_threads(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    sources = [build_network(tmp_path / f"n{i}.safetensors", "sd1", rank=4, alpha=float(1 + i), seed=i) for i in range(4)]
    expected = {}
    for source in sources:
        out = tmp_path / f"ref-{source.name}"
        convert_file(source, out, DIFFUSERS)
        expected[source.name] = out.read_bytes()

    def run(job: tuple[int, Path]) -> bytes:
        index, source = job
        out = tmp_path / f"thread-{index}.safetensors"
        assert try_convert(source, out, DIFFUSERS) is not None
        return out.read_bytes()

    jobs = list(enumerate(sources * 3))
    with ThreadPoolExecutor(4) as pool:
        for (_, source), data in zip(jobs, pool.map(run, jobs)):
            assert data == expected[source.name]


def _with_header(source: Path, out: Path, header: bytes) -> Path:
    """Copy `source` with its JSON header replaced (data section unchanged)."""
    data = source.read_bytes()
    (length,) = struct.unpack_from("<Q", data)
    out.write_bytes(struct.pack("<Q", len(header)) + header + data[8 + length:])
    return out


def test_files_sharing_a_structure_each_come_out_as_the_general_path_writes_them(tmp_path, monkeypatch):
    """The second and later files of one structure reuse the first one's work: their own metadata
    and alphas must still be the ones that count."""
    import lytools.convert.fast as fast

    studied = []
    monkeypatch.setattr(fast, "_STRUCTURES", {})
    monkeypatch.setattr(fast, "parse_header", lambda *args: studied.append(args[0].name) or parse_header(*args))
    first = build_network(tmp_path / "a.safetensors", "sdxl", rank=4, alpha=2.0, seed=1,
                          metadata={"ss_network_dim": "4", "modelspec.title": "first"})
    tensors = read_tensors(first)
    alphas = [k for k in tensors if k.endswith(".alpha")]
    variants = {
        "b": ({"modelspec.title": "second", "sshs_model_hash": "stale", "lora_adapter_metadata": "{}"}, 1.0),
        "c": ({}, 4.0),
        "d": ({"modelspec.architecture": "stable-diffusion-xl-v1-base/lora", "ss_training_comment": "é ✓"}, 0.5),
    }
    sources = [first]
    for stem, (metadata, alpha) in variants.items():
        changed = dict(tensors) | {k: torch.tensor(alpha, dtype=tensors[k].dtype) for k in alphas}
        changed[alphas[0]] = torch.tensor(3.0, dtype=tensors[alphas[0]].dtype)  # one module unlike the rest
        write_safetensors(tmp_path / f"{stem}.safetensors", changed, metadata)
        sources.append(tmp_path / f"{stem}.safetensors")
    # metadata after the tensors: keyed by the whole header, still converted the same
    raw = json.loads(first.read_bytes()[8:8 + struct.unpack_from("<Q", first.read_bytes())[0]])
    meta = raw.pop("__metadata__")
    sources.append(_with_header(first, tmp_path / "e.safetensors", json.dumps({**raw, "__metadata__": meta}).encode()))
    for source in sources * 2:  # twice: every file again with its structure known
        fast, general, fast_out, general_out = both(source, tmp_path)
        assert fast is not None, source.name
        assert fast_out.read_bytes() == general_out.read_bytes(), source.name
        assert fast.notes == general.notes
    # a and b share one structure; c has no metadata; d claims its architecture in the metadata;
    # e's metadata is not in front
    assert studied == ["a.safetensors", "c.safetensors", "d.safetensors", "e.safetensors"]


@pytest.mark.parametrize("damage", ["number-in-metadata", "duplicate-metadata-key", "truncated", "metadata-not-object"])
def test_a_known_structure_with_a_damaged_file_is_refused_as_the_reader_refuses_it(tmp_path, damage):
    source = build_network(tmp_path / "a.safetensors", "sd1", rank=4, alpha=2.0, seed=1, metadata={"k": "v"})
    assert try_convert(source, tmp_path / "first.safetensors", DIFFUSERS) is not None  # structure now known
    data = source.read_bytes()
    (length,) = struct.unpack_from("<Q", data)
    header = data[8:8 + length]
    rest = header[header.index(b"}") + 1:]  # what follows the metadata object
    bad = tmp_path / "bad.safetensors"
    if damage == "truncated":
        bad.write_bytes(data[:-10])
    else:
        metadata = {"number-in-metadata": b'{"k":1}', "duplicate-metadata-key": b'{"k":"v","k":"w"}',
                    "metadata-not-object": b'"text"'}[damage]
        _with_header(source, bad, b'{"__metadata__":' + metadata + rest)
    with pytest.raises(FileFormatError) as expected:
        read_header(bad)
    with pytest.raises(FileFormatError) as ours:
        try_convert(bad, tmp_path / "out.safetensors", DIFFUSERS)
    assert str(ours.value) == str(expected.value)
    assert not (tmp_path / "out.safetensors").exists()


def test_scaling_spans_many_steps():
    """Odd values (zeros, subnormals) anywhere in tensors larger than one checking step."""
    rng = np.random.default_rng(1)
    values = (rng.standard_normal(300_001) * 1e-3).astype(np.float16)
    values[::997] = 0
    values[5::1013] = np.float16(3e-7)
    raws = [memoryview(values[:70_000].tobytes()), memoryview(values[70_000:].tobytes())]
    for factor in (0.5, 0.25, 2.0 ** -12):
        ours = np.frombuffer(b"".join(_scaled(raws, "F16", factor)), dtype=np.uint16)
        assert np.array_equal(ours, (torch.from_numpy(values.copy()) * factor).numpy().view(np.uint16)), factor


def test_structures_remembered_are_bounded(tmp_path, monkeypatch):
    import lytools.convert.fast as fast

    monkeypatch.setattr(fast, "_STRUCTURES", {})
    monkeypatch.setattr(fast, "CACHE_LIMIT", 2)
    for rank in (2, 3, 4, 2):
        source = build_network(tmp_path / f"r{rank}.safetensors", "sd1", rank=rank, alpha=1.0, seed=rank, overwrite=True,
                               metadata={"k": "v"})
        fast_result, _, fast_out, general_out = both(source, tmp_path)
        assert fast_result is not None and fast_out.read_bytes() == general_out.read_bytes()
        assert len(fast._STRUCTURES) <= 2


@pytest.mark.parametrize("factor", [0.5, 0.25, 2.0, 2.0 ** -20, 0.1875, 5 / 3, 0.7, 1e-3, 3.0])
def test_every_float16_value_scales_as_torch_scales_it(factor):
    """Every finite float16 bit pattern, through both ways _scale_into takes (the exponent shift
    with odd values looked up, and the lookup of every value)."""
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    finite = bits[(bits & 0x7FFF) < 0x7C00]
    ours = np.frombuffer(b"".join(_scaled([memoryview(finite.tobytes())], "F16", factor)), dtype=np.uint16)
    expected = (torch.from_numpy(finite.view(np.float16).copy()) * factor).numpy().view(np.uint16)
    assert np.array_equal(ours, expected)
