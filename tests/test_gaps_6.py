"""Outputs spelled as folders, a pickled first merge input read once, and kxk convs whose factors are stored
flattened (LoHa/LoKr without Tucker) counted as convs by merge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lytools.algos import NetworkModule, delta
from lytools.errors import LytoolsError
from lytools.io import check_output_path, output_file_path, read_header, write_safetensors
from lytools.merge import run_merge
from lytools.merge.combine import table_kernel
from lytools.testing import build_checkpoint, build_network
from tests.shared import read_tensors, run_lytools

CONV = "lora_unet_down_blocks_0_resnets_0_conv1"  # a 3x3 conv of SD1's UNet
LINEAR = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gaps6")
    ckpt = build_checkpoint(folder / "base.safetensors", "sd1", factor=16, components=("unet", "clip_l"))
    a = build_network(folder / "a.safetensors", "sd1", factor=16, rank=4, modules="lierla", seed=1)
    b = build_network(folder / "b.safetensors", "sd1", factor=16, rank=2, modules="lierla", seed=2)
    loha = build_network(folder / "loha.safetensors", "sd1", factor=16, rank=4, conv_rank=2, modules="c3lier",
                         algo="loha", seed=3)
    return folder, ckpt, a, b, loha


def _refused(code: int, out: str, err: str, named: str) -> bool:
    return code == 1 and out == "" and err.count("\n") == 1 and err.startswith("lytools: error: ") and named in err


# -- OUT spelled as a folder, or naming an existing folder ----------------------------------------------
def test_output_file_spellings_in_the_library(tmp_path):
    with pytest.raises(LytoolsError, match="names a folder"):
        output_file_path(f"{tmp_path}/x.safetensors/")
    with pytest.raises(LytoolsError, match="names a folder"):
        check_output_path(f"{tmp_path}/x.safetensors/", overwrite=True)
    (tmp_path / "d.safetensors").mkdir()
    with pytest.raises(LytoolsError, match="is an existing folder"):
        check_output_path(tmp_path / "d.safetensors", overwrite=True)
    assert output_file_path(f"{tmp_path}/x.safetensors") == tmp_path / "x.safetensors"
    assert output_file_path(tmp_path / "x.safetensors") == tmp_path / "x.safetensors"


def test_every_command_refuses_a_file_output_spelled_as_a_folder(files, tmp_path, capsys):
    """`-o name.safetensors/` wrote a file `name.safetensors`: the trailing '/' (dropped by Path) is an
    error naming OUT, exit 1, nothing written; an existing folder as OUT is the same error in every command
    (resize and extract said so through Click, exit 2)."""
    _, ckpt, a, b, _ = files
    existing = tmp_path / "existing.safetensors"
    existing.mkdir()
    slash = f"{tmp_path}/new.safetensors/"
    runs = {
        "merge networks": ["merge", a, b, "-o", "{}"],
        "merge into checkpoint": ["merge", ckpt, a, "-o", "{}"],
        "merge dry run": ["merge", ckpt, a, "--dry-run", "-o", "{}"],
        "resize": ["resize", a, "{}", "--rank", "2"],
        "extract": ["extract", ckpt, ckpt, "{}"],
        "convert kohya": ["convert", a, "-o", "{}", "--to", "kohya"],
        "convert cast": ["convert", a, "-o", "{}", "--save-dtype", "fp32"],
        "convert peft file": ["convert", a, "-o", "{}", "--to", "peft", "--component", "unet"],
    }
    for label, args in runs.items():
        for out in (slash, str(existing)):
            code, stdout, err = run_lytools(capsys, *[out if x == "{}" else x for x in args])
            assert _refused(code, stdout, err, out.rstrip("/")), (label, out, code, err)
    for command in (["resize", a, tmp_path / "r.safetensors", "--rank", "2", "--report"],
                    ["extract", ckpt, ckpt, tmp_path / "e.safetensors", "--report"]):
        code, stdout, err = run_lytools(capsys, *command, f"{tmp_path}/report.json/")
        assert _refused(code, stdout, err, "report.json/"), (command[0], err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.safetensors"]
    assert not any(existing.iterdir())


def test_folder_outputs_keep_their_trailing_separator(files, tmp_path, capsys):
    """Where the output is a folder, a trailing '/' is what the user means: convert --to peft into a folder,
    --output-dir, and merge into a diffusers-folder checkpoint."""
    from tests.test_container_audit import write_diffusers_folder

    _, ckpt, a, _, _ = files
    code, stdout, err = run_lytools(capsys, "convert", a, "-o", f"{tmp_path}/adapter/", "--to", "peft", "--component", "unet")
    assert code == 0, err
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    code, stdout, err = run_lytools(capsys, "convert", a, "--output-dir", f"{tmp_path}/many/", "--to", "diffusers")
    assert code == 0 and stdout.strip() == str(tmp_path / "many" / "a.safetensors"), err
    pipeline = write_diffusers_folder(ckpt, tmp_path / "pipeline", extra_files=False)
    assert run_merge([pipeline, a], f"{tmp_path}/merged/", dry_run=True).plan.inputs
    # --output-dir naming a file: exit 1 with convert's own message, as an existing folder as OUT is
    (tmp_path / "plain").write_text("x")
    code, stdout, err = run_lytools(capsys, "convert", a, "--output-dir", tmp_path / "plain", "--to", "diffusers")
    assert _refused(code, stdout, err, "plain: not a folder")


# -- a pickled first input is unpickled once ------------------------------------------------------------
def test_pickled_first_network_is_unpickled_once(files, tmp_path, monkeypatch):
    """Its kind and its modules come from one opening (load_network reads the open file): one torch.load per
    pickled input for a dry run, a merge and a merge with --verify; the result equals the .safetensors twin's."""
    _, _, a, b, _ = files
    first, later = tmp_path / "a.pt", tmp_path / "b.ckpt"
    torch.save(read_tensors(a), first)
    torch.save({"state_dict": read_tensors(b)}, later)
    loads: list[str] = []
    original = torch.load

    def counting(path, *args, **kwargs):
        loads.append(Path(path).name)
        return original(path, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting)
    for inputs in ([first, b], [first, later]):
        names = sorted(p.name for p in inputs if p.suffix != ".safetensors")
        for extra in ({"dry_run": True}, {}, {"verify": True}):
            loads.clear()
            out = tmp_path / f"out-{len(names)}-{len(extra)}-{'dry' if extra.get('dry_run') else 'run'}.safetensors"
            result = run_merge(inputs, None if extra.get("dry_run") else out, **extra)
            assert sorted(loads) == names, (inputs, extra, loads)
            if extra.get("verify"):
                assert result.verification.checked and not result.verification.failures
    twin = tmp_path / "twin.safetensors"
    run_merge([a, b], twin)
    merged = read_tensors(tmp_path / "out-2-0-run.safetensors")
    assert merged.keys() == read_tensors(twin).keys()
    assert all(torch.equal(tensor, read_tensors(twin)[key]) for key, tensor in merged.items())


# -- flattened convs (LoHa/LoKr without Tucker) are convs ---------------------------------------------------
def test_table_kernel():
    assert table_kernel(CONV, "sd1") == (3, 3)
    assert table_kernel(LINEAR, "sd1") == ()
    assert table_kernel(CONV, None) == (3, 3)  # every table that knows the name agrees
    assert table_kernel("lora_unet_no_such_module", "sd1") is None
    assert table_kernel(CONV, "chroma") is None  # a Flux-family table lacks an SD1 name


def _args(metadata: dict) -> dict:
    return json.loads(metadata.get("ss_network_args") or "{}")


def test_flattened_loha_convs_count_as_convs_in_merged_metadata(files, tmp_path):
    """A LoHa kxk conv without Tucker stores hada_w1_b as (r, in·k·k): from the factors it looks like a Linear,
    and merge counted it in ss_network_dim ('Dynamic' beside the rank-4 linears). The SD1 table knows the
    layer: conv_dim holds it."""
    _, _, _, _, loha = files
    shapes = read_header(loha).tensors
    assert len(shapes[f"{CONV}.hada_w1_b"].shape) == 2  # stored flattened
    out = tmp_path / "copy.safetensors"
    run_merge([loha], out)
    meta = read_header(out).metadata
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "4.0"
    assert _args(meta)["conv_dim"] == "2" and _args(meta)["conv_alpha"] == "2.0"


def test_flattened_loha_convs_refactored_as_convs(files, tmp_path):
    """With --rank/--conv-rank the conv gets conv_rank and a (r, in, 3, 3) lora_down that kohya and A1111 can
    load (it was a (rank, in·9) Linear-shaped factor at the linear rank), holding the summed change."""
    _, _, _, _, loha = files
    out = tmp_path / "svd.safetensors"
    result = run_merge([loha, loha], out, ratios=[1.0, 0.5], rank=3, conv_rank=1, verify=True)
    assert result.verification.checked and not result.verification.failures  # --verify reads the 4-D output
    by_name = {m.name: m for m in result.modules}
    assert by_name[CONV].conv and by_name[CONV].rank == 1 and not by_name[LINEAR].conv and by_name[LINEAR].rank == 3
    tensors = read_tensors(out)
    down, up = tensors[f"{CONV}.lora_down.weight"], tensors[f"{CONV}.lora_up.weight"]
    assert down.dim() == 4 and down.shape[0] == 1 and down.shape[2:] == (3, 3) and up.shape[1:] == (1, 1, 1)
    meta = read_header(out).metadata
    assert meta["ss_network_dim"] == "3" and _args(meta)["conv_dim"] == "1"
    # the rank-1 SVD of 1.5 x the LoHa change, scaled by alpha/rank = 1
    module = NetworkModule(CONV, {k.split(".", 1)[1]: v for k, v in read_tensors(loha).items() if k.startswith(CONV + ".")})
    change = 1.5 * delta(module, (up.shape[0], down.shape[1] * 9)).reshape(up.shape[0], -1).double()
    u, s, vh = torch.linalg.svd(change)
    best = (s[0] * u[:, :1] @ vh[:1]).float()
    got = (up.reshape(up.shape[0], 1).float() @ down.reshape(1, -1).float()) * float(tensors[f"{CONV}.alpha"])
    assert torch.allclose(got, best, atol=2e-3 * float(best.abs().max()))


def test_flattened_lokr_convs_count_as_convs(files, tmp_path):
    """LoKr with a factored second half and no Tucker core stores lokr_w2_b as (r, d·k·k): the same blind spot."""
    _, _, _, _, loha = files
    tensors = read_tensors(loha)
    out_ch, flat_in = tensors[f"{CONV}.hada_w1_a"].shape[0], tensors[f"{CONV}.hada_w1_b"].shape[1]
    for suffix in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"):
        del tensors[f"{CONV}.{suffix}"]
    gen = torch.Generator().manual_seed(5)
    rank = 2
    tensors[f"{CONV}.lokr_w1"] = torch.randn(2, 2, generator=gen).half()
    tensors[f"{CONV}.lokr_w2_a"] = torch.randn(out_ch // 2, rank, generator=gen).half()
    tensors[f"{CONV}.lokr_w2_b"] = torch.randn(rank, flat_in // 2, generator=gen).half()
    tensors[f"{CONV}.alpha"] = torch.tensor(float(rank))
    lokr = tmp_path / "lokr.safetensors"
    write_safetensors(lokr, tensors, {})
    out = tmp_path / "merged.safetensors"
    result = run_merge([lokr], out)
    assert {m.name: m for m in result.modules}[CONV].conv
    assert _args(read_header(out).metadata)["conv_dim"] == "2"


def test_resize_flattens_loha_convs_as_convs(files, tmp_path):
    """resize turns the flattened LoHa conv into a (r, in, 3, 3) LoCon at --conv-rank (it failed writing the
    (out, r, 1, 1) up factor, whose last axis had a stride the writer's byte view refused), and counts it as
    a conv: ss_network_dim is the linear modules' rank."""
    from lytools.resize import ResizeOptions, resize_file

    _, _, _, _, loha = files
    out = tmp_path / "resized.safetensors"
    resize_file(loha, out, ResizeOptions(rank=3, conv_rank=1))
    shapes = read_header(out).tensors
    assert shapes[f"{CONV}.lora_down.weight"].shape[0] == 1 and len(shapes[f"{CONV}.lora_down.weight"].shape) == 4
    assert read_header(out).metadata["ss_network_dim"] == "3"


def test_writer_takes_contiguous_tensors_with_odd_unit_strides(tmp_path):
    tensor = torch.arange(8, dtype=torch.float16).as_strided((4, 2, 1, 1), (2, 1, 1, 40))
    assert tensor.is_contiguous() and tensor.stride(-1) == 40
    write_safetensors(tmp_path / "t.safetensors", {"t": tensor}, {})
    assert torch.equal(read_tensors(tmp_path / "t.safetensors")["t"], tensor)


def test_extract_output_checks_exit_as_the_other_commands(files, tmp_path, capsys):
    """OUT naming an input is exit 1 (as merge, resize and convert say it), a --report name that is neither
    .json nor .csv exit 2 (a bad option value, as resize says it); extract had them the other way round."""
    _, ckpt, a, _, _ = files
    base = tmp_path / "base.safetensors"
    base.write_bytes(ckpt.read_bytes())
    code, stdout, err = run_lytools(capsys, "extract", base, ckpt, base, "--overwrite")
    assert _refused(code, stdout, err, "would replace BASE") and base.read_bytes() == ckpt.read_bytes()
    for command in (["extract", ckpt, ckpt, tmp_path / "e.safetensors"], ["resize", a, tmp_path / "r.safetensors", "--rank", "2"]):
        code, stdout, err = run_lytools(capsys, *command, "--report", tmp_path / "report.txt")
        assert code == 2 and stdout == "" and "expected a .json or .csv file name" in err, (command[0], err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors"]


def test_report_naming_out_is_refused(files, tmp_path, capsys):
    """`resize IN same.json --report same.json` wrote the network, then the report over it (exit 0, the path
    printed held JSON): a --report naming OUT, however spelled, is refused before anything is read."""
    _, ckpt, a, _, _ = files
    for command, out in ((["resize", a], "same.json"), (["extract", ckpt, ckpt], "same.csv")):
        target = tmp_path / out
        extra = ["--rank", "2"] if command[0] == "resize" else []
        code, stdout, err = run_lytools(capsys, *command, target, *extra, "--report", tmp_path / "." / out)
        assert _refused(code, stdout, err, "--report names OUT"), (command[0], err)
        assert not target.exists()


def test_reports_are_written_like_every_output(files, tmp_path, capsys):
    """Both commands' reports go through a temporary file renamed into place, with the umask's mode (resize's
    was 0o600 from mkstemp, extract's written in place), and nothing else is left in the folder."""
    import os
    import stat

    from lytools.extract import ExtractOptions, RankRule, extract

    _, ckpt, a, _, _ = files
    tuned = tmp_path / "tuned.safetensors"
    tensors = read_tensors(ckpt)
    key = next(k for k, t in tensors.items() if t.dim() == 2 and "attn1.to_q" in k)
    tensors[key] = tensors[key] + 0.01 * torch.ones_like(tensors[key])
    write_safetensors(tuned, tensors, {})
    umask = os.umask(0o022)
    try:
        code, _, err = run_lytools(capsys, "resize", a, tmp_path / "r.safetensors", "--rank", "2", "--report", tmp_path / "r.csv")
        assert code == 0, err
        extract(ckpt, tuned, tmp_path / "e.safetensors",
                ExtractOptions(linear=RankRule("fixed", 1), conv=RankRule("fixed", 1), report=tmp_path / "e.csv"))
    finally:
        os.umask(umask)
    for name in ("r.csv", "e.csv", "r.safetensors", "e.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.csv", "e.safetensors", "r.csv", "r.safetensors", "tuned.safetensors"]
    from lytools.extract.report import CSV_COLUMNS

    lines = (tmp_path / "e.csv").read_bytes().split(b"\r\n")  # the csv module's line ends, as before
    assert lines[0].decode() == ",".join(CSV_COLUMNS) and len(lines) > 2


def test_merge_records_the_hash_of_an_upper_case_safetensors_name(files, tmp_path):
    """merge recorded no AutoV3 for a network named X.SAFETENSORS (a case-sensitive suffix test), where resize
    and convert record it."""
    _, _, a, b, _ = files
    upper = tmp_path / "B.SAFETENSORS"
    upper.write_bytes(b.read_bytes())
    out = tmp_path / "m.safetensors"
    run_merge([a, upper], out)
    sources = json.loads(read_header(out).metadata["lytools.sources"])
    assert [s["name"] for s in sources] == ["a.safetensors", "B.SAFETENSORS"] and all(s.get("autov3") for s in sources)


def test_pickled_checkpoint_among_the_networks_is_unpickled_once(files, tmp_path, monkeypatch):
    """A pickled checkpoint given after the first input was unpickled twice (for its modules, none, then for
    its kind) before being refused."""
    _, ckpt, a, _, _ = files
    later = tmp_path / "model.ckpt"
    torch.save({"state_dict": read_tensors(ckpt)}, later)
    loads: list[str] = []
    original = torch.load
    monkeypatch.setattr(torch, "load", lambda path, *args, **kwargs: loads.append(Path(path).name) or original(path, *args, **kwargs))
    with pytest.raises(LytoolsError, match="only the first input may be a checkpoint"):
        run_merge([a, later], tmp_path / "out.safetensors")
    assert loads == ["model.ckpt"]


def test_merge_names_a_bad_network_once(files, tmp_path, capsys):
    """A module spelled twice (kohya and lycoris_ names) is refused naming the file once, as convert says it
    (merge prefixed load_network's message, which already begins with the path, a second time)."""
    _, _, a, b, _ = files
    tensors = read_tensors(a)
    for suffix in ("lora_down.weight", "lora_up.weight", "alpha"):
        tensors[f"lycoris_{LINEAR[len('lora_unet_'):]}.{suffix}"] = tensors[f"{LINEAR}.{suffix}"]
    twice = tmp_path / "twice.safetensors"
    write_safetensors(twice, tensors, {})
    for command in (["merge", twice, b, "--dry-run"], ["convert", twice, "-o", tmp_path / "c.safetensors", "--to", "diffusers"]):
        code, stdout, err = run_lytools(capsys, *command)
        assert _refused(code, stdout, err, "are both") and err.count(str(twice)) == 1, (command[0], err)
