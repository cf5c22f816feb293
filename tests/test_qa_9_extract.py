"""`lytools extract` as a user runs it: what the output can be loaded by."""

from __future__ import annotations

import pytest

from lytools.testing import build_checkpoint, build_network, build_tuned, select_modules
from tests.shared import read_tensors, run_lytools


@pytest.fixture(scope="module")
def sd1_pair(tmp_path_factory):
    """A shrunk SD1 pair (UNet + CLIP) whose fine-tune changes a few attention and conv modules at rank 4."""
    folder = tmp_path_factory.mktemp("qa9-extract")
    base = build_checkpoint(folder / "base.safetensors", "sd1", factor=8, components=("unet", "clip_l"))
    modules = [m for m in select_modules("sd1", "c3lier") if "down_blocks_0" in m or m.endswith("layers_0_mlp_fc1")]
    network = build_network(folder / "net.safetensors", "sd1", factor=8, rank=4, modules=modules)
    tuned = build_tuned(base, folder / "tuned.safetensors", network, noise=1e-4)
    return base, tuned.path


# -- modules stored whole: said, since diffusers and kohya's scripts cannot load `diff` ---------------------
def test_modules_stored_whole_warn_which_loaders_cannot_read_them(sd1_pair, tmp_path, capsys):
    base, tuned = sd1_pair
    out = tmp_path / "whole.safetensors"
    # rank 24 reaches half the outputs of the 40-wide attention layers of this shrunk UNet: stored whole
    code, _, err = run_lytools(capsys, "extract", base, tuned, out, "--linear-dim", "24", "--conv-dim", "4", "-q")
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "stored whole" in warnings[0] and "diffusers" in warnings[0], err
    assert "--no-full-fallback" in warnings[0]
    low = tmp_path / "low.safetensors"
    code, _, err = run_lytools(capsys, "extract", base, tuned, low, "--linear-dim", "24", "--conv-dim", "4", "-q",
                               "--no-full-fallback")
    assert code == 0 and "stored whole" not in err, err
    # what the warning says is so: diffusers refuses the `diff` modules and reads the low-rank file
    diffusers = pytest.importorskip("diffusers")
    loader = diffusers.loaders.StableDiffusionLoraLoaderMixin
    assert any(key.endswith(".diff") for key in read_tensors(out))
    with pytest.raises(ValueError):
        loader.lora_state_dict(str(out))
    state_dict, _ = loader.lora_state_dict(str(low))
    assert state_dict


def test_mode_full_says_which_loaders_read_it_without_a_warning(sd1_pair, tmp_path, capsys):
    base, tuned = sd1_pair
    code, _, err = run_lytools(capsys, "extract", base, tuned, tmp_path / "full.safetensors", "--mode", "full")
    assert code == 0, err
    assert "warning:" not in err and "stored whole (LyCORIS `diff`)" in err and "diffusers" in err, err
