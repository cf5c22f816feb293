"""QA of --strip-metadata, OUT rules and the metadata resize and merge write (session 8): each test pins
a bug found from the command line."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from lytools.algos import delta
from lytools.convert import load_network
from lytools.io import read_header
from lytools.testing import build_network, select_modules
from tests.shared import run_lytools as cli


def run(capsys, *args) -> None:
    code, _, err = cli(capsys, *args, "-q")
    assert code == 0, err


@pytest.fixture(scope="module")
def diffusers_lora(tmp_path_factory):
    """An SD1 UNet LoRA (alpha != rank) in diffusers names, as convert --to diffusers writes it: with the
    lora_adapter_metadata diffusers reads its LoraConfig from."""
    folder = tmp_path_factory.mktemp("qa8")
    modules = [m for m in select_modules("sd1", "c3lier", components=["unet"]) if "_1_" in m]
    kohya = build_network(folder / "k.safetensors", "sd1", factor=8, rank=6, alpha=3.0, modules=modules,
                          dtype=torch.float32)
    from lytools.convert import ConvertOptions, convert_file
    out = folder / "d.safetensors"
    convert_file(kohya, out, ConvertOptions(target="diffusers"))
    assert "lora_adapter_metadata" in read_header(out).metadata
    return out


def load_in_diffusers(path: Path) -> dict[str, torch.Tensor]:
    """Load the file as diffusers' pipelines do (metadata included) into a tiny SD1 UNet; {kohya name: ΔW}."""
    pytest.importorskip("peft")
    from tests.test_extract_loaders import tiny_sd1_unet
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from peft.tuners.lora import LoraLayer

    unet = tiny_sd1_unet()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state, alphas, metadata = StableDiffusionLoraLoaderMixin.lora_state_dict(str(path), return_lora_metadata=True)
        StableDiffusionLoraLoaderMixin.load_lora_into_unet(state, alphas, unet, adapter_name="x", metadata=metadata)
    return {"lora_unet_" + name.replace(".", "_"): module.get_delta_weight("x").float()
            for name, module in unet.named_modules() if isinstance(module, LoraLayer) and "x" in module.lora_A}


@pytest.mark.parametrize("command", [
    ("resize", "--rank", "2"), ("resize", "--rank", "2", "--strip-metadata"),
    ("merge", "--strip-metadata"), ("merge", "--rank", "3"),
])
def test_kohya_outputs_of_diffusers_inputs_drop_the_adapter_metadata(diffusers_lora, tmp_path, capsys, command):
    """resize and merge of networks write kohya factors with alpha tensors; the input's lora_adapter_metadata
    (carried, and kept by --strip-metadata) made diffusers refuse the file ('Both network_alphas and metadata
    cannot be specified') and described ranks no longer written."""
    pytest.importorskip("diffusers")
    out = tmp_path / "out.safetensors"
    if command[0] == "resize":
        run(capsys, "resize", diffusers_lora, out, *command[1:])
    else:
        run(capsys, "merge", diffusers_lora, diffusers_lora, "-o", out, *command[1:])
    metadata = read_header(out).metadata or {}
    assert not [key for key in metadata if key.endswith("lora_adapter_metadata")], sorted(metadata)
    found = load_in_diffusers(out)
    ours = load_network(out)
    assert found and set(found) == set(ours.modules)
    for name, module in ours.modules.items():
        torch.testing.assert_close(found[name], delta(module, found[name].shape).float(), rtol=1e-3, atol=1e-5)


@pytest.fixture(scope="module")
def clip_l(tmp_path_factory):
    """A CLIP-L-only network in kohya names (lora_te_: sd1) and the same stripped into diffusers names, which
    fit sd1, sdxl, sd3 and flux alike (no metadata says which)."""
    folder = tmp_path_factory.mktemp("qa8-clip")
    kohya = build_network(folder / "te.safetensors", "sd1", factor=8, rank=4, alpha=2.0, components=["te"],
                          dtype=torch.float32)
    from lytools.convert import ConvertOptions, convert_file
    stripped = folder / "te-diffusers.safetensors"
    convert_file(kohya, stripped, ConvertOptions(target="diffusers", strip_metadata=True))
    assert load_network(stripped).tied
    return kohya, stripped


def test_resize_refuses_tied_diffusers_names(clip_l, tmp_path, capsys):
    """resize wrote `text_encoder.text_model....lora_down.weight` (diffusers paths, kohya factors: no loader reads
    them) while saying 'written with kohya names'; now one line pointing to convert --arch, as convert says."""
    _, tied = clip_l
    out = tmp_path / "out.safetensors"
    code, _, err = cli(capsys, "resize", tied, out, "--rank", "2")
    assert code == 1 and not out.exists()
    assert err.count("\n") == 1 and "have no kohya name" in err and "sd1 and sdxl" in err and "--arch ARCH" in err


def test_merge_names_tied_modules_as_the_other_inputs_say(clip_l, tmp_path, capsys):
    """merge of the diffusers-named CLIP-L network with its kohya twin wrote 144 modules: each layer twice, once
    per spelling (a loader applies both). The kohya input says sd1: the tied one is read as sd1 and the layers
    concatenate (--rank too); two tied inputs name no architecture and are refused, pointing to convert --arch."""
    kohya, tied = clip_l
    out = tmp_path / "out.safetensors"
    for inputs in ((tied, kohya), (kohya, tied)):
        run(capsys, "merge", *inputs, "-o", out, "--overwrite", "--verify")  # --verify reads them alike
        keys = read_header(out).tensors
        assert len([k for k in keys if k.endswith(".lora_down.weight")]) == 72 and all(k.startswith("lora_te_") for k in keys)
        merged, single = load_network(out), load_network(kohya)
        for name, module in single.modules.items():  # the same change twice: ΔW doubled
            shape = module["lora_up.weight"].shape[:1] + module["lora_down.weight"].shape[1:]
            torch.testing.assert_close(delta(merged.modules[name], shape).float(), 2 * delta(module, shape).float(),
                                       rtol=1e-4, atol=1e-6)
    run(capsys, "merge", tied, kohya, "-o", out, "--overwrite", "--verify", "--rank", "2")
    out.unlink()
    for extra in ((), ("--dry-run",), ("--rank", "2")):
        code, _, err = cli(capsys, "merge", tied, tied, "-o", out, *extra)
        assert code == 1 and not out.exists(), err
        assert err.count("\n") == 1 and "have no kohya name" in err and "--to kohya --arch ARCH" in err, err
    # into a checkpoint the modules are placed by the checkpoint's names: merged as before
    from lytools.testing import build_checkpoint
    base = build_checkpoint(tmp_path / "base.safetensors", "sd1", factor=8, components=("clip_l",))
    run(capsys, "merge", base, tied, "-o", out)


def test_a_tie_whose_architectures_agree_on_kohya_names_gets_them(tmp_path, capsys):
    """CLIP-L + CLIP-G in diffusers names fit sdxl and sd3, which both name them lora_te1_/lora_te2_: resize wrote
    the diffusers paths with kohya factors, and merge with a kohya twin spelled every layer twice."""
    kohya = build_network(tmp_path / "te.safetensors", "sdxl", components=["te1", "te2"], factor=8)
    tied = build_network(tmp_path / "te-d.safetensors", "sdxl", components=["te1", "te2"], factor=8, layout="diffusers")
    out = tmp_path / "out.safetensors"
    run(capsys, "resize", tied, out, "--rank", "2")
    keys = read_header(out).tensors
    assert keys and all(k.startswith(("lora_te1_", "lora_te2_")) for k in keys)
    run(capsys, "merge", kohya, tied, "-o", out, "--overwrite")
    assert len(load_network(out).modules) == len(load_network(kohya).modules)


def test_report_never_replaces_a_file_of_an_input(tmp_path, capsys):
    """--report with --overwrite replaced an input's files: a sharded BASE's .index.json, a config of a diffusers
    folder given as BASE, a peft adapter folder's adapter_config.json (resize IN); refused as OUT is, exit 1."""
    import shutil

    from lytools.convert import ConvertOptions, convert_file
    from lytools.testing import build_checkpoint, build_tuned
    from tests.test_container_audit import write_diffusers_folder

    net = build_network(tmp_path / "net.safetensors", "sd1", factor=16, rank=2, dtype=torch.float32)
    base = build_checkpoint(tmp_path / "base.safetensors", "sd1", factor=16, dtype=torch.float32)
    tuned = build_tuned(base, tmp_path / "tuned.safetensors", net).path
    folder = write_diffusers_folder(base, tmp_path / "pipe")
    index = tmp_path / "base.safetensors.index.json"  # one shard: enough to be read as a sharded checkpoint
    shutil.copy(base, tmp_path / "base-00001-of-00001.safetensors")
    index.write_text(json.dumps({"metadata": {}, "weight_map": {k: "base-00001-of-00001.safetensors"
                                                                for k in read_header(base).tensors}}))
    adapter = tmp_path / "adapter"
    convert_file(net, adapter, ConvertOptions(target="peft", component="unet"))
    out = tmp_path / "out.safetensors"
    cases = [
        (("extract", index, tuned, out, "--linear-dim", "2", "--conv-dim", "2"), index),
        (("extract", folder, tuned, out, "--linear-dim", "2", "--conv-dim", "2"), folder / "unet" / "config.json"),
        (("resize", adapter, out, "--rank", "1"), adapter / "adapter_config.json"),
        (("resize", adapter / "adapter_model.safetensors", out, "--rank", "1"), adapter / "adapter_config.json"),
    ]
    for args, victim in cases:
        before = victim.read_bytes()
        code, _, err = cli(capsys, *args, "--report", victim, "--overwrite")
        assert code == 1 and "the report would replace a file of the input" in err, (args, err)
        assert victim.read_bytes() == before and not out.exists()
    run(capsys, "resize", adapter, out, "--rank", "1", "--report", adapter / "new.json")  # a new file there is fine


def test_out_never_replaces_a_peft_inputs_adapter_config(tmp_path, capsys):
    """A peft adapter folder is an input of resize and merge (read with the adapter_config.json beside it): OUT
    naming that config replaced it with a safetensors file, even though OUT may not name an input."""
    from lytools.convert import ConvertOptions, convert_file

    net = build_network(tmp_path / "net.safetensors", "sd1", factor=16, rank=2, dtype=torch.float32)
    adapter = tmp_path / "adapter"
    convert_file(net, adapter, ConvertOptions(target="peft", component="unet"))
    config = adapter / "adapter_config.json"
    before = config.read_bytes()
    for args in (("resize", adapter, config, "--rank", "1"), ("resize", adapter / "adapter_model.safetensors", config, "--rank", "1"),
                 ("merge", adapter, net, "-o", config), ("merge", net, adapter, "-o", config, "--dry-run")):
        code, _, err = cli(capsys, *args, "--overwrite")
        assert code == 1 and "would replace" in err, (args, err)
        assert config.read_bytes() == before


@pytest.mark.parametrize("command", [("resize", "--rank", "2"), ("merge",)])
def test_a1111_completion_does_not_need_metadata(tmp_path, capsys, command):
    """Partial SDXL OpenCLIP attention layers (q/k only, lora_te2_) are completed with zero modules for A1111
    when metadata says sdxl; a stripped file has none, its lora_te2_ names fit sdxl and sd3, and the layers were
    left partial: A1111 then skips them silently."""
    modules = [m for m in select_modules("sdxl", "lierla", components=["te2"]) if m.endswith(("q_proj", "k_proj"))]
    net = build_network(tmp_path / "te2.safetensors", "sdxl", factor=8, modules=modules)
    out = tmp_path / "out.safetensors"
    if command[0] == "resize":
        run(capsys, "resize", net, out, *command[1:], "--strip-metadata")
    else:
        run(capsys, "merge", net, net, "-o", out, "--strip-metadata")
    names = {key.split(".")[0] for key in read_header(out).tensors}
    assert len(names) == 2 * len(modules)
    assert {name.rsplit("_", 2)[1] for name in names} == {"q", "k", "v", "out"}


def test_merge_names_both_architectures_for_a_tied_network_that_fits_none(tmp_path, capsys):
    """A stripped SDXL CLIP-L network (lora_te1_: sdxl, sd3 or flux) merged into an SD1 checkpoint was refused as
    '72 module(s) match no tensor', without saying why; the architectures are named as for a detected one."""
    from lytools.testing import build_checkpoint

    base = build_checkpoint(tmp_path / "base.safetensors", "sd1", factor=16, components=("clip_l",))
    net = build_network(tmp_path / "te1.safetensors", "sdxl", factor=8, components=["te1"])
    code, _, err = cli(capsys, "merge", base, net, "-o", tmp_path / "out.safetensors")
    assert code == 1 and "te1.safetensors is a sdxl or sd3 or flux network, base.safetensors a sd1 checkpoint" in err, err
