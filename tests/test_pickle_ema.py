"""Pickled checkpoints' EMA copies and legacy (non-zip) pickles (FORMATS.md 6).

EMA copies (`model_ema.*`) are dropped unless asked for (`--keep-ema` on merge and convert), and
legacy pickles, which cannot be mapped, come with a note about memory."""

from __future__ import annotations

import json

import pytest
import torch

from lytools.io import open_file
from lytools.testing import build_checkpoint, build_network
from tests.shared import read_tensors
from tests.shared import run_lytools as cli


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("ema")
    base = build_checkpoint(root / "base.safetensors", "sd1", factor=16, dtype=torch.float32)
    net = build_network(root / "net.safetensors", "sd1", factor=16, rank=4)
    tensors = read_tensors(base)
    unet = [k for k in tensors if k.startswith("model.diffusion_model.")]
    # LDM stores the EMA copy with the dots of the module path removed, plus two counters
    ema = {"model_ema." + k[len("model."):].replace(".", ""): tensors[k].clone() + 1 for k in unet[:20]}
    ema["model_ema.decay"] = torch.tensor(0.9999)
    ema["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    ckpt = root / "with-ema.ckpt"
    torch.save({"state_dict": {**tensors, **ema}, "global_step": 1000}, ckpt)
    legacy = root / "legacy.ckpt"
    torch.save({"state_dict": tensors}, legacy, _use_new_zipfile_serialization=False)
    return {"base": base, "net": net, "ckpt": ckpt, "legacy": legacy, "tensors": tensors, "ema": ema}


def test_open_file_leaves_the_ema_copy_out_unless_asked(models):
    with open_file(models["ckpt"]) as reader:
        assert set(reader.keys()) == set(models["tensors"])
        assert reader.ema_dropped == len(models["ema"])
        assert any("--keep-ema" in note for note in reader.notes())
    with open_file(models["ckpt"], keep_ema=True) as reader:
        assert set(reader.keys()) == set(models["tensors"]) | set(models["ema"])
        assert reader.ema_dropped == 0 and not reader.notes()


def test_a_file_holding_only_an_ema_copy_keeps_it(tmp_path, models):
    path = tmp_path / "only-ema.pt"
    torch.save(models["ema"], path)
    with open_file(path) as reader:
        assert set(reader.keys()) == set(models["ema"])


def test_merge_drops_the_ema_copy_by_default_and_keeps_it_when_asked(models, tmp_path, capsys):
    reference = tmp_path / "reference.safetensors"
    assert cli(capsys, "merge", models["base"], models["net"], "-o", reference, "-q")[0] == 0
    out = tmp_path / "merged.safetensors"
    code, _, err = cli(capsys, "merge", models["ckpt"], models["net"], "-o", out, "--verify")
    assert code == 0, err
    assert "EMA tensor(s) (model_ema.*) are left out" in err
    merged, expected = read_tensors(out), read_tensors(reference)
    assert set(merged) == set(expected)
    assert all(torch.equal(merged[k], v) for k, v in expected.items())

    kept = tmp_path / "kept.safetensors"
    code, _, err = cli(capsys, "merge", models["ckpt"], models["net"], "-o", kept, "--keep-ema", "--verify")
    assert code == 0, err
    assert "left out" not in err
    merged = read_tensors(kept)
    assert set(merged) == set(expected) | set(models["ema"])
    assert all(torch.equal(merged[k], v) for k, v in models["ema"].items())  # the EMA copy is not merged into


def test_keep_ema_is_refused_where_it_cannot_apply(models, tmp_path, capsys):
    code, _, err = cli(capsys, "merge", models["net"], models["net"], "-o", tmp_path / "n.safetensors", "--keep-ema")
    assert code == 2 and "--keep-ema" in err
    code, _, err = cli(capsys, "convert", models["net"], "-o", tmp_path / "d.safetensors", "--to", "diffusers",
                       "--keep-ema")
    assert code == 2 and "--keep-ema" in err
    assert not (tmp_path / "n.safetensors").exists() and not (tmp_path / "d.safetensors").exists()


def test_convert_cast_drops_the_ema_copy_unless_asked(models, tmp_path, capsys):
    out = tmp_path / "cast.safetensors"
    code, _, err = cli(capsys, "convert", models["ckpt"], "-o", out, "--save-dtype", "fp16")
    assert code == 0, err
    assert "left out" in err
    written = read_tensors(out)
    assert set(written) == set(models["tensors"])
    kept = tmp_path / "kept.safetensors"
    code, _, err = cli(capsys, "convert", models["ckpt"], "-o", kept, "--save-dtype", "fp16", "--keep-ema")
    assert code == 0, err
    written = read_tensors(kept)
    assert set(written) == set(models["tensors"]) | set(models["ema"])
    assert written["model_ema.num_updates"].dtype == torch.int32  # integer counters are not cast


def test_info_names_the_ema_copy_and_a_legacy_pickle(models, capsys):
    code, out, err = cli(capsys, "info", models["ckpt"], "--json")
    assert code == 0, err
    report = json.loads(out)
    report = report[0] if isinstance(report, list) else report
    assert report["tensor_count"] == len(models["tensors"]) + len(models["ema"])  # info shows what the file holds
    assert any("EMA copy" in note for note in report["notes"])
    code, out, err = cli(capsys, "info", models["legacy"], "--json")
    assert code == 0, err
    report = json.loads(out)
    report = report[0] if isinstance(report, list) else report
    assert any("legacy" in note for note in report["notes"])


def test_merge_into_a_legacy_pickle_warns_about_memory(models, tmp_path, capsys):
    out = tmp_path / "merged.safetensors"
    code, _, err = cli(capsys, "merge", models["legacy"], models["net"], "-o", out, "-q")
    assert code == 0, err
    assert "legacy" in err and "into memory" in err  # a warning shows even with -q
    reference = tmp_path / "reference.safetensors"
    assert cli(capsys, "merge", models["base"], models["net"], "-o", reference, "-q")[0] == 0
    merged, expected = read_tensors(out), read_tensors(reference)
    assert set(merged) == set(expected) and all(torch.equal(merged[k], v) for k, v in expected.items())
