"""Durability of convert outputs: atomic always, fsynced only with --fsync."""

from __future__ import annotations

import os

import pytest
import torch

from lytools.io import SafetensorsWriter, plan_entry, read_header
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
