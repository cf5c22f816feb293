"""CLI conventions shared by every command: exit codes, one-line errors, no stubs, the demo."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click
from click.testing import CliRunner
import pytest

from lytools import __version__
from lytools.cli import cli, main

REPO = Path(__file__).resolve().parents[1]


def run(*args: str, cwd: Path | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("LYTOOLS_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "lytools", *args], cwd=cwd or REPO, env=env, capture_output=True, text=True,
        input=stdin, timeout=300,
    )


def test_version_and_help_list_only_real_commands():
    result = run("--version")
    assert result.returncode == 0 and __version__ in result.stdout
    help_text = run("--help").stdout
    listed = {line.split()[0] for line in help_text.split("Commands:")[1].splitlines() if line.strip()}
    assert listed == set(cli.commands)
    assert {"info", "demo"} <= listed
    runner = CliRunner()
    for name, command in cli.commands.items():
        assert command.help and len(command.help.strip()) > 20, f"{name} has no real help text"
        sub = runner.invoke(cli, [name, "--help"], prog_name="lytools")
        assert sub.exit_code == 0 and "Usage: lytools " + name in sub.output


def test_runtime_error_is_one_line_exit_1(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    result = run("info", str(bad))
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert any(line.startswith("lytools: error: ") and str(bad) in line for line in lines)
    assert "Traceback" not in result.stderr


def test_usage_error_exit_2():
    result = run("info", "--no-such-option")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


def test_wrong_option_values_are_usage_errors_exit_2(tmp_path, capsys):
    """Bad values and contradicting options exit 2 like Click's own usage errors, before any output."""
    from lytools.testing import build_checkpoint, build_network

    base = str(build_checkpoint(tmp_path / "b.safetensors", "sd1", factor=16))
    lora = str(build_network(tmp_path / "l.safetensors", "sd1", factor=16, rank=4))
    out = str(tmp_path / "x.safetensors")
    cases = [
        ["merge", base, lora, "-o", out, "--ratios", "1", "2"],
        ["merge", base, lora, "-o", out, "--ratio-for", "unet"],
        ["merge", base, lora, "-o", out, "--ratio-for", "[=2"],
        ["merge", base, lora, "-o", out, "--device", "foo"],
        ["merge", base, lora, "-o", out, "--rank", "4"],
        ["merge", lora, lora, "-o", out, "--rank", "0"],
        ["merge", lora, lora, "-o", out, "--dora-mode", "comfy"],
        ["resize", lora, out, "--rank", "0"],
        ["resize", lora, out, "--rank", "2", "--conv-rank", "0"],
        ["resize", lora, out, "--rank", "2", "--method-param", "0.5"],
        ["resize", lora, out, "--rank", "2", "--max-rank", "4"],
        ["extract", base, base, out, "--clamp-quantile", "2"],
        ["convert", lora, "--to", "kohya"],
        ["convert", lora, "--to", "kohya", "-o", out, "--output-dir", str(tmp_path)],
    ]
    for args in cases:
        with pytest.raises(SystemExit) as raised:
            main(args)
        err = capsys.readouterr().err
        assert raised.value.code == 2, (args, err)
        assert err.count("\n") == 1 and "Traceback" not in err, (args, err)
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("debug", [False, True], ids=["plain", "LYTOOLS_DEBUG"])
def test_unexpected_exception_is_one_line_unless_debugging(monkeypatch, capsys, debug):
    @cli.command("explode-for-test")
    def explode():
        """A command that fails in a way no lytools error covers (test only)."""
        raise ValueError("something nobody planned for\nsecond line")

    if debug:
        monkeypatch.setenv("LYTOOLS_DEBUG", "1")
    else:
        monkeypatch.delenv("LYTOOLS_DEBUG", raising=False)
    try:
        with pytest.raises(SystemExit) as info:
            main(["explode-for-test"])
    finally:
        cli.commands.pop("explode-for-test")
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "internal error ValueError: something nobody planned for" in err
    if debug:
        assert "Traceback" in err
    else:
        assert err.count("\n") == 1 and "Traceback" not in err


def test_device_errors_are_clear():
    from lytools.device import resolve_device
    from lytools.errors import DeviceError, UsageError

    assert str(resolve_device("cpu")) == "cpu"
    with pytest.raises(UsageError, match="expected auto, cpu, cuda"):
        resolve_device("tpu")
    if not __import__("torch").cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA is not available"):
            resolve_device("cuda")


def test_demo_runs_every_command_and_refuses_a_used_folder(tmp_path):
    folder = tmp_path / "demo"
    result = run("demo", str(folder))
    assert result.returncode == 0, result.stderr[-2000:]
    assert (folder / "base-sd1.safetensors").is_file() and (folder / "tuned-sd1.safetensors").is_file()
    for name in ("extract", "resize", "merge", "convert"):
        if name in cli.commands:
            assert f"== lytools {name}" in result.stderr
    if "extract" in cli.commands:
        assert (folder / "extracted-lora.safetensors").is_file()
    if "merge" in cli.commands and "extract" in cli.commands:
        line = next(l for l in result.stderr.splitlines() if "relative error" in l)
        assert float(line.split("relative error")[1].split()[0]) < 0.05
    again = run("demo", str(folder))
    assert again.returncode == 1 and "already holds files" in again.stderr
    quiet = run("demo", str(folder), "--overwrite", "-q")  # -q reaches every inner command, info included
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr[-2000:]
    assert str(folder / "extracted-lora.safetensors") in quiet.stdout.splitlines()


def _malformed_cases():
    from tests.test_io import MALFORMED

    return sorted(MALFORMED)


@pytest.mark.parametrize("case", _malformed_cases())
def test_every_malformed_file_is_one_line_through_the_cli(tmp_path, capsys, monkeypatch, case):
    from tests.test_io import MALFORMED

    monkeypatch.delenv("LYTOOLS_DEBUG", raising=False)
    make, phrase = MALFORMED[case]
    path = tmp_path / f"{case}.safetensors"
    make(path)
    with pytest.raises(SystemExit) as info:
        main(["info", str(path)])
    assert info.value.code == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("lytools: error: ") and phrase in lines[0]
    assert "Traceback" not in err


def test_exit_code_from_ctx_exit_passes_through():
    @cli.command("exit-three-for-test")
    @click.pass_context
    def exit_three(ctx):
        """A command that ends with ctx.exit(3) (test only)."""
        ctx.exit(3)

    try:
        with pytest.raises(SystemExit) as info:
            main(["exit-three-for-test"])
    finally:
        cli.commands.pop("exit-three-for-test")
    assert info.value.code == 3


@pytest.mark.parametrize("preset", [None, "3"])
def test_convert_keeps_numpy_blas_to_one_thread_unless_told(tmp_path, monkeypatch, preset):
    """convert sets OPENBLAS_NUM_THREADS=1 (numpy's OpenBLAS would spin a thread per core for nothing)
    before numpy is imported, and leaves a value the user set alone; other commands leave it unset."""
    from lytools.testing import build_network

    source = build_network(tmp_path / "n.safetensors", "sd1", factor=8, rank=2, alpha=1.0, seed=0)
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", preset or "unset below")  # recorded, so the test's change is undone
    if preset is None:
        monkeypatch.delenv("OPENBLAS_NUM_THREADS")
    runner = CliRunner()
    info = runner.invoke(cli, ["info", str(source)], prog_name="lytools")
    assert info.exit_code == 0 and os.environ.get("OPENBLAS_NUM_THREADS") == preset
    converted = runner.invoke(cli, ["convert", str(source), "--to", "diffusers", "-o", str(tmp_path / "d.safetensors"), "-q"],
                              prog_name="lytools")
    assert converted.exit_code == 0, converted.output
    assert os.environ["OPENBLAS_NUM_THREADS"] == (preset or "1")
