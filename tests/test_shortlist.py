"""The mining shortlist: inverted lists over a flat (O)PQ index's own codes (hf_qret.index.shortlist)."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from hf_qret.errors import ConfigError
from hf_qret.index.core import QuantizedIndex

DIM, N, NLIST = 32, 3000, 16


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # deterministic and fast on a small, busy CPU
    yield
    faiss.omp_set_num_threads(threads)


def _clustered(seed: int = 0, n: int = N) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((24, DIM))
    vectors = centres[rng.integers(0, 24, n)] + 0.5 * rng.standard_normal((n, DIM))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def _index(factory: str, nprobe: int = NLIST) -> QuantizedIndex:
    return QuantizedIndex(DIM, factory, use_gpu=False, opq_niter=4, mining_nlist=NLIST, mining_nprobe=nprobe)


def _assert_mine_is_search(index: QuantizedIndex, queries: np.ndarray, k: int = 20) -> None:
    mined_scores, mined_rows = index.mine(queries, k)
    scores, rows = index.search(queries, k)
    np.testing.assert_array_equal(mined_rows, rows)
    np.testing.assert_allclose(mined_scores, scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("factory", ["PQ8", "OPQ8,PQ8"])
def test_probing_every_list_mines_exactly_what_the_served_index_finds(factory):
    vectors = _clustered()
    index = _index(factory)
    index.build(vectors)
    assert index.shortlist is not None and index.shortlist.ntotal == N and index.shortlist.nlist == NLIST
    _assert_mine_is_search(index, vectors[:50])


@pytest.mark.parametrize("factory", ["PQ8", "OPQ8,PQ8"])
def test_fewer_lists_give_served_scores_and_most_of_the_top_k(factory):
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((N, DIM)).astype(np.float32)  # no clusters: the top 20 spans several lists
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = _index(factory, nprobe=4)
    index.build(vectors)
    queries = vectors[:100]
    scores, rows = index.mine(queries, 20)
    decoded = index.reconstruct_all()
    for q, (row_scores, row_ids) in enumerate(zip(scores, rows)):
        found = row_ids >= 0
        # each mined row carries the served index's own (quantized) score for it
        np.testing.assert_allclose(row_scores[found], decoded[row_ids[found]] @ queries[q], rtol=1e-4, atol=1e-4)
    _, exact = index.search(queries, 20)
    overlap = np.mean([len(set(a) & set(b)) / 20 for a, b in zip(rows, exact)])
    assert 0.4 < overlap < 1.0, overlap  # it scans a quarter of the lists: much, not all, of the top 20


@pytest.mark.parametrize("mode", ["incremental", "reencode", "retrain"])
def test_refreshes_keep_the_shortlist_in_step(mode):
    vectors = _clustered()
    index = _index("OPQ8,PQ8")
    index.build(vectors)
    moved = vectors.copy()
    rows = np.arange(0, N, 7)
    moved[rows] = _clustered(seed=1, n=len(rows))  # these rows move to other clusters
    before = index.shortlist
    index.refresh(moved, mode=mode, rows=rows)
    assert index.shortlist.ntotal == N
    assert (index.shortlist is before) == (mode != "retrain")  # a retrain builds new lists for the new codebooks
    _assert_mine_is_search(index, moved[rows[:40]])


def test_replace_rebuilds_the_shortlist_over_the_new_codes(tmp_path):
    vectors = _clustered()
    index = _index("OPQ8,PQ8")
    index.build(vectors)
    other = QuantizedIndex(DIM, "OPQ8,PQ8", use_gpu=False, opq_niter=4)
    other.build(_clustered(seed=2))
    other.save(tmp_path / "index.faiss")
    index.replace(QuantizedIndex.load(tmp_path / "index.faiss").index)  # what resuming from a checkpoint does
    _assert_mine_is_search(index, vectors[:50])


def test_without_a_shortlist_mining_is_search():
    vectors = _clustered()
    index = QuantizedIndex(DIM, "PQ8", use_gpu=False)
    index.build(vectors)
    assert index.shortlist is None
    _assert_mine_is_search(index, vectors[:10])


@pytest.mark.parametrize("factory", ["IVF16,PQ8", "SQ8", "HNSW16,SQ8"])
def test_shortlist_needs_a_flat_pq_index(factory):
    with pytest.raises(ConfigError, match="mining shortlist .* flat PQ index"):
        QuantizedIndex(DIM, factory, mining_nlist=NLIST)


@pytest.mark.parametrize("options", [{"mining_nlist": -1}, {"mining_nlist": 4, "mining_nprobe": 0}])
def test_bad_shortlist_settings(options):
    with pytest.raises(ConfigError, match="mining_nlist must be >= 0"):
        QuantizedIndex(DIM, "PQ8", **options)


def test_more_lists_than_training_rows_is_refused():
    index = QuantizedIndex(DIM, "PQ8", use_gpu=False, mining_nlist=500)
    with pytest.raises(ConfigError, match="needs at least as many training rows as lists"):
        index.build(_clustered(n=400))


# ----------------------------------------------------------------------------- in the trainer


def test_trainer_mines_through_the_shortlist_like_the_whole_index(tiny_model_dir, beir_dir, tmp_path):
    """Probing every list, training is the same as without a shortlist: same candidates, same bank."""
    from sentence_transformers import SentenceTransformer
    from test_trainer import make_trainer, record_candidates

    options = dict(refresh_mode="incremental", refresh_steps=2, refresh_on_epoch_end=False, faiss_threads=1)
    runs = {}
    for name, extra in [("whole", {}), ("shortlist", {"mining_nlist": 8, "mining_nprobe": 8})]:
        model = SentenceTransformer(tiny_model_dir, device="cpu")
        trainer, _ = make_trainer(model, beir_dir, tmp_path / name, **options, **extra)
        seen = record_candidates(trainer)
        calls = []
        original = trainer.index.mine
        trainer.index.mine = lambda queries, k: calls.append(len(queries)) or original(queries, k)
        trainer.train()
        runs[name] = (trainer, seen, calls)
    whole, shortlisted = runs["whole"][0], runs["shortlist"][0]
    assert whole.index.shortlist is None and shortlisted.index.shortlist.ntotal == len(shortlisted.bank)
    assert runs["shortlist"][2] and runs["whole"][2]  # the miner goes through QuantizedIndex.mine
    for a, b in zip(runs["whole"][1], runs["shortlist"][1]):
        assert torch.equal(a, b)
    assert torch.equal(whole.bank.weight.detach(), shortlisted.bank.weight.detach())
    assert shortlisted.artifact_config()["mining_shortlist"] == {"nlist": 8, "nprobe": 8}


def test_trainer_resume_rebuilds_the_shortlist(tiny_model_dir, beir_dir, tmp_path):
    from sentence_transformers import SentenceTransformer
    from test_trainer import make_trainer

    options = dict(refresh_mode="incremental", refresh_steps=2, refresh_on_epoch_end=False, max_steps=6,
                   save_strategy="steps", save_steps=3, mining_nlist=8, mining_nprobe=2)  # fmt: skip
    unbroken, _ = make_trainer(SentenceTransformer(tiny_model_dir, device="cpu"), beir_dir, tmp_path / "a", **options)
    unbroken.train()
    resumed, _ = make_trainer(SentenceTransformer(tiny_model_dir, device="cpu"), beir_dir, tmp_path / "b", **options)
    resumed.train(resume_from_checkpoint=str(Path(unbroken.args.output_dir) / "checkpoint-3"))
    assert resumed.index.shortlist.ntotal == len(resumed.bank)
    queries = resumed.bank.numpy()[:20]
    _, rows = resumed.index.mine(queries, 10)
    scores, _ = resumed.index.mine(queries, 10)
    decoded = resumed.index.reconstruct_all()
    assert resumed.index.normalize_decoded  # a cosine model: each mined row scored by its decoded vector's cosine
    decoded = decoded / np.linalg.norm(decoded, axis=1, keepdims=True)
    for q, (row_ids, row_scores) in enumerate(zip(rows, scores)):
        found = row_ids >= 0
        np.testing.assert_allclose(row_scores[found], decoded[row_ids[found]] @ queries[q], rtol=1e-4, atol=1e-4)
