"""How convert writes: atomic always, fsynced only with --fsync; which outputs carry sshs hashes."""

from __future__ import annotations

import os

import pytest
import torch

from lytools.io import SafetensorsWriter, open_file, plan_entry, read_header, with_sshs_hashes
from lytools.testing import build_network
from tests.test_convert import run_cli


def _count_fsyncs(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = os.fsync

    def counting(fd):
        calls.append(fd)
        return real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    return calls


@pytest.mark.parametrize("durable", [True, False])
def test_writer_fsyncs_only_when_durable(tmp_path, monkeypatch, durable):
    calls = _count_fsyncs(monkeypatch)
    tensor = torch.arange(6, dtype=torch.float32)
    out = tmp_path / "x.safetensors"
    writer = SafetensorsWriter(out, [plan_entry("t", tensor.dtype, tensor.shape)], {"k": "v"}, durable=durable)
    with writer:
        writer.write("t", tensor)
    assert read_header(out).metadata == {"k": "v"}
    assert not list(tmp_path.glob("*.tmp-*"))
    assert len(calls) == (2 if durable else 0)  # the file, then its folder after the rename


@pytest.mark.parametrize("flag", [[], ["--fsync"]])
@pytest.mark.parametrize("target", ["diffusers", "peft", None])
def test_convert_fsync_flag(tmp_path, capsys, monkeypatch, flag, target):
    sources = [build_network(tmp_path / f"n{i}.safetensors", "sd1", rank=4, seed=i, metadata={"ss_network_dim": "4"})
               for i in range(2)]
    out = tmp_path / "out"
    out.mkdir()
    calls = _count_fsyncs(monkeypatch)
    layout = ["--to", target] if target else ["--save-dtype", "bf16"]
    if target == "peft":
        layout += ["--component", "unet"]
    code, stdout, _ = run_cli(capsys, "convert", *map(str, sources), "--output-dir", str(out), *layout, *flag)
    assert code == 0 and len(stdout.splitlines()) == (4 if target == "peft" else 2)
    per_file = 3 if target == "peft" else 2  # peft also syncs its adapter_config.json
    assert len(calls) == (per_file * 2 if flag else 0)
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]


@pytest.mark.parametrize("target", ["kohya", "diffusers", "peft"])
def test_sshs_hashes_fresh_for_kohya_absent_for_diffusers_and_peft(tmp_path, capsys, target):
    source = build_network(tmp_path / "n.safetensors", "sd1", rank=4,
                           metadata={"ss_network_dim": "4", "sshs_model_hash": "stale", "sshs_legacy_hash": "stale"})
    out = tmp_path / "o.safetensors"
    extra = ["--component", "unet"] if target == "peft" else []
    assert run_cli(capsys, "convert", str(source), "-o", str(out), "--to", target, *extra)[0] == 0
    with open_file(out) as reader:
        meta = dict(reader.metadata)
        tensors = {key: reader.get(key).clone() for key in reader.keys()}
    if target == "kohya":
        fresh = with_sshs_hashes(tensors, meta)
        assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == (fresh["sshs_model_hash"], fresh["sshs_legacy_hash"])
        assert meta["sshs_model_hash"] != "stale"
    else:
        assert not [key for key in meta if key.startswith("sshs_")]
    assert meta["ss_network_dim"] == "4"


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="posix_fadvise is Linux-only")
def test_batch_reads_the_next_inputs_ahead(tmp_path, monkeypatch):
    from lytools.convert import run

    sources = [build_network(tmp_path / f"n{i}.safetensors", "sd1", rank=4, seed=i) for i in range(4)]
    events: list[tuple[str, str]] = []
    real_advise, real_process = os.posix_fadvise, run.process
    advised_fds: dict[int, str] = {}
    real_open = os.open

    def recording_open(path, *args, **kwargs):
        fd = real_open(path, *args, **kwargs)
        advised_fds[fd] = os.path.basename(path)
        return fd

    def advise(fd, offset, length, how):
        assert how == os.POSIX_FADV_WILLNEED
        events.append(("ahead", advised_fds[fd]))
        return real_advise(fd, offset, length, how)

    def process(source, output, options):
        events.append(("convert", source.name))
        return real_process(source, output, options)

    monkeypatch.setattr(os, "posix_fadvise", advise)
    monkeypatch.setattr(os, "open", recording_open)
    monkeypatch.setattr(run, "process", process)
    pairs = [(s, tmp_path / f"o{i}.safetensors") for i, s in enumerate(sources)]
    results = run.run_batch(pairs, run.ConvertOptions(target="diffusers"))
    assert all(r.error is None for r in results)
    ahead = [name for kind, name in events if kind == "ahead"]
    assert sorted(ahead) == sorted(s.name for s in sources)  # each input once
    for i, source in enumerate(sources[1:], 1):  # every input is hinted before the one before it converts
        assert events.index(("ahead", source.name)) < events.index(("convert", sources[i - 1].name))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_prefetch_never_opens_a_pipe(tmp_path, monkeypatch):
    from lytools.convert.run import prefetch

    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    opened = []
    monkeypatch.setattr(os, "open", lambda *a, **k: opened.append(a) or (_ for _ in ()).throw(AssertionError("opened")))
    prefetch(fifo)  # returns at once: opening a pipe with no writer would block
    prefetch(tmp_path / "missing.safetensors")
    assert opened == []


@pytest.mark.parametrize("target", ["diffusers", "peft"])
def test_output_dir_is_created_when_missing(tmp_path, capsys, target):
    sources = [build_network(tmp_path / f"n{i}.safetensors", "sd1", rank=4, seed=i) for i in range(2)]
    out = tmp_path / "new" / "nested"
    layout = ["--to", target] + (["--component", "unet"] if target == "peft" else [])
    code, stdout, err = run_cli(capsys, "convert", *map(str, sources), "--output-dir", str(out), *layout)
    assert code == 0, err
    written = [out / "n0.safetensors", out / "n1.safetensors"] if target == "diffusers" else \
        [out / f"n{i}" / "adapter_model.safetensors" for i in range(2)]
    assert all(str(path) in stdout.splitlines() for path in written)
    assert all(open_file(path).keys() for path in written)


def test_output_dir_that_is_a_file_is_an_error(tmp_path, capsys):
    source = build_network(tmp_path / "n.safetensors", "sd1", rank=4)
    clash = tmp_path / "out"
    clash.write_bytes(b"not a folder")
    code, stdout, err = run_cli(capsys, "convert", str(source), "--output-dir", str(clash), "--to", "diffusers")
    # a fact about the filesystem, as an existing folder given as OUT is in every command: exit 1, one line
    assert code == 1 and stdout == "" and err.count("\n") == 1 and f"{clash}: not a folder" in err
    assert clash.read_bytes() == b"not a folder"


def test_output_dir_that_cannot_be_created_is_one_line(tmp_path, capsys):
    source = build_network(tmp_path / "n.safetensors", "sd1", rank=4)
    (tmp_path / "file").write_bytes(b"x")
    code, stdout, err = run_cli(capsys, "convert", str(source), "--output-dir", str(tmp_path / "file" / "sub"),
                                "--to", "diffusers")
    assert code == 1 and stdout == "" and len(err.strip().splitlines()) == 1 and "cannot create the output folder" in err


def test_output_dir_created_for_a_run_that_fails_is_removed(tmp_path, capsys):
    """Every file failed: the folders --output-dir created are removed (nothing left behind); a folder that
    existed before, or one that holds an output, stays."""
    source = build_network(tmp_path / "n.safetensors", "sd1", rank=4)  # te + unet: peft needs --component
    existing = tmp_path / "existing"
    existing.mkdir()
    for out in (tmp_path / "new" / "nested", existing / "sub"):
        code, stdout, err = run_cli(capsys, "convert", str(source), "--output-dir", str(out), "--to", "peft")
        assert code == 1 and stdout == "" and "--component" in err
    assert not (tmp_path / "new").exists() and existing.is_dir() and list(existing.iterdir()) == []
    code, stdout, _ = run_cli(capsys, "convert", str(source), str(tmp_path / "missing.safetensors"),
                              "--output-dir", str(tmp_path / "half"), "--to", "diffusers")
    assert code == 1 and stdout.splitlines() == [str(tmp_path / "half" / "n.safetensors")]
