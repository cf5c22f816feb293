"""Suite-wide settings."""

import atexit
import os
import shutil
import tempfile

import pytest
import torch
from hypothesis import settings

# the name-table cache (lytools.arch.table_cache) of this run, never the user's own; set before any
# test module builds a table, and inherited by the CLI subprocesses tests start
if "LYTOOLS_CACHE_DIR" not in os.environ:
    os.environ["LYTOOLS_CACHE_DIR"] = tempfile.mkdtemp(prefix="lytools-test-cache-")
    atexit.register(shutil.rmtree, os.environ["LYTOOLS_CACHE_DIR"], True)

# CI runs the same examples every time (a red run must be reproducible); locally hypothesis explores.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The suite's matrices are tiny: one intra-op thread avoids spin-wait contention on 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
