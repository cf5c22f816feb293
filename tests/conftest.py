"""Suite-wide settings."""

import os

from hypothesis import settings

# CI runs the same examples every time (a red run must be reproducible); locally hypothesis explores.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
