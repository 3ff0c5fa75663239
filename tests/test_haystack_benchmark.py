"""benchmarks/haystack.py's peak RSS of the training child is the child's own, not the benchmark process's."""

from __future__ import annotations

import resource
import sys

import numpy as np
import pytest
from _helpers import load_benchmark


@pytest.fixture(scope="module")
def haystack():
    return load_benchmark("haystack")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's ru_maxrss semantics")
def test_the_measured_peak_is_the_childs_own_not_the_benchmark_processs(haystack, tmp_path):
    block_bytes = 192 * 2**20
    block = np.ones(block_bytes // 8)  # touched: this process's resident high-water mark is now above block_bytes
    del block
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 >= block_bytes
    # a bare interpreter as the "training" child: its own peak is a few tens of MB; a child spawned directly from
    # this process starts its maxrss at this process's high-water mark (what RUSAGE_CHILDREN used to report)
    _, profile = haystack.run_measured_child(
        [sys.executable, "-c", "print('step 1')"], tmp_path / "train.log", tmp_path / "train_rss.json"
    )
    assert profile["returncode"] == 0
    assert 0 < profile["ru_maxrss_bytes"] < block_bytes
    assert "step 1" in (tmp_path / "train.log").read_text()
