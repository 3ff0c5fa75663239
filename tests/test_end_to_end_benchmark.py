"""benchmarks/end_to_end.py's pure helpers: run order, medians, CPU flags, precision symmetry, the JSON keys (no
training)."""

from __future__ import annotations

import pytest
import torch
from _helpers import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("end_to_end")


def test_rounds_alternate_the_order(bench):
    order = bench.run_order(3)
    assert [side for r, side in order if r == 0] == ["qret", "qret_warm", "st"]
    assert [side for r, side in order if r == 1] == ["st", "qret_warm", "qret"]
    assert [side for r, side in order if r == 2] == ["qret", "qret_warm", "st"]
    assert bench.run_order(2, ("qret", "st")) == [(0, "qret"), (0, "st"), (1, "st"), (1, "qret")]
    with pytest.raises(SystemExit):
        bench.run_order(0)


def test_median_and_spread(bench):
    stats = bench.median_spread([300.0, 100.0, 200.0, 1000.0])
    assert stats["median"] == 250.0
    assert (stats["min"], stats["max"], stats["spread"]) == (100.0, 1000.0, 900.0)
    assert stats["runs"] == [300.0, 100.0, 200.0, 1000.0]
    assert bench.median_spread([0.81234, 0.8])["median"] == 0.8062


SAPPHIRE = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"
EPYC = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\nbugs\t\t: amx_tile\n"


def test_cpu_flags_parsed_from_the_flags_line(bench):
    assert bench.parse_cpu_flags(SAPPHIRE) == {
        "amx": True, "amx_bf16": True, "avx512": True, "avx512_bf16": True, "avx2": True,
    }  # fmt: skip
    epyc = bench.parse_cpu_flags(EPYC)  # a flag on another line (bugs) does not count
    assert epyc["amx"] is False and epyc["avx512"] is True and epyc["avx2"] is True
    assert not any(bench.parse_cpu_flags("flags\t: fpu sse2\n").values())
    assert set(bench.cpu_flags()) >= {"amx", "avx512", "avx2", "torch_cpu_capability", "torch_amx"}


@pytest.mark.parametrize("amx", [True, False])
def test_one_precision_for_both_sides_follows_hf_qret_auto(bench, monkeypatch, amx):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    resolved = bench.resolve_precision("auto", "cpu")
    assert resolved == ("bf16" if amx else "fp32")
    # the sentence-transformers side runs its encode under exactly the autocast hf-qret's encode_texts uses
    with bench.encode_context(resolved, "cpu"):
        assert torch.is_autocast_enabled("cpu") is amx
        if amx:
            assert torch.get_autocast_dtype("cpu") == torch.bfloat16
            assert torch.nn.Linear(4, 4)(torch.ones(1, 4)).dtype == torch.bfloat16
    assert bench.resolve_precision("fp32", "cpu") == "fp32"
    assert bench.resolve_precision("bf16", "cpu") == "bf16"


def test_child_arguments_carry_the_resolved_settings_to_both_sides(bench, monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    opts = bench.parse_args(["--runs", "1", "--max_seq_length", "128", "--encode_batch_size", "16", "--_device", "cpu"])
    assert opts.precision == "bf16"  # auto resolved once, in the parent
    child = bench.parse_args(opts.child_argv)
    assert (child.precision, child.max_seq_length, child.encode_batch_size) == ("bf16", 128, 16)
    assert child.settings == opts.settings


def _run(wall: float, ndcg: float) -> dict:
    return {"wall_s": wall, "cpu_s": 2 * wall, "ndcg10_16b": ndcg, "ndcg10_16b_unseen": ndcg - 0.1, "phases_s": {}}


def test_summary_keys_and_medians(bench):
    order = bench.run_order(3)
    runs = {
        "qret": [_run(100.0, 0.84), _run(120.0, 0.83), _run(110.0, 0.85)],
        "qret_warm": [_run(40.0, 0.84), _run(50.0, 0.84), _run(45.0, 0.84)],
        "st": [_run(300.0, 0.70), _run(240.0, 0.70), _run(330.0, 0.70)],
    }
    out = bench.summarize(runs, order)
    assert out["runs"] == 3
    assert out["qret_wall_s"] == 110.0 and out["st_wall_s"] == 300.0 and out["qret_warm_wall_s"] == 45.0
    assert out["speedup_runs"] == [3.0, 2.0, 3.0] and out["speedup"] == 3.0  # per-round ratios, their median
    assert out["speedup_warm_runs"] == [7.5, 4.8, 7.33] and out["speedup_warm"] == 7.33
    assert out["qret_ndcg10_16b"] == 0.84 and out["st_ndcg10_16b"] == 0.7
    assert out["qret_ndcg10_16b_unseen"] == 0.74
    assert out["st_wall"]["spread"] == 90.0
    assert out["qret_cpu_s"] == 220.0 and out["speedup_cpu"] == 3.0 and out["speedup_warm_cpu"] == 7.33
    only_qret = bench.summarize({"qret": runs["qret"]}, bench.run_order(3, ("qret",)))
    assert "speedup" not in only_qret and "st_wall_s" not in only_qret


def test_child_runs_are_timed_with_their_cpu_seconds(bench, tmp_path):
    import sys

    argv = [sys.executable, "-c", "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass"]
    start, wall, seen = bench._run_child(argv, tmp_path / "busy.log", {})
    assert 0.3 <= seen["cpu_s"] + 0.05 and seen["cpu_s"] <= wall + 0.1
    assert set(seen) == {"cpu_s", "load_avg_start", "load_avg_end"}
    with pytest.raises(SystemExit, match="exit 3"):
        bench._run_child([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "fails.log", {})


def test_scores_read_the_evaluator_keys(bench):
    metrics = {
        "trained_quantized_ndcg@10": 0.84, "trained_quantized_ndcg@10_seen": 0.95,
        "trained_quantized_ndcg@10_unseen": 0.685, "trained_flat_ndcg@10": 0.85, "trained_quantized_recall@100": 0.9,
    }  # fmt: skip
    assert bench.scores_of(metrics, "trained_") == {
        "ndcg10_16b": 0.84, "ndcg10_16b_seen": 0.95, "ndcg10_16b_unseen": 0.685, "ndcg10_flat": 0.85,
    }  # fmt: skip


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_both_sides_encode_the_same_vectors(bench, precision):
    """The alternative's ``encode_document`` under ``encode_context`` is hf-qret's corpus encoding, at both precisions."""
    import numpy as np
    from sentence_transformers import SentenceTransformer

    from hf_qret.config import resolve_model_path
    from hf_qret.serving.encoder import encode_texts

    model = SentenceTransformer(resolve_model_path("sentence-transformers/all-MiniLM-L6-v2"), device="cpu")
    texts = ["a claim about cells", "another, longer abstract about proteins binding in mice"]
    with bench.encode_context(precision, "cpu"):
        st_side = model.encode_document(texts, batch_size=64, convert_to_numpy=True)
    qret_side = encode_texts(model, texts, batch_size=64, role="document", precision=precision)
    np.testing.assert_allclose(st_side, qret_side, atol=1e-6)
    if precision == "bf16":  # and the autocast is real: float32 gives other vectors
        assert np.abs(model.encode_document(texts, convert_to_numpy=True) - st_side).max() > 1e-4
