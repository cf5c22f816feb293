"""QA of `lytools merge` (session 9): each test pins a bug found from the command line."""

from __future__ import annotations

import json

import pytest
import torch

from lytools.io import write_safetensors
from tests.shared import read_tensors
from tests.shared import run_lytools as cli

NORM = "lora_unet_down_blocks_0_resnets_0_norm1"  # an SD1 GroupNorm (LyCORIS train_norm: w_norm, b_norm)
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"
PROJ = "lora_unet_down_blocks_0_attentions_0_proj_in"


def lycoris_file(path, seed: int, *, bias: bool = True):
    """A LyCORIS file of an SD1 UNet: a LoCon, a norm module (w_norm/b_norm) and a full module (diff/diff_b)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        f"{CONV}.lora_down.weight": torch.randn(4, 20, 3, 3, generator=gen),
        f"{CONV}.lora_up.weight": torch.randn(20, 4, 1, 1, generator=gen),
        f"{CONV}.alpha": torch.tensor(2.0),
        f"{NORM}.w_norm": torch.randn(20, generator=gen),
        f"{NORM}.b_norm": torch.randn(20, generator=gen),
        f"{PROJ}.diff": torch.randn(20, 20, 1, 1, generator=gen),
    }
    if bias:
        tensors[f"{PROJ}.diff_b"] = torch.randn(20, generator=gen)
    write_safetensors(path, tensors, {"ss_network_module": "lycoris.kohya"})
    return path, tensors


@pytest.fixture
def two_lycoris(tmp_path):
    return lycoris_file(tmp_path / "a.safetensors", 1), lycoris_file(tmp_path / "b.safetensors", 2, bias=False)


def test_full_and_norm_modules_of_several_networks_add_up_exactly(two_lycoris, tmp_path, capsys):
    """Two LyCORIS files with train_norm (or full modules) on the same layers were refused as "cannot be
    combined exactly; use --rank N", though their tensors are the change itself and sum exactly."""
    (a, ta), (b, tb) = two_lycoris
    out = tmp_path / "ab.safetensors"
    code, stdout, err = cli(capsys, "merge", a, b, "-o", out, "--ratios", "0.7", "-0.4", "--json", "-q")
    assert code == 0, err
    methods = {m["module"]: m["method"] for m in json.loads(stdout)["per_module"]}
    assert methods == {CONV: "concat", NORM: "sum", PROJ: "sum"}
    merged = read_tensors(out)
    for suffix in ("w_norm", "b_norm"):
        key = f"{NORM}.{suffix}"
        torch.testing.assert_close(merged[key], 0.7 * ta[key] - 0.4 * tb[key])
    torch.testing.assert_close(merged[f"{PROJ}.diff"], 0.7 * ta[f"{PROJ}.diff"] - 0.4 * tb[f"{PROJ}.diff"])
    torch.testing.assert_close(merged[f"{PROJ}.diff_b"], 0.7 * ta[f"{PROJ}.diff_b"])  # only a has one


@pytest.mark.parametrize("inputs", [1, 2])
def test_rank_keeps_norm_modules_as_norms(two_lycoris, tmp_path, capsys, inputs):
    """--rank re-factored a norm layer's 1-D change by SVD into a "LoRA" with a 1-D lora_down (C,) and a
    (C, 1) lora_up, which no loader reads, and dropped b_norm; the norm change is summed as it is instead."""
    (a, ta), (b, tb) = two_lycoris
    out = tmp_path / "ab.safetensors"
    paths, ratios = [a, b][:inputs], ["0.5", "2"][:inputs]
    code, _, err = cli(capsys, "merge", *paths, "-o", out, "--ratios", *ratios, "--rank", "2", "--verify", "-q")
    assert code == 0, err
    merged = read_tensors(out)
    assert sorted(key for key in merged if key.startswith(NORM)) == [f"{NORM}.b_norm", f"{NORM}.w_norm"]
    for suffix in ("w_norm", "b_norm"):
        key = f"{NORM}.{suffix}"
        want = sum(float(r) * t[key] for r, t in zip(ratios, [ta, tb]))
        torch.testing.assert_close(merged[key], want)
    assert merged[f"{PROJ}.lora_down.weight"].shape == (2, 20, 1, 1)  # full 2-D changes are still re-factored


def test_allow_unmatched_does_not_merge_a_network_for_another_architecture(tmp_path, capsys):
    """A Flux LoRA given to an SD3 checkpoint with --allow-unmatched was "merged": every module skipped, a
    plain copy of the checkpoint written with exit 0. --allow-unmatched is for the few modules a checkpoint
    lacks; a network detected as made for another architecture is refused as it is without it."""
    from lytools.testing import build_checkpoint, build_network

    base = build_checkpoint(tmp_path / "sd3.safetensors", "sd3", factor=32, components=("unet",), keep_blocks=2)
    flux = build_network(tmp_path / "flux.safetensors", "flux", factor=32, components=("unet",))
    out = tmp_path / "out.safetensors"
    code, stdout, err = cli(capsys, "merge", base, flux, "-o", out, "--allow-unmatched")
    assert code == 1 and stdout == "" and len(err.strip().splitlines()) == 1, err
    assert "flux.safetensors is a flux network, sd3.safetensors a sd3 checkpoint" in err
    assert "--allow-unmatched" not in err and not out.exists()


def glora_change(t: dict, name: str, weight: torch.Tensor) -> torch.Tensor:
    """ΔW of a linear GLoRA module by ALGORITHMS.md 8 (either layout), scale alpha / rank included."""
    a1, a2, b1, b2 = (t[f"{name}.{s}.weight"].double() for s in ("a1", "a2", "b1", "b2"))
    if b2.shape[0] == weight.shape[0]:  # old layout: a1 (r, in), a2 (in, r), b1 (r, in), b2 (out, r)
        return float(t[f"{name}.alpha"]) / a1.shape[0] * (b2 @ b1 + weight @ a2 @ a1)
    return float(t[f"{name}.alpha"]) / a2.shape[0] * (b1 @ b2 + weight @ a1 @ a2)


@pytest.mark.parametrize("old_layout", [False, True])
def test_glora_takes_a_ratio_exactly(tmp_path, capsys, old_layout):
    """A GLoRA module merged into a network at a ratio other than 1 was refused ("glora cannot take ratio 0.6
    exactly"), though its change is linear in a1 and b1 together: both are scaled by the ratio."""
    name, gen = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", torch.Generator().manual_seed(3)
    out_f, in_f, rank = 20, 24, 3
    shapes = ({"a1": (rank, in_f), "a2": (in_f, rank), "b1": (rank, in_f), "b2": (out_f, rank)} if old_layout else
              {"a1": (in_f, rank), "a2": (rank, in_f), "b1": (out_f, rank), "b2": (rank, in_f)})
    tensors = {f"{name}.{s}.weight": torch.randn(shape, generator=gen) for s, shape in shapes.items()}
    tensors[f"{name}.alpha"] = torch.tensor(2.0)
    write_safetensors(tmp_path / "g.safetensors", tensors)
    out = tmp_path / "out.safetensors"
    code, _, err = cli(capsys, "merge", tmp_path / "g.safetensors", "-o", out, "--ratios", "0.6", "-q")
    assert code == 0, err
    weight = torch.randn(out_f, in_f, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(glora_change(read_tensors(out), name, weight), 0.6 * glora_change(tensors, name, weight),
                               rtol=1e-5, atol=1e-5)


def sparse_lora_change(t: dict, name: str) -> torch.Tensor:
    """ΔW of a LoRA with the LyCORIS extractor's sparse weight correction (ALGORITHMS.md 12.3), float64."""
    down, up = t[f"{name}.lora_down.weight"].double(), t[f"{name}.lora_up.weight"].double()
    change = float(t[f"{name}.alpha"]) / down.shape[0] * up @ down
    rows, cols = t[f"{name}.bias_indices"].long()
    change[rows, cols] += t[f"{name}.bias_values"].double()
    return change


def test_sparse_correction_takes_the_ratio_of_a_copied_module(tmp_path, capsys):
    """An extract --sparse-bias network merged alone (or with other networks' disjoint modules) at ratio 0.5
    had its low-rank part halved but its sparse correction (bias_values) kept at full strength."""
    name, gen = PROJ, torch.Generator().manual_seed(4)
    positions = torch.randperm(20 * 24, generator=gen)[:30]
    tensors = {
        f"{name}.lora_down.weight": torch.randn(2, 24, generator=gen).half(),
        f"{name}.lora_up.weight": torch.randn(20, 2, generator=gen).half(),
        f"{name}.alpha": torch.tensor(1.0).half(),
        f"{name}.bias_indices": torch.stack([positions // 24, positions % 24]).short(),
        f"{name}.bias_values": torch.randn(30, generator=gen).half(),
        f"{name}.bias_size": torch.tensor([20, 24]).short(),
    }
    write_safetensors(tmp_path / "x.safetensors", tensors)
    out = tmp_path / "out.safetensors"
    code, _, err = cli(capsys, "merge", tmp_path / "x.safetensors", "-o", out, "--ratios", "0.5", "-q")
    assert code == 0, err
    torch.testing.assert_close(sparse_lora_change(read_tensors(out), name), 0.5 * sparse_lora_change(tensors, name),
                               rtol=1e-3, atol=1e-3)


def test_a_dora_module_refused_a_ratio_is_named_as_dora(tmp_path, capsys):
    """A LoRA with DoRA merged alone at ratio 0.5 was refused as "lora cannot take ratio 0.5 exactly", which
    a LoRA can: DoRA's magnitude is what cannot take it."""
    from lytools.testing import build_network

    net = build_network(tmp_path / "d.safetensors", "sd1", factor=16, components=("unet",), dora=True)
    code, _, err = cli(capsys, "merge", net, "-o", tmp_path / "out.safetensors", "--ratios", "0.5")
    assert code == 1 and "lora with DoRA cannot take ratio 0.5 exactly" in err, err
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("option", ["--ratios", "--ratio-for"])
def test_a_ratio_beyond_float32_is_a_usage_error(tmp_path, capsys, option):
    """--ratios 1e308 passed the finite check and ended in an internal error of the float32 matmul."""
    from lytools.testing import build_network

    net = build_network(tmp_path / "n.safetensors", "sd1", factor=16, components=("unet",))
    value = "1e308" if option == "--ratios" else "input_blocks=-1e39"
    code, _, err = cli(capsys, "merge", net, "-o", tmp_path / "out.safetensors", option, value)
    assert code == 2 and "beyond float32's range" in err and "internal error" not in err, err
    assert not (tmp_path / "out.safetensors").exists()


def loha_change(t: dict, name: str) -> torch.Tensor:
    """ΔW of a linear LoHa module (ALGORITHMS.md 3): s · (w1_a @ w1_b) ⊙ (w2_a @ w2_b)."""
    w1a, w1b, w2a, w2b = (t[f"{name}.hada_{s}"].double() for s in ("w1_a", "w1_b", "w2_a", "w2_b"))
    return float(t[f"{name}.alpha"]) / w1b.shape[0] * (w1a @ w1b) * (w2a @ w2b)


def test_lycoris_q_k_v_parts_merge_into_a_fused_checkpoint(tmp_path, capsys):
    """A Flux LyCORIS LoHa/LoKr in lycoris_<diffusers path> names (SimpleTuner's, ai-toolkit's), whose q/k/v
    are separate layers, was refused by merge ("only LoRA parts fuse exactly; flatten the network to LoRA first
    with lytools resize", a lossy detour): each part is applied to its own rows of the fused BFL tensor.
    --ratio-for rules are searched in the kohya module name, as for every other module."""
    from lytools.testing import build_checkpoint, build_network

    base = build_checkpoint(tmp_path / "flux.safetensors", "flux", factor=32, components=("unet",), keep_blocks=1,
                            dtype=torch.float32)
    net = build_network(tmp_path / "loha.safetensors", "flux", factor=32, layout="lycoris", algo="loha",
                        modules=["lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_0_linear1"],
                        dtype=torch.float32)
    out = tmp_path / "out.safetensors"
    code, _, err = cli(capsys, "merge", base, net, "-o", out, "--ratios", "0.6", "--ratio-for", "single_blocks_0_=0.5",
                       "--verify", "-q")
    assert code == 0, err
    before, after, factors = read_tensors(base), read_tensors(out), read_tensors(net)
    prefix, h = "model.diffusion_model.", 96
    parts = {
        "double_blocks.0.img_attn.qkv.weight": (0.6, ["transformer_blocks_0_attn_to_q", "transformer_blocks_0_attn_to_k",
                                                      "transformer_blocks_0_attn_to_v"]),
        "single_blocks.0.linear1.weight": (0.3, ["single_transformer_blocks_0_attn_to_q",
                                                 "single_transformer_blocks_0_attn_to_k",
                                                 "single_transformer_blocks_0_attn_to_v",
                                                 "single_transformer_blocks_0_proj_mlp"]),
    }
    for key, (ratio, names) in parts.items():
        want = torch.cat([loha_change(factors, f"lycoris_{name}") for name in names])
        assert want.shape[0] == (3 * h if len(names) == 3 else 3 * h + 4 * h)
        change = after[prefix + key].double() - before[prefix + key].double()
        torch.testing.assert_close(change, ratio * want, rtol=1e-4, atol=1e-5)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {prefix + key for key in parts}
