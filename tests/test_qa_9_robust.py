"""Robustness against the environment (CLI.md conventions): an I/O failure (read-only folder, full disk,
unwritable --report) is one stderr line naming the file, exit 1, and leaves no output or temporary file."""

from __future__ import annotations

import errno
import io
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lytools.cli import main
from lytools.errors import FileFormatError, LytoolsError
from lytools.extract.spill import SpillStore
from lytools.io import open_file
from lytools.io.writer import plan_entry, SafetensorsWriter, temp_path, write_text_atomic
from tests.shared import SMALL_MODULES, small_models

MODULES = SMALL_MODULES


@pytest.fixture
def models(tmp_path):
    return small_models(tmp_path)


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("command", ["extract", "resize"])
def test_report_that_cannot_be_written_removes_the_output(models, tmp_path, monkeypatch, capsys, command):
    base, lora, tuned = models
    report = tmp_path / "r.json"

    def denied(path, *args):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(f"lytools.{command}.pipeline.write_report", denied)
    out = tmp_path / "x.safetensors"
    inputs = [str(base), str(tuned)] if command == "extract" else [str(lora)]
    options = ["--rank", "2"] if command == "resize" else []
    with pytest.raises(SystemExit) as raised:
        main([command, *inputs, str(out), *options, "--report", str(report), "-q"])
    assert raised.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"lytools: error: {report}: Permission denied"]
    assert _names(tmp_path) == ["base.safetensors", "lora.safetensors", "tuned.safetensors"]


@pytest.mark.parametrize("command", ["merge", "merge-checkpoint", "resize"])
def test_full_disk_is_one_line_naming_the_output(models, tmp_path, monkeypatch, capsys, command):
    base, lora, _ = models

    def full(fd, buffers, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("lytools.io.writer._pwrite_all", full)
    out = tmp_path / "x.safetensors"
    args = {"merge": ["merge", str(lora), str(lora), "-o", str(out)],
            "merge-checkpoint": ["merge", str(base), str(lora), "-o", str(out)],
            "resize": ["resize", str(lora), str(out), "--rank", "2"]}[command]
    with pytest.raises(SystemExit) as raised:
        main([*args, "-q"])
    assert raised.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"lytools: error: {out}: ") and "No space left on device" in err[0]
    assert "internal error" not in err[0] and "Errno" not in err[0]
    assert _names(tmp_path) == ["base.safetensors", "lora.safetensors", "tuned.safetensors"]


def test_full_disk_in_extract_names_the_folder(models, tmp_path, monkeypatch, capsys):
    base, _, tuned = models

    class FullFile:
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            pass

    monkeypatch.setattr("lytools.extract.spill.tempfile.TemporaryFile", lambda dir: FullFile())
    out = tmp_path / "x.safetensors"
    with pytest.raises(SystemExit) as raised:
        main(["extract", str(base), str(tuned), str(out), "-q"])
    assert raised.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path) in err[0] and "No space left on device" in err[0]
    assert "internal error" not in err[0]
    assert not out.exists()


def test_writers_name_the_output_not_their_temporary_file(tmp_path):
    # a folder that cannot take a file (here: gone since the output was checked) is reported for the output asked for
    (tmp_path / "gone").mkdir()
    writer = SafetensorsWriter(tmp_path / "gone" / "x.safetensors", [plan_entry("a", torch.float32, (2,))])
    (tmp_path / "gone").rmdir()
    with pytest.raises(LytoolsError, match=r"x\.safetensors: cannot write in .*gone \(No such file or directory\)"):
        with writer:
            writer.write("a", torch.zeros(2))
    with pytest.raises(LytoolsError, match=r"r\.json: cannot write in .*gone \(No such file or directory\)"):
        write_text_atomic(tmp_path / "gone" / "r.json", "{}")
    with pytest.raises(LytoolsError, match=r"gone: cannot write the output's temporary file here"):
        SpillStore(tmp_path / "gone")


def test_output_names_up_to_the_longest_valid_one_are_written(models, tmp_path, capsys):
    # the temporary name (<name>.tmp-<pid>) of an output named with 250 of the 255 bytes a name may have
    # overflowed it: 'File name too long' for a name the user may use
    _, lora, _ = models
    out = tmp_path / ("l" * 238 + ".safetensors")
    report = tmp_path / ("r" * 245 + ".json")
    main_ok(["resize", str(lora), str(out), "--rank", "2", "--report", str(report), "-q"])
    assert out.is_file() and report.is_file()
    merged = tmp_path / ("m" * 238 + ".safetensors")
    main_ok(["merge", str(lora), str(lora), "-o", str(merged), "-q"])
    assert merged.is_file()


def test_an_input_name_too_long_for_a_companion_file_converts(models, tmp_path):
    # the probe for <stem>.adapter_config.json beside a 252-byte input raised 'File name too long'
    _, lora, _ = models
    source = tmp_path / ("n" * 240 + ".safetensors")
    source.write_bytes(lora.read_bytes())
    main_ok(["convert", str(source), "--output-dir", str(tmp_path / "out"), "--to", "diffusers", "-q"])
    assert (tmp_path / "out" / source.name).is_file()


def test_temp_path_fits_a_file_name():
    name = "ü" * 127 + ".safetensors"  # 266 bytes: cut on a character boundary
    for hidden in (False, True):
        temp = temp_path(f"/x/{name}", hidden=hidden)
        assert len(temp.name.encode()) <= 255 and temp.name.endswith(f".tmp-{os.getpid()}")
        assert temp.name.startswith("." if hidden else "ü") and temp.parent == Path("/x")
    assert temp_path("/x/a.safetensors").name == f"a.safetensors.tmp-{os.getpid()}"


def main_ok(args):
    try:
        main(args)
    except SystemExit as exc:
        assert exc.code in (0, None)


def test_a_file_that_shrinks_while_read_is_a_file_error(models, tmp_path):
    # truncated between its header check and the reading of its tensors (another program rewriting it during a
    # batch): was 'internal error ValueError: requested buffer length ... must not be greater than ...'
    _, lora, _ = models
    with open_file(lora) as reader:
        last = max(reader.infos(), key=lambda info: info.end)
        first = min(reader.infos(), key=lambda info: info.begin)
        reader.get(first.name)  # the file is mapped whole: its map outlives the truncation (pages past the end: SIGBUS)
        os.truncate(lora, reader.header.data_start + last.begin)
        with pytest.raises(FileFormatError, match=r"lora\.safetensors: the file changed while being read: tensor .* ends at"):
            reader.get(last.name)
        with pytest.raises(FileFormatError, match="the file changed while being read"):
            reader.raw_bytes(last.name)


@pytest.mark.parametrize("command", ["resize", "merge"])
def test_output_whose_parent_is_a_file(models, tmp_path, capsys, command):
    # was 'folder <a file> does not exist': the user looks for a missing folder and finds the file there
    _, lora, _ = models
    parent = tmp_path / "notes"
    parent.write_text("x")
    out = parent / "x.safetensors"
    args = ["resize", str(lora), str(out), "--rank", "2"] if command == "resize" else ["merge", str(lora), "-o", str(out)]
    with pytest.raises(SystemExit) as raised:
        main([*args, "-q"])
    assert raised.value.code == 1
    assert capsys.readouterr().err.strip().splitlines() == [f"lytools: error: {out}: {parent} is a file, not a folder"]


def _unprivileged(command: list[str]) -> list[str]:
    """Return `command` run without root's permission bypass, so a mode-000 file cannot be read."""
    if os.geteuid() != 0:
        return command
    if shutil.which("setpriv") is None:
        pytest.skip("root without setpriv: file permissions cannot be tested")
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--", *command]


@pytest.mark.parametrize("command", ["resize", "extract-base", "extract-tuned"])
def test_unreadable_input_is_a_runtime_error_as_in_every_command(models, tmp_path, command):
    # resize and extract refused it as a usage error (exit 2, four lines of Click's usage text) while merge,
    # info and convert said 'FILE: permission denied' (exit 1), which CLI.md asks for an I/O error
    base, lora, tuned = models
    locked = tmp_path / "locked.safetensors"
    locked.write_bytes((lora if command == "resize" else base).read_bytes())
    locked.chmod(0)
    out = tmp_path / "x.safetensors"
    args = {"resize": ["resize", str(locked), str(out), "--rank", "2"],
            "extract-base": ["extract", str(locked), str(tuned), str(out)],
            "extract-tuned": ["extract", str(base), str(locked), str(out)]}[command]
    done = subprocess.run(_unprivileged([sys.executable, "-m", "lytools", *args, "-q"]), capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines() == [f"lytools: error: {locked}: permission denied"]
    assert not out.exists()


@pytest.mark.parametrize("command", ["merge", "info", "convert"])
def test_empty_stdin_list_is_the_same_usage_error_everywhere(tmp_path, monkeypatch, capsys, command):
    # merge said 'merge: no inputs' with exit 1, info and convert 'no input files' with exit 2
    monkeypatch.setattr("sys.stdin", io.StringIO("\n\r\n  \n"))
    args = {"merge": ["merge", "-", "-o", str(tmp_path / "m.safetensors")], "info": ["info", "-"],
            "convert": ["convert", "-", "--output-dir", str(tmp_path / "out"), "--to", "diffusers"]}[command]
    with pytest.raises(SystemExit) as raised:
        main(args)
    assert raised.value.code == 2
    assert "no input files" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["resize", "merge", "convert", "convert-peft-config", "report"])
def test_overwrite_never_replaces_a_special_file(models, tmp_path, capsys, command):
    # `-o /dev/null --overwrite` as root (a container) renamed the output over /dev/null: a regular file took its place
    _, lora, _ = models
    special = tmp_path / ("adapter_config.json" if command == "convert-peft-config" else
                          "r.json" if command == "report" else "x.safetensors")
    os.mkfifo(special)
    args = {"resize": ["resize", str(lora), str(special), "--rank", "2"],
            "merge": ["merge", str(lora), "-o", str(special)],
            "convert": ["convert", str(lora), "-o", str(special), "--to", "diffusers"],
            "convert-peft-config": ["convert", str(lora), "-o", str(tmp_path / "adapter_model.safetensors"), "--to", "peft",
                                    "--component", "unet"],
            "report": ["resize", str(lora), str(tmp_path / "x.safetensors"), "--rank", "2", "--report", str(special)]}[command]
    with pytest.raises(SystemExit) as raised:
        main([*args, "--overwrite", "-q"])
    assert raised.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{special}: is a device or other special file" in err[0], err
    assert stat.S_ISFIFO(os.lstat(special).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["base.safetensors", "lora.safetensors", "tuned.safetensors",
                                                                special.name])


def test_a_file_name_that_is_not_utf8(models, tmp_path):
    # a Latin-1 name (an old archive): Python holds its byte 0xe9 as a surrogate, which the UTF-8 header (the name is
    # in the metadata) could not encode: 'internal error UnicodeEncodeError'
    from safetensors import safe_open

    _, lora, _ = models
    source = tmp_path / os.fsdecode(b"caf\xe9.safetensors")
    try:
        source.write_bytes(lora.read_bytes())
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system takes UTF-8 names only")
    out = tmp_path / os.fsdecode(b"r\xe9sized.safetensors")
    main_ok(["resize", str(source), str(out), "--rank", "2", "-q"])
    main_ok(["merge", str(source), str(source), "-o", str(tmp_path / "m.safetensors"), "-q"])
    main_ok(["convert", str(source), "--output-dir", str(tmp_path / "out"), "--to", "diffusers", "-q"])
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as merged:
        assert "caf\ufffd.safetensors" in merged.metadata()["modelspec.merged_from"]
    assert out.is_file() and (tmp_path / "out" / source.name).is_file()
    assert temp_path(out).name == os.fsdecode(b"r\xe9sized.safetensors.tmp-" + str(os.getpid()).encode())


def test_a_symlink_loop_among_convert_inputs(models, tmp_path, capsys):
    # Path.resolve raised RuntimeError('Symlink loop') while planning the batch: 'internal error', nothing converted
    _, lora, _ = models
    loop = tmp_path / "loop.safetensors"
    loop.symlink_to(loop)
    with pytest.raises(SystemExit) as raised:
        main(["convert", str(loop), str(lora), "--output-dir", str(tmp_path / "out"), "--to", "diffusers", "-q"])
    assert raised.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"lytools: error: {loop}: ") and "internal error" not in err[0], err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["lora.safetensors"]
