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
