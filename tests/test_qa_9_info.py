"""`lytools info` as a user runs it: the hashes of a pickled checkpoint, computed again here with hashlib."""

from __future__ import annotations

import hashlib
import json

import torch

from tests.shared import run_lytools


def test_pickled_checkpoint_hashes_include_a1111s_old_model_hash(tmp_path, capsys):
    generator = torch.Generator().manual_seed(0)
    # over 1.1 MiB, so the 64 KiB window at 1 MiB lies inside the file
    state = {f"model.diffusion_model.layer{i}.weight": torch.randn(128, 128, generator=generator) for i in range(20)}
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": state}, path)
    data = path.read_bytes()
    assert len(data) > 0x110000
    code, out, err = run_lytools(capsys, "info", "--hash", "--json", path)
    assert code == 0, err
    hashes = json.loads(out)[0]["hashes"]
    assert hashes["sha256"] == hashlib.sha256(data).hexdigest()
    assert hashes["autov2"] == hashlib.sha256(data).hexdigest()[:10]
    assert hashes["autov1"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    code, out, err = run_lytools(capsys, "info", "--hash", path)
    assert code == 0, err
    assert f"AutoV1        {hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]}" in out


def test_a_json_file_given_for_a_folder_is_named_as_json_with_its_folder(tmp_path, capsys):
    folder = tmp_path / "pipe"
    folder.mkdir()
    index = folder / "model_index.json"
    index.write_text(json.dumps({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}))
    config = tmp_path / "adapter_config.json"
    config.write_text('\n  {"r": 4, "lora_alpha": 4}')
    for path in (index, config):
        for args in (("info", path), ("extract", path, path, tmp_path / "out.safetensors")):
            code, out, err = run_lytools(capsys, *args)
            lines = err.strip().splitlines()
            assert code == 1 and not out and len(lines) == 1, err
            assert lines[0].startswith(f"lytools: error: {path}: a JSON file, not weights") and f"({path.parent})" in lines[0]
            assert "header length" not in err
    assert not (tmp_path / "out.safetensors").exists()
