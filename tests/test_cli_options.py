"""Every command-line option reaches the library (a dropped option would be accepted and ignored),
and the combinations in which an option could change nothing are refused or honoured.

The wiring tests replace each command's library entry point with a recorder and compare what it
was called with, with and without the option; the library tests of each command check what the
values do (extract: test_extract*.py, resize: test_resize*.py, merge: test_merge*.py, convert:
test_convert*.py, info: test_info.py)."""

from __future__ import annotations

import json

import pytest
import torch

from lytools.cli import cli
from lytools.testing import build_checkpoint, build_network

from tests.shared import run_lytools


class Called(Exception):
    """Raised by a recorder in place of the library call, carrying what it was given."""

    def __init__(self, args, kwargs):
        super().__init__("called")
        self.args_, self.kwargs = args, kwargs


def recorder(*args, **kwargs):
    raise Called(args, kwargs)


def call_of(args: list[str]):
    """Return (args, kwargs) the patched library entry point received for `lytools ARGS`."""
    with pytest.raises(Called) as caught:
        cli.main(args=[str(a) for a in args], prog_name="lytools", standalone_mode=False)
    return caught.value.args_, caught.value.kwargs


def assert_each_option_changes_the_call(base: list[str], variants: list[tuple[list[str], list[str]]]) -> None:
    """For each (extra, reference) pair, `base + extra` must reach the library differently from `base + reference`."""
    for extra, reference in variants:
        assert call_of(base + extra) != call_of(base + reference), extra


# -- wiring: each option changes what the library is asked ---------------------------------------------
def test_every_extract_option_reaches_the_extract_options(monkeypatch, tmp_path):
    monkeypatch.setattr("lytools.extract.cli.extract", recorder)
    base = ["extract", tmp_path / "b.safetensors", tmp_path / "t.safetensors", tmp_path / "o.safetensors"]
    dynamic = []
    for mode in ("threshold", "ratio", "quantile"):
        dynamic += [
            ([f"--mode={mode}", f"--linear-{mode}=0.5"], [f"--mode={mode}", f"--linear-{mode}=0.25"]),
            ([f"--mode={mode}", f"--linear-{mode}=0.5", f"--conv-{mode}=0.25"], [f"--mode={mode}", f"--linear-{mode}=0.5"]),
            ([f"--mode={mode}", f"--linear-{mode}=0.5", "--max-rank=3"], [f"--mode={mode}", f"--linear-{mode}=0.5"]),
            ([f"--mode={mode}", f"--linear-{mode}=0.5", "--conv-dim=0"], [f"--mode={mode}", f"--linear-{mode}=0.5"]),
        ]
    assert_each_option_changes_the_call(base, dynamic + [
        (["--mode=full"], []), (["--linear-dim=4"], []), (["--conv-dim=4"], []), (["--conv-dim=0"], []),
        (["--min-diff=0.1"], []), (["--no-unet"], []), (["--no-text-encoder"], []), (["--clamp-quantile=0.99"], []),
        (["--tucker"], []), (["--sparse-bias"], []), (["--sparse-bias", "--sparsity=0.5"], ["--sparse-bias"]),
        (["--no-full-fallback"], []), (["--arch=sd1"], []), (["--report", tmp_path / "r.json"], []), (["--verify"], []),
        (["--device=cpu"], []), (["--save-dtype=bf16"], []), (["--overwrite"], []),
    ])
    for mode in ("threshold", "ratio", "quantile"):  # one of the pair given: the other takes its value
        assert call_of(base + [f"--mode={mode}", f"--conv-{mode}=0.25"]) == call_of(
            base + [f"--mode={mode}", f"--linear-{mode}=0.25", f"--conv-{mode}=0.25"])
    # the positive spellings are the defaults, and the default linear/conv dims are 32
    assert call_of(base + ["--unet", "--text-encoder", "--full-fallback", "--no-tucker"]) == call_of(base)
    assert call_of(base + ["--linear-dim=32", "--conv-dim=32", "--save-dtype=fp16"]) == call_of(base)


def test_every_resize_option_reaches_resize(monkeypatch, tmp_path):
    monkeypatch.setattr("lytools.resize.resize_file", recorder)
    base = ["resize", tmp_path / "i.safetensors", tmp_path / "o.safetensors"]
    fro = ["--method=sv_fro", "--method-param=0.9"]
    assert_each_option_changes_the_call(base, [
        (["--rank=4"], ["--rank=8"]), (["--rank=4", "--conv-rank=2"], ["--rank=4"]), (fro, ["--rank=4"]),
        (fro[:1] + ["--method-param=0.5"], fro), (fro + ["--max-rank=3"], fro), (["--rank=4", "--truncate"], ["--rank=4"]),
        (["--rank=4", "--base", tmp_path / "c.safetensors"], ["--rank=4"]),
        (["--rank=4", "--report", tmp_path / "r.csv"], ["--rank=4"]), (["--rank=4", "--verify"], ["--rank=4"]),
        (["--rank=4", "--device=cpu"], ["--rank=4"]), (["--rank=4", "--save-dtype=fp16"], ["--rank=4"]),
        (["--rank=4", "--overwrite"], ["--rank=4"]),
    ])


def test_every_merge_option_reaches_run_merge(monkeypatch, tmp_path):
    monkeypatch.setattr("lytools.merge.run_merge", recorder)
    base = ["merge", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "-o", tmp_path / "o.safetensors"]
    assert_each_option_changes_the_call(base, [
        (["--ratios", "0.5"], []), (["--ratio-for", "up_=0.5"], []), (["--allow-unmatched"], []), (["--rank=4"], []),
        (["--rank=4", "--conv-rank=2"], ["--rank=4"]), (["--dry-run"], []), (["--verify"], []),
        (["--dora-mode=comfy"], []), (["--dora-mode=lycoris"], []), (["--keep-ema"], []), (["--device=cpu"], []),
        (["--save-dtype=bf16"], []), (["--overwrite"], []), (["-q"], []), (["-v"], []),
    ])


def test_every_convert_option_reaches_the_batch(monkeypatch, tmp_path):
    monkeypatch.setattr("lytools.convert.run_batch", recorder)
    source = tmp_path / "n.safetensors"
    base = ["convert", source, "-o", tmp_path / "o.safetensors"]
    assert_each_option_changes_the_call(base, [
        (["--to=diffusers"], ["--to=kohya"]), (["--to=peft"], ["--to=diffusers"]), (["--save-dtype=bf16"], ["--to=kohya"]),
        (["--to=kohya", "--save-dtype=fp8_e4m3"], ["--to=kohya"]), (["--to=kohya", "--fold"], ["--to=kohya"]),
        (["--to=diffusers", "--no-fold"], ["--to=diffusers"]), (["--to=peft", "--component=te"], ["--to=peft"]),
        (["--to=kohya", "--arch=sdxl"], ["--to=kohya"]), (["--to=kohya", "-j", "2"], ["--to=kohya"]),
        (["--to=kohya", "--fsync"], ["--to=kohya"]), (["--save-dtype=fp16", "--keep-ema"], ["--save-dtype=fp16"]),
        (["--to=kohya", "--overwrite"], ["--to=kohya"]),
    ])
    folder = ["convert", source, "--output-dir", tmp_path / "out", "--to=kohya"]
    assert call_of(folder)[0][0] != call_of(base + ["--to=kohya"])[0][0]  # the (input, output) pairs


def test_info_options_reach_inspection(monkeypatch, tmp_path):
    monkeypatch.setattr("lytools.info.inspect_files", recorder)
    base = ["info", tmp_path / "x.safetensors"]
    assert_each_option_changes_the_call(base, [(["--hash"], []), (["--verify"], []), (["-v"], [])])


# -- extract: kxk conv options where no kxk conv is extracted -------------------------------------------
@pytest.mark.parametrize("args", [
    ["--conv-dim=0", "--tucker"], ["--mode=threshold", "--linear-threshold=0.1", "--conv-threshold=0.5", "--conv-dim=0"],
    ["--mode=quantile", "--conv-quantile=0.5", "--conv-dim=0"], ["--no-unet", "--conv-dim=8"],
    ["--no-unet", "--tucker"], ["--no-unet", "--mode=ratio", "--linear-ratio=0.1", "--conv-ratio=0.2"],
])
def test_extract_refuses_conv_options_when_no_kxk_conv_is_extracted(tmp_path, capsys, args):
    """kxk convs live only in the UNet: with --no-unet, or once --conv-dim 0 skips them, these options
    were accepted and changed nothing (the same file was written)."""
    code, out, err = run_lytools(capsys, "extract", tmp_path / "b.safetensors", tmp_path / "t.safetensors",
                                 tmp_path / "o.safetensors", *args)
    assert code == 2 and out == "" and err.count("\n") == 1 and "kxk convs" in err
    assert ("--no-unet" in err) == ("--no-unet" in args)


def test_extract_conv_dim_zero_still_combines_with_the_linear_options(tmp_path):
    from lytools.extract.options import build_options

    options = build_options(mode="ratio", linear_ratio=0.1, conv_dim=0, max_rank=4, tucker=False)
    assert options.conv.skips and options.linear.value == 0.1
    assert not build_options(unet=False, linear_dim=4, sparse_bias=True).unet
    # --conv-dim 0 asks for no kxk conv, which is what --no-unet gives: not a contradiction
    options = build_options(unet=False, linear_dim=4, conv_dim=0)
    assert not options.unet and options.conv.skips


# -- resize: --base where nothing is flattened ---------------------------------------------------------
@pytest.fixture(scope="module")
def sd1_files(tmp_path_factory):
    """A tiny SD1 checkpoint, a LoRA/LoCon and a LoHa for it."""
    folder = tmp_path_factory.mktemp("cli-options")
    base = build_checkpoint(folder / "base.safetensors", "sd1", factor=16, components=("unet",))
    lora = build_network(folder / "lora.safetensors", "sd1", factor=16, rank=4, modules="c3lier", components=("unet",))
    loha = build_network(folder / "loha.safetensors", "sd1", factor=16, rank=4, algo="loha", components=("unet",))
    return base, lora, loha


def test_resize_refuses_base_with_truncate(sd1_files, tmp_path, capsys):
    base, lora, _ = sd1_files
    out = tmp_path / "o.safetensors"
    code, stdout, err = run_lytools(capsys, "resize", lora, out, "--rank", "2", "--truncate", "--base", base)
    assert code == 2 and stdout == "" and err.count("\n") == 1 and "--base" in err and "--truncate" in err
    assert not out.exists()


def test_resize_warns_when_base_is_not_used(sd1_files, tmp_path, capsys):
    base, lora, loha = sd1_files
    code, _, err = run_lytools(capsys, "resize", lora, tmp_path / "a.safetensors", "--rank", "2", "--base", base, "-q")
    assert code == 0 and "warning: --base base.safetensors: not used" in err
    code, _, err = run_lytools(capsys, "resize", loha, tmp_path / "b.safetensors", "--rank", "2", "--base", base, "-q")
    assert code == 0 and "not used" not in err
    code, _, err = run_lytools(capsys, "resize", lora, tmp_path / "c.safetensors", "--rank", "2", "--base",
                               tmp_path / "missing.safetensors")
    assert code == 1 and "missing.safetensors" in err and "not used" not in err  # a wrong --base is still an error


# -- convert: --arch only where keys are mapped -----------------------------------------------------------
def test_convert_refuses_arch_without_to(sd1_files, tmp_path, capsys):
    """A cast (--save-dtype without --to) keeps every key: --arch was accepted and changed nothing."""
    _, lora, _ = sd1_files
    out = tmp_path / "o.safetensors"
    code, stdout, err = run_lytools(capsys, "convert", lora, "-o", out, "--save-dtype", "bf16", "--arch", "sdxl")
    assert code == 2 and stdout == "" and "--arch need --to" in err and not out.exists()
    code, stdout, _ = run_lytools(capsys, "convert", lora, "-o", out, "--save-dtype", "bf16", "-q")
    assert code == 0 and stdout.strip() == str(out)


# -- merge: -v and the summary with --json, -v with --dry-run -------------------------------------------
def test_merge_json_keeps_the_summary_and_details_on_stderr(sd1_files, tmp_path, capsys):
    base, lora, _ = sd1_files
    code, out, err = run_lytools(capsys, "merge", base, lora, "-o", tmp_path / "a.safetensors", "--json")
    assert code == 0 and json.loads(out)["mode"] == "checkpoint"
    assert "merged lora.safetensors x 1 into base.safetensors" in err and "modules matched" not in err
    code, out, err = run_lytools(capsys, "merge", base, lora, "-o", tmp_path / "b.safetensors", "--json", "-v")
    assert code == 0 and json.loads(out)["mode"] == "checkpoint"
    assert "merged lora.safetensors" in err and "lora.safetensors x 1: " in err and "modules matched" in err
    code, out, err = run_lytools(capsys, "merge", base, lora, "-o", tmp_path / "c.safetensors", "--json", "-q")
    assert code == 0 and err == "" and json.loads(out)["mode"] == "checkpoint"


def test_merge_dry_run_of_networks_lists_each_module_with_v(sd1_files, tmp_path, capsys):
    _, lora, _ = sd1_files
    code, plain, _ = run_lytools(capsys, "merge", lora, lora, "--ratios", "1", "0.5", "--dry-run")
    assert code == 0 and "concat, rank" not in plain
    code, verbose, _ = run_lytools(capsys, "merge", lora, lora, "--ratios", "1", "0.5", "--dry-run", "-v")
    assert code == 0 and verbose.startswith(plain.rstrip("\n"))
    assert "  lora_unet_down_blocks_0_resnets_0_conv1: concat, rank 8" in verbose.splitlines()


# -- demo: -v reaches the commands it runs ---------------------------------------------------------------
def test_demo_passes_verbose_and_quiet_to_its_commands(sd1_files, tmp_path, monkeypatch, capsys):
    _, lora, _ = sd1_files

    def run_info(folder, invoke, reporter, available):
        invoke(["info", str(lora)])
        return ["info"]

    monkeypatch.setattr("lytools.demo.run_demo", run_info)
    outputs = {}
    for flag in ("", "-v", "-q"):
        code, out, _ = run_lytools(capsys, "demo", tmp_path / f"d{flag}", *([flag] if flag else []))
        assert code == 0
        outputs[flag] = out
    assert outputs["-v"].startswith(outputs[""].split("\n")[0]) and len(outputs["-v"]) > len(outputs[""])
    assert outputs["-q"] == outputs[""]  # -q silences stderr only


@pytest.mark.parametrize("command", [["extract", "b", "t", "o"], ["resize", "i", "o", "--rank", "2"], ["merge", "a", "b", "-o", "o"],
                                     ["convert", "i", "-o", "o", "--to", "kohya"], ["demo", "d"]])
def test_quiet_and_verbose_together_are_refused(command, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_lytools(capsys, *command, "-q", "-v")
    assert code == 2 and out == "" and "-q/--quiet and -v/--verbose" in err
    assert list(tmp_path.iterdir()) == []


# -- convert --keep-ema where there is no EMA copy to keep ----------------------------------------------
def test_convert_keep_ema_says_when_it_changes_nothing(sd1_files, tmp_path, capsys):
    base, _, _ = sd1_files
    tensors = {"model.diffusion_model.w": torch.ones(2, 2), "model_ema.diffusion_modelw": torch.zeros(2, 2)}
    ckpt = tmp_path / "ema.ckpt"
    torch.save({"state_dict": tensors}, ckpt)
    code, out, err = run_lytools(capsys, "convert", ckpt, "-o", tmp_path / "a.safetensors", "--save-dtype", "fp16",
                                 "--keep-ema")
    assert code == 0 and "changes nothing" not in err
    code, out, err = run_lytools(capsys, "convert", base, "-o", tmp_path / "b.safetensors", "--save-dtype", "fp16",
                                 "--keep-ema")
    assert code == 0 and out.strip() == str(tmp_path / "b.safetensors")
    assert "base.safetensors: --keep-ema changes nothing here" in err


# -- extract --tucker on a model without kxk convs ------------------------------------------------------
def test_extract_tucker_without_kxk_convs_is_said(tmp_path, capsys):
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    weights = {"blocks.0.linear.weight": torch.randn(16, 12, generator=generator),
               "blocks.0.conv.weight": torch.randn(8, 4, 1, 1, generator=generator)}
    save_file(weights, tmp_path / "b.safetensors")
    save_file({k: v + 0.1 * torch.randn(v.shape, generator=generator) for k, v in weights.items()}, tmp_path / "t.safetensors")
    code, _, err = run_lytools(capsys, "extract", tmp_path / "b.safetensors", tmp_path / "t.safetensors",
                               tmp_path / "o.safetensors", "--linear-dim", "2", "--tucker", "-q")
    assert code == 0 and "warning: --tucker changes nothing: none of the 2 modules" in err
    code, _, err = run_lytools(capsys, "extract", tmp_path / "b.safetensors", tmp_path / "t.safetensors",
                               tmp_path / "p.safetensors", "--linear-dim", "2", "-q")
    assert code == 0 and "--tucker" not in err


def test_merge_dry_run_takes_quiet_with_verbose(sd1_files, capsys):
    """merge --dry-run's -v adds plan lines on stdout, as info's -v does: -q (stderr) does not contradict it."""
    _, lora, _ = sd1_files
    code, verbose, _ = run_lytools(capsys, "merge", lora, lora, "--ratios", "1", "0.5", "--dry-run", "-v")
    assert code == 0
    code, both, err = run_lytools(capsys, "merge", lora, lora, "--ratios", "1", "0.5", "--dry-run", "-q", "-v")
    assert code == 0 and both == verbose and "contradict" not in err
