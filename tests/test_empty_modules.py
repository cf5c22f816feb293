"""A rank-0 module (empty lora_down / lora_up) holds no weight change: every command names it in one
line (it used to be an internal ZeroDivisionError from alpha / rank), and info lists it as invalid."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file, save_file

from lytools.algos import describe_shapes
from lytools.errors import NetworkError
from lytools.testing import build_checkpoint, build_network
from tests.shared import run_lytools

MODULE = "lora_unet_down_blocks_0_attentions_0_proj_in"


def test_describe_refuses_an_empty_factor():
    with pytest.raises(NetworkError, match=r"module m: lora_down.weight is empty \(shape \(0, 8\)\)"):
        describe_shapes("m", {"lora_down.weight": (0, 8), "lora_up.weight": (4, 0), "alpha": ()})


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("empty")
    base = build_checkpoint(folder / "base.safetensors", "sd1")
    good = build_network(folder / "net.safetensors", "sd1")
    tensors = load_file(good)
    down, up = tensors[f"{MODULE}.lora_down.weight"], tensors[f"{MODULE}.lora_up.weight"]
    tensors[f"{MODULE}.lora_down.weight"] = down[:0].clone()
    tensors[f"{MODULE}.lora_up.weight"] = up[:, :0].clone()
    empty = folder / "r0.safetensors"
    save_file(tensors, empty)
    return folder, base, good, empty


@pytest.mark.parametrize("command", ["merge_ckpt", "merge_nets", "merge_rank", "convert", "resize"])
def test_commands_name_the_empty_module(files, capsys, command):
    folder, base, good, empty = files
    out = folder / f"{command}.safetensors"
    args = {
        "merge_ckpt": ["merge", base, empty, "-o", out],
        "merge_nets": ["merge", empty, good, "-o", out],
        "merge_rank": ["merge", good, empty, "-o", out, "--rank", "4"],
        "convert": ["convert", empty, "-o", out, "--to", "diffusers"],
        "resize": ["resize", empty, out, "--rank", "2"],
    }[command]
    code, stdout, err = run_lytools(capsys, *args)
    assert code == 1 and stdout == "" and err.count("\n") == 1, err
    assert "r0.safetensors" in err and MODULE in err and "rank-0" in err and "internal error" not in err
    assert not out.exists()


def test_info_lists_the_empty_module_as_invalid(files, capsys):
    _, _, _, empty = files
    code, stdout, _ = run_lytools(capsys, "info", empty)
    assert code == 0
    assert "invalid" in stdout and MODULE in stdout and "rank-0" in stdout
