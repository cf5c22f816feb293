"""Audit of `lytools merge` as a ComfyUI/kohya/sd-mecha user would run it.

Every expectation is computed here from the files' own factors (ΔW = up @ down · alpha / rank,
summed in float32 with the ratios, cast once), independently of lytools' resolver and algos.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lytools.arch import module_table
from lytools.io import read_header
from lytools.merge import run_merge
from lytools.testing import build_checkpoint, build_network
from tests.shared import read_tensors
from tests.test_merge import lora_delta, lora_modules

REPO = Path(__file__).resolve().parents[1]
FACTOR = 16


def cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lytools", "merge", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})


def rule_factor(name: str, rules: list[tuple[str, float]]) -> float:
    """CLI.md: `--ratio-for` scales on top of the input's ratio; overlapping rules multiply."""
    factor = 1.0
    for pattern, value in rules:
        if re.search(pattern, name):
            factor *= value
    return factor


@pytest.fixture(scope="module")
def sd1_nets(tmp_path_factory):
    folder = tmp_path_factory.mktemp("merge_audit")
    a = build_network(folder / "a.safetensors", "sd1", factor=FACTOR, seed=1, rank=4, alpha=1.0)
    # b: a subset of a's modules, another rank, alpha and dtype
    b = build_network(folder / "b.safetensors", "sd1", factor=FACTOR, seed=2, rank=8, alpha=16.0, dtype=torch.bfloat16,
                      modules=["lora_unet_down_blocks_0_attentions_0_proj_in",
                               "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k",
                               "lora_te_text_model_encoder_layers_0_self_attn_q_proj"])
    return folder, a, b


def summed_changes(networks: list[tuple[Path, float]], rules: list[tuple[str, float]]) -> dict[str, torch.Tensor]:
    total: dict[str, torch.Tensor] = {}
    for path, ratio in networks:
        for name, (up, down, alpha) in lora_modules(path).items():
            change = ratio * rule_factor(name, rules) * lora_delta(up, down, alpha)
            total[name] = total[name] + change if name in total else change
    return total


def test_network_merge_ratio_for_multiplies_overlapping_rules(sd1_nets, tmp_path):
    folder, a, b = sd1_nets
    rules = [("attn1", 2.0), ("to_k", 0.5), ("_te_", -1.0)]
    out = tmp_path / "ab.safetensors"
    run_merge([a, b], out, ratios=[0.5, -0.75], ratio_for=[f"{p}={v:g}" for p, v in rules], save_dtype=torch.float32)
    expected = summed_changes([(a, 0.5), (b, -0.75)], rules)
    produced = lora_modules(out)
    assert set(produced) == set(expected)  # modules of b only contribute where b has them; none lost
    for name, change in expected.items():
        up, down, alpha = produced[name]
        torch.testing.assert_close(lora_delta(up, down, alpha).reshape(change.shape), change, rtol=1e-5, atol=1e-6)
    # a module in both inputs holds both ranks (exact concatenation)
    assert produced["lora_unet_down_blocks_0_attentions_0_proj_in"][1].shape[0] == 4 + 8


def test_network_merge_rank_reaches_the_svd_optimum(sd1_nets, tmp_path):
    folder, a, b = sd1_nets
    out = tmp_path / "r2.safetensors"
    run_merge([a, b], out, ratios=[1.0, 0.6], rank=2, save_dtype=torch.float32)
    expected = summed_changes([(a, 1.0), (b, 0.6)], [])
    produced = lora_modules(out)
    for name, change in expected.items():
        up, down, alpha = produced[name]
        assert down.shape[0] == 2
        flat = change.reshape(change.shape[0], -1).double()
        optimum = torch.linalg.svdvals(flat)[2:].square().sum().sqrt()
        error = torch.linalg.norm(lora_delta(up, down, alpha).reshape(flat.shape).double() - flat)
        assert error <= optimum * (1 + 1e-4) + 1e-6, name


def test_networks_for_different_architectures_are_refused(sd1_nets, tmp_path):
    folder, a, _ = sd1_nets
    sdxl = build_network(tmp_path / "xl.safetensors", "sdxl", factor=FACTOR, seed=3)
    sd3 = build_network(tmp_path / "sd3.safetensors", "sd3", factor=FACTOR, seed=3, components=["unet"])
    for other in (sdxl, sd3):
        out = tmp_path / "mixed.safetensors"
        result = cli(a, other, "-o", out, cwd=tmp_path)
        assert result.returncode == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "different architectures" in lines[0] and other.name in lines[0], result.stderr
        assert not out.exists() and not list(tmp_path.glob("*.tmp*"))


def test_unmatched_ratio_for_warns_and_changes_nothing(sd1_nets, tmp_path):
    folder, a, b = sd1_nets
    plain, ruled = tmp_path / "plain.safetensors", tmp_path / "ruled.safetensors"
    assert cli(a, b, "-o", plain, "-q", cwd=tmp_path).returncode == 0
    result = cli(a, b, "-o", ruled, "-q", "--ratio-for", "input_blocks_[0-3]_=0", cwd=tmp_path)
    assert result.returncode == 0
    assert "--ratio-for input_blocks_[0-3]_=0 matched no module" in result.stderr
    first, second = read_tensors(plain), read_tensors(ruled)
    assert set(first) == set(second) and all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("text", ["([=1", "attn1", "attn1=inf"])
def test_bad_ratio_for_is_one_line_and_writes_nothing(sd1_nets, tmp_path, text):
    folder, a, b = sd1_nets
    out = tmp_path / "bad.safetensors"
    result = cli(a, b, "-o", out, "--ratio-for", text, cwd=tmp_path)
    assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "--ratio-for" in result.stderr and not out.exists()


def test_dry_run_json_tells_what_the_merge_writes(sd1_nets, tmp_path):
    folder, a, b = sd1_nets
    out = tmp_path / "dry.safetensors"
    result = cli(a, b, "-o", out, "--dry-run", "--json", "--ratios", "1", "-0.5", cwd=tmp_path)
    assert result.returncode == 0 and not out.exists()
    plan = json.loads(result.stdout)
    assert [i["ratio"] for i in plan["inputs"]] == [1.0, -0.5]
    assert [i["modules"] for i in plan["inputs"]] == [len(lora_modules(a)), len(lora_modules(b))]
    run_merge([a, b], out, ratios=[1.0, -0.5])
    produced = lora_modules(out)
    assert plan["modules"] == len(produced)
    ranks = {m["module"]: m["rank"] for m in plan["per_module"]}
    assert ranks == {name: down.shape[0] for name, (up, down, alpha) in produced.items()}
    assert abs(plan["output_bytes"] - out.stat().st_size) < 0.1 * out.stat().st_size


@pytest.mark.parametrize("arch,dtype", [("sdxl", torch.bfloat16), ("sd3", torch.float16), ("sd2", torch.float32), ("flux", torch.bfloat16)])
def test_checkpoint_merge_with_text_encoders_and_rules_equals_reference(tmp_path, arch, dtype):
    """W + Σ ratio·rule·ΔW in float32, cast once: the result may differ from the reference only by the order of float32
    sums (one unit in the last place of the checkpoint dtype on a tiny share of elements, or float32 rounding where
    W and ΔW cancel)."""
    ckpt = build_checkpoint(tmp_path / "base.safetensors", arch, factor=FACTOR, dtype=dtype)
    n1 = build_network(tmp_path / "n1.safetensors", arch, factor=FACTOR, seed=1, alpha=2.0)
    n2 = build_network(tmp_path / "n2.safetensors", arch, factor=FACTOR, seed=2, rank=2, dtype=torch.bfloat16)
    rules = [("_te", 0.5), ("_0_", 3.0)]
    out = tmp_path / "out.safetensors"
    run_merge([ckpt, n1, n2], out, ratios=[0.7, -0.4], ratio_for=[f"{p}={v:g}" for p, v in rules])
    base, merged = read_tensors(ckpt), read_tensors(out)
    assert set(base) == set(merged)
    table = module_table(arch)
    changes: dict[str, torch.Tensor] = {}
    magnitudes: dict[str, torch.Tensor] = {}  # Σ |term|, for the float32 rounding of the sums
    for path, ratio in ((n1, 0.7), (n2, -0.4)):
        for name, (up, down, alpha) in lora_modules(path).items():
            target = table[name]
            key = target.key
            change = changes.setdefault(key, torch.zeros(base[key].shape))
            rows = slice(None) if target.rows is None else slice(target.rows[0] // FACTOR, target.rows[1] // FACTOR)
            term = ratio * rule_factor(name, rules) * lora_delta(up, down, alpha).reshape(change[rows].shape)
            change[rows] += term
            # the matmul's own rounding scales with Σ|up·down|, not with |ΔW| (which may cancel)
            spread = abs(ratio * rule_factor(name, rules)) * lora_delta(up.abs(), down.abs(), alpha)
            magnitudes.setdefault(key, torch.zeros(base[key].shape))[rows] += spread.reshape(term.shape)
    assert changes and any("_te" in n for n in lora_modules(n1))
    off = total = 0
    for key, tensor in base.items():
        assert merged[key].dtype == tensor.dtype
        if key not in changes:
            assert torch.equal(merged[key], tensor), key
            continue
        exact = tensor.float() + changes[key]
        nearest = exact.to(dtype).float()
        got = merged[key].float()
        low = nearest.to(dtype)
        spacing = torch.maximum(*((torch.nextafter(low, torch.full_like(low, bound)).float() - nearest).abs()
                                  for bound in (float("inf"), float("-inf"))))
        # float32 sums in another order: a few units of float32 at the inputs' magnitude (cancellation)
        slack = 4 * torch.finfo(torch.float32).eps * (tensor.float().abs() + magnitudes[key])
        bad = (got - nearest).abs() > spacing * 1.01 + slack
        assert not bad.any(), (key, got[bad][:4], nearest[bad][:4], tensor.float()[bad][:4], magnitudes[key][bad][:4], spacing[bad][:4], slack[bad][:4])
        off += int((got != nearest).sum())
        total += got.numel()
    if dtype != torch.float32:  # in float32 itself any other order of the sums moves many last bits
        assert off <= max(10, total // 1000)


def test_network_for_another_architecture_into_a_checkpoint_names_both(sd1_nets, tmp_path):
    folder, a, _ = sd1_nets
    sdxl = build_checkpoint(tmp_path / "xl.safetensors", "sdxl", factor=FACTOR, components=["unet"])
    out = tmp_path / "out.safetensors"
    for extra in ((), ("--allow-unmatched",)):
        result = cli(sdxl, a, "-o", out, *extra, cwd=tmp_path)
        assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "a.safetensors is a sd1 network, xl.safetensors a sdxl checkpoint" in result.stderr
        assert not out.exists()


def test_network_merge_metadata_like_sd_scripts(sd1_nets, tmp_path):
    """FORMATS 5.3: the first input's metadata, fresh sshs_*, a modelspec with merged_from (complete and dated now
    even when the first input had none), no stale hashes, no trailing separator in the comment."""
    from lytools.io import file_hashes

    folder, a, b = sd1_nets
    out = tmp_path / "merged.safetensors"
    run_merge([a, b], out)
    meta = read_header(out).metadata
    assert meta["modelspec.merged_from"] == "a.safetensors, b.safetensors"
    assert meta["modelspec.sai_model_spec"] and meta["modelspec.title"] == "merged"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["ss_training_comment"] == "merged from a.safetensors x 1, b.safetensors x 1 (concatenated exactly)"
    assert meta["sshs_model_hash"] == file_hashes(out).data_sha256
    stale = tmp_path / "stale.safetensors"
    build_network(stale, "sd1", factor=FACTOR, seed=1, metadata={
        "modelspec.sai_model_spec": "1.0.0", "modelspec.title": "mine", "modelspec.date": "2023-01-01T00:00:00",
        "modelspec.hash_sha256": "0xstale", "sshs_model_hash": "stale", "ss_training_comment": "trained"})
    run_merge([stale, b], out, overwrite=True)
    meta = read_header(out).metadata
    assert meta["modelspec.title"] == "mine" and meta["modelspec.date"] != "2023-01-01T00:00:00"
    assert "modelspec.hash_sha256" not in meta and meta["sshs_model_hash"] == file_hashes(out).data_sha256
    assert meta["ss_training_comment"].endswith("(concatenated exactly); trained")
