"""Suite-wide settings."""

import os

import pytest
import torch
from hypothesis import settings

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
