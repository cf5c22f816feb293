"""resize refuses a module spelled twice (as merge and convert do), resize and merge of networks describe the
kxk convs they write alike (conv_dim/conv_alpha in ss_network_args), and merge --dry-run --strip-metadata says
in its plan that the metadata would be stripped."""

from __future__ import annotations

import json

import pytest
import torch

from lytools.errors import NetworkError
from lytools.io import read_header, write_safetensors
from lytools.merge import run_merge
from lytools.resize import ResizeOptions, resize_file
from lytools.testing import build_checkpoint, build_network
from tests.shared import read_tensors, run_lytools

CONV = "lora_unet_down_blocks_0_resnets_0_conv1"  # a 3x3 conv of SD1's UNet
LINEAR = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gaps7")
    ckpt = build_checkpoint(folder / "base.safetensors", "sd1", factor=16, components=("unet", "clip_l"))
    lierla = build_network(folder / "lierla.safetensors", "sd1", factor=16, rank=4, modules="lierla", seed=1)
    locon = build_network(folder / "locon.safetensors", "sd1", factor=16, rank=4, conv_rank=2, modules="c3lier", seed=2)
    loha = build_network(folder / "loha.safetensors", "sd1", factor=16, rank=4, conv_rank=2, modules="c3lier",
                         algo="loha", seed=3)
    return folder, ckpt, lierla, locon, loha


def _args(metadata: dict) -> dict:
    return json.loads(metadata.get("ss_network_args") or "{}")


def _refused(code: int, out: str, err: str) -> bool:
    return code == 1 and out == "" and err.count("\n") == 1 and err.startswith("lytools: error: ")


# -- 1. a module spelled twice ----------------------------------------------------------------------------
def test_resize_refuses_kohya_and_lycoris_spellings_of_one_module(files, tmp_path, capsys):
    """Written twice, a loader would apply that change twice: resize says so as merge and convert do."""
    _, _, lierla, _, _ = files
    tensors = read_tensors(lierla)
    twin = f"lycoris_{LINEAR[len('lora_unet_'):]}"
    for suffix in ("lora_down.weight", "lora_up.weight", "alpha"):
        tensors[f"{twin}.{suffix}"] = tensors[f"{LINEAR}.{suffix}"]
    twice = tmp_path / "twice.safetensors"
    write_safetensors(twice, tensors, {})
    out = tmp_path / "out.safetensors"
    code, stdout, err = run_lytools(capsys, "resize", twice, out, "--rank", "2")
    assert _refused(code, stdout, err), err
    assert str(twice) in err and LINEAR in err and twin in err and "are both" in err
    assert not out.exists() and list(tmp_path.iterdir()) == [twice]
    # merge says the same line
    code, stdout, merge_err = run_lytools(capsys, "merge", twice, "--dry-run")
    assert _refused(code, stdout, merge_err) and merge_err == err


def test_resize_refuses_kohya_and_diffusers_path_spellings(tmp_path):
    """SDXL: lora_unet_down_blocks_1_attentions_0_proj_in (diffusers path) is lora_unet_input_blocks_4_1_proj_in."""
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for name in ("lora_unet_down_blocks_1_attentions_0_proj_in", "lora_unet_input_blocks_4_1_proj_in"):
        tensors[f"{name}.lora_down.weight"] = torch.randn(4, 80, generator=gen)
        tensors[f"{name}.lora_up.weight"] = torch.randn(80, 4, generator=gen)
    both = tmp_path / "both.safetensors"
    write_safetensors(both, tensors, {"ss_base_model_version": "sdxl_base_v1-0"})
    out = tmp_path / "o.safetensors"
    with pytest.raises(NetworkError, match=r"both\.safetensors: modules lora_unet_down_blocks_1_attentions_0_proj_in "
                                           r"and lora_unet_input_blocks_4_1_proj_in are both"):
        resize_file(both, out, ResizeOptions(rank=2))
    assert not out.exists()


def test_resize_still_reads_one_spelling_per_module(files, tmp_path):
    _, _, lierla, _, _ = files
    out = tmp_path / "o.safetensors"
    summary = resize_file(lierla, out, ResizeOptions(rank=2))
    assert summary.modules and all(r.rank_out == 2 for r in summary.modules)


# -- 2. conv_dim / conv_alpha --------------------------------------------------------------------------------
def test_resize_adds_conv_args_the_input_lacked(files, tmp_path):
    """The input's ss_network_args said nothing of its 3x3 convs (or it had none): resize says what it writes,
    as merge of networks does, in sd-scripts' spelling ({"conv_dim": "<c>", "conv_alpha": "<float>"})."""
    _, _, _, locon, _ = files
    tensors = read_tensors(locon)
    assert tensors[f"{CONV}.lora_down.weight"].dim() == 4
    for metadata in ({}, {"ss_network_args": json.dumps({"dropout": "0.1"})}):
        source = tmp_path / "in.safetensors"
        write_safetensors(source, tensors, metadata, overwrite=True)
        out = tmp_path / "o.safetensors"
        resize_file(source, out, ResizeOptions(rank=3, conv_rank=1, overwrite=True))
        written, meta = read_tensors(out), read_header(out).metadata
        assert written[f"{CONV}.lora_down.weight"].shape[0] == 1
        expected = {"conv_dim": "1", "conv_alpha": str(float(written[f"{CONV}.alpha"]))}
        assert _args(meta) == {**_args(metadata), **expected}
        assert meta["ss_network_dim"] == "3"


def test_resize_and_merge_describe_flattened_loha_convs_alike(files, tmp_path):
    """A LoHa 3x3 conv without Tucker (factors stored flattened) is a conv for both commands: merge by
    combine.table_kernel, resize by flattening it to a (r, in, 3, 3) LoCon through the name tables."""
    _, _, _, _, loha = files
    assert len(read_header(loha).tensors[f"{CONV}.hada_w1_b"].shape) == 2
    merged = tmp_path / "merged.safetensors"
    run_merge([loha], merged)
    resized = tmp_path / "resized.safetensors"
    resize_file(loha, resized, ResizeOptions(rank=4, conv_rank=2))
    assert read_tensors(resized)[f"{CONV}.lora_down.weight"].shape[2:] == (3, 3)
    merged_args, resized_args = _args(read_header(merged).metadata), _args(read_header(resized).metadata)
    assert merged_args["conv_dim"] == resized_args["conv_dim"] == "2"
    assert merged_args["conv_alpha"] == resized_args["conv_alpha"] == "2.0"


def test_resize_removes_conv_args_without_convs_and_says_dynamic(files, tmp_path):
    _, _, lierla, locon, _ = files
    # conv_dim claimed by a file without any kxk conv: not what is written
    source = tmp_path / "claims.safetensors"
    write_safetensors(source, read_tensors(lierla), {"ss_network_args": json.dumps({"conv_dim": "8", "conv_alpha": "4"})})
    out = tmp_path / "o.safetensors"
    resize_file(source, out, ResizeOptions(rank=2))
    assert _args(read_header(out).metadata) == {}
    # no ss_network_args and no conv: none added
    resize_file(lierla, out, ResizeOptions(rank=2, overwrite=True))
    assert "ss_network_args" not in read_header(out).metadata
    # a dynamic method: conv_dim follows ss_network_dim ("Dynamic")
    resize_file(locon, out, ResizeOptions(method="sv_fro", method_param=0.9, overwrite=True))
    meta = read_header(out).metadata
    assert meta["ss_network_dim"] == "Dynamic"
    assert _args(meta) == {"conv_dim": "Dynamic", "conv_alpha": "Dynamic"}


def test_resize_conv_alpha_dynamic_where_convs_differ(files, tmp_path):
    """Two convs written at the same rank with different alphas: no one conv_alpha is true ("Dynamic", as merge
    and ss_network_alpha say it)."""
    _, _, _, locon, _ = files
    tensors = read_tensors(locon)
    convs = sorted({k.split(".")[0] for k in tensors if k.endswith("lora_down.weight") and tensors[k].dim() == 4
                    and tensors[k].shape[2:] != (1, 1)})
    assert len(convs) >= 2
    tensors[f"{convs[0]}.alpha"] = torch.tensor(0.5, dtype=tensors[f"{convs[0]}.alpha"].dtype)
    source = tmp_path / "alphas.safetensors"
    write_safetensors(source, tensors, {})
    out = tmp_path / "o.safetensors"
    resize_file(source, out, ResizeOptions(rank=4, conv_rank=2))  # convs copied at their own rank 2
    assert _args(read_header(out).metadata) == {"conv_dim": "2", "conv_alpha": "Dynamic"}


# -- 3. merge --dry-run --strip-metadata --------------------------------------------------------------------
STRIPPED = "metadata: stripped"


@pytest.mark.parametrize("into_checkpoint", [False, True])
def test_merge_dry_run_plan_says_metadata_is_stripped(files, tmp_path, capsys, into_checkpoint):
    _, ckpt, lierla, locon, _ = files
    inputs = [ckpt, lierla] if into_checkpoint else [lierla, locon]
    out = tmp_path / "out.safetensors"
    code, text, _ = run_lytools(capsys, "merge", *inputs, "-o", out, "--dry-run", "--strip-metadata")
    assert code == 0 and STRIPPED in text and not out.exists()
    code, plain, _ = run_lytools(capsys, "merge", *inputs, "-o", out, "--dry-run")
    assert code == 0 and STRIPPED not in plain
    assert text.replace(text[text.index(STRIPPED):].split("\n")[0] + "\n", "") == plain  # nothing else differs
    code, stdout, _ = run_lytools(capsys, "merge", *inputs, "--dry-run", "--strip-metadata", "--json")
    assert code == 0 and json.loads(stdout)["metadata"] == "stripped"
    code, stdout, _ = run_lytools(capsys, "merge", *inputs, "--dry-run", "--json")
    assert code == 0 and "metadata" not in json.loads(stdout)
