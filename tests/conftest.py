"""Test-wide settings: no network, headless plotting."""

import os

# The embedded models and data ship in packages; nothing may reach for a hub during tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "agg")
