"""The lytools command line: parse, call the library, report. No math here."""

from __future__ import annotations

import os
import signal
import sys
import traceback
from pathlib import Path

import click

from lytools import __version__
from lytools.errors import LytoolsError
from lytools.ui import Reporter

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


# -- shared options and helpers ---------------------------------------------------------------
def verbosity_options(func):
    """-q/--quiet and -v/--verbose; the command receives `reporter`."""
    func = click.option("-v", "--verbose", "verbose", count=True, help="More detail on stderr (repeatable).")(func)
    func = click.option("-q", "--quiet", is_flag=True, help="No progress or logs on stderr.")(func)
    return func


def make_reporter(quiet: bool, verbose: int) -> Reporter:
    return Reporter(0 if quiet else 1 + verbose)


device_option = click.option(
    "--device", default="auto", show_default=True, metavar="auto|cpu|cuda|cuda:N",
    help="Where to compute: auto takes CUDA when present, else CPU.",
)
overwrite_option = click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON on stdout.")


def save_dtype_option(default: str | None = None, fp8: bool = False):
    choices = ["fp32", "fp16", "bf16"] + (["fp8_e4m3", "fp8_e5m2"] if fp8 else [])
    return click.option(
        "--save-dtype", type=click.Choice(choices), default=default, show_default=default is not None,
        help="dtype of floating tensors written (integer tensors keep theirs)"
        + ("" if default else "; default: the input's dtype") + ".",
    )


def expand_inputs(paths: tuple[str, ...]) -> list[Path]:
    """Return input paths, with `-` replaced by the lines of stdin (one path per line)."""
    result: list[Path] = []
    for path in paths:
        if path == "-":
            result.extend(Path(line.strip()) for line in sys.stdin if line.strip())
        else:
            result.append(Path(path))
    return result


# -- the group --------------------------------------------------------------------------------
@click.group(context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, prog_name="lytools")
def cli() -> None:
    """Offline toolkit for LoRA and LyCORIS files: what a file is, and (as they land) extract,
    merge, resize and convert. Every command streams tensors one at a time."""


# -- entry point ------------------------------------------------------------------------------
def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    """Run the CLI, turning every lytools error into one stderr line and an exit code."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    debug = os.environ.get("LYTOOLS_DEBUG") == "1"
    try:
        cli.main(args=argv, prog_name="lytools", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("lytools: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except LytoolsError as exc:
        if debug:
            traceback.print_exc()
        click.echo(f"lytools: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("lytools: interrupted", err=True)
        sys.exit(130)
    except MemoryError:
        click.echo("lytools: error: out of memory", err=True)
        sys.exit(1)
    except BrokenPipeError:
        sys.stderr.close()
        sys.exit(1)
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, never a traceback
        if debug:
            traceback.print_exc()
        name = type(exc).__name__
        if "OutOfMemory" in name:
            click.echo(f"lytools: error: out of memory on the device ({str(exc).splitlines()[0][:200]})", err=True)
        else:
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            click.echo(f"lytools: error: internal error {name}: {first} (set LYTOOLS_DEBUG=1 for a traceback)", err=True)
        sys.exit(1)
