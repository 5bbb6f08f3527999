import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault('OMP_NUM_THREADS', '2')


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def smaller_synthetic_eval_sets(monkeypatch):
    """In-process runs evaluate on 1,200 + 500 held-out images, as before the benchmark's sets grew to 3,000 + 1,000:
    the tests check plumbing and that runs learn, not the benchmark's resolving power."""
    import data
    monkeypatch.setattr(data.synthetic_eval_sets, '__defaults__', (1200, 500))
