"""Fixtures the tests read, inside the repository (their sources: ``tests/data/SOURCES.md``)."""

from pathlib import Path

DATA = Path(__file__).resolve().parent
VENDOR_SAMPLES = DATA / "vendor-samples"
