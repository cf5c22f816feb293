"""lytools resize as a LyCORIS / kohya user runs it (spec: CLI.md resize, ALGORITHMS.md 12.1, 16)."""

from __future__ import annotations

import json

import torch

from lytools.io import write_safetensors
from tests.shared import read_tensors, run_lytools


def test_truncating_a_lycoris_dylora_checks_its_block_size(tmp_path, capsys):
    """LyCORIS algo=dylora records its block size as `block_size` (kohya's DyLoRA: `unit`): a truncation off
    that block size went without the report ALGORITHMS.md 16 asks for."""
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "lycoris_proj.lora_down.weight": torch.randn(8, 64, generator=gen), "lycoris_proj.lora_up.weight": torch.randn(48, 8, generator=gen),
        "lycoris_proj.alpha": torch.tensor(4.0),
    }
    args = {"algo": "dylora", "block_size": "2", "conv_dim": "8"}
    source = tmp_path / "d.safetensors"
    write_safetensors(source, tensors, {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps(args)})
    code, out, err = run_lytools(capsys, "resize", source, tmp_path / "t.safetensors", "--rank", "3", "--truncate", "--json")
    assert code == 0, err
    assert "not a multiple of the DyLoRA unit 2" in err
    report = json.loads(out)
    [module] = report["modules"]
    assert module["rank_out"] == 3 and "unit 2" in module["note"]
    assert err.count("not a multiple of the DyLoRA unit 2") == 1  # said once
    assert [w for w in report["warnings"] if "not a multiple of the DyLoRA unit 2" in w]  # and in --json
    written = read_tensors(tmp_path / "t.safetensors")
    assert torch.equal(written["lycoris_proj.lora_down.weight"], tensors["lycoris_proj.lora_down.weight"][:3])
    # a multiple of the block size: no warning
    code, _, err = run_lytools(capsys, "resize", source, tmp_path / "t4.safetensors", "--rank", "4", "--truncate")
    assert code == 0 and "DyLoRA unit" not in err
