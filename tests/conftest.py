"""Fixtures shared by every test folder."""
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def find_tn5000_datasets():
    """The folder holding TN5000/: $THYROID_DATASETS, ./datasets or ../shared/data, else None."""
    shared = os.path.join(REPO, "..", "shared", "data")
    for root in (os.getenv("THYROID_DATASETS"), "datasets", shared):
        if root and os.path.isdir(os.path.join(root, "TN5000", "Annotations")):
            return root
    return None


@pytest.fixture
def tn5000_datasets(monkeypatch):
    """THYROID_DATASETS pointed at the real TN5000 for the test; skips when it is absent."""
    root = find_tn5000_datasets()
    if root is None:
        pytest.skip("TN5000 not found (set THYROID_DATASETS)")
    monkeypatch.setenv("THYROID_DATASETS", root)
    return root
