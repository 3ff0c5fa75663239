"""Unit tests of hf_qret.index.core.QuantizedIndex on small random clustered vectors (CPU FAISS)."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from hf_qret.errors import ArtifactError, ConfigError
from hf_qret.index.core import QuantizedIndex

DIM, N = 32, 2000
FACTORIES = ["PQ8", "OPQ8,PQ8", "IVF16,PQ8", "HNSW16,SQ8", "SQ8", "Flat"]


def _fast_training(index):
    """Makes FAISS training cheap without changing what the index is.

    ``index_factory("PQ8")`` (and IVF/HNSW/OPQ variants) turns on *polysemous* training, a simulated annealing of
    the code order that takes ~10 s per train on a small CPU and changes nothing these tests look at; OPQ's
    default 50 outer iterations are cut to 10. The index type, code size, codebooks and search are unchanged.
    """
    top = faiss.downcast_index(index)
    inner = top
    if isinstance(top, faiss.IndexPreTransform):
        for i in range(top.chain.size()):
            transform = faiss.downcast_VectorTransform(top.chain.at(i))
            if isinstance(transform, faiss.OPQMatrix):
                transform.niter = 10
        inner = faiss.downcast_index(top.index)
    if isinstance(inner, faiss.IndexHNSW):
        inner = faiss.downcast_index(inner.storage)
    if hasattr(inner, "do_polysemous_training"):
        inner.do_polysemous_training = False
    return index


@pytest.fixture(scope="module", autouse=True)
def fast_faiss():
    real = faiss.index_factory

    def index_factory(*args, **kwargs):
        return _fast_training(real(*args, **kwargs))

    threads = faiss.omp_get_max_threads()
    # One OpenMP thread: deterministic (HNSW construction is not, in parallel) and much faster on a small, busy
    # CPU, where FAISS's OpenMP workers spin against other processes (~15x slower PQ training measured on 2 cores).
    faiss.omp_set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(faiss, "index_factory", index_factory)
            yield
    finally:
        faiss.omp_set_num_threads(threads)


def _clustered(n: int = N, dim: int = DIM, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((20, dim))
    vectors = centres[rng.integers(0, 20, n)] + 0.5 * rng.standard_normal((n, dim))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)  # unit norm: the best inner product is oneself
    return vectors.astype(np.float32)


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    return _clustered()


@pytest.fixture(scope="module")
def built(vectors):
    cache: dict[str, QuantizedIndex] = {}

    def get(factory: str) -> QuantizedIndex:
        if factory not in cache:
            index = QuantizedIndex(DIM, factory, use_gpu=False)
            index.build(vectors)
            cache[factory] = index
        return cache[factory]

    return get


def _pq_centroids(index: QuantizedIndex) -> np.ndarray:
    return faiss.vector_to_array(faiss.downcast_index(index.index).pq.centroids).copy()


# ----------------------------------------------------------------------------- build / search


@pytest.mark.parametrize("factory", FACTORIES)
def test_build_and_search(built, vectors, factory):
    index = built(factory)
    assert index.ntotal == N
    assert index.is_trained
    assert index.dim == DIM
    queries = vectors[:200]
    scores, rows = index.search(queries, k=10)
    assert scores.shape == (200, 10) and rows.shape == (200, 10)
    assert rows.dtype == np.int64
    assert ((rows >= 0) & (rows < N)).all()
    # each vector finds itself among its approximate top 10 (a real, if loose, accuracy check)
    self_hit = (rows == np.arange(200)[:, None]).any(axis=1).mean()
    assert self_hit >= 0.9, self_hit


@pytest.mark.parametrize("factory", FACTORIES)
def test_scores_are_inner_products_best_first(built, vectors, factory):
    index = built(factory)
    queries = vectors[:100]
    scores, rows = index.search(queries, k=10)
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best (largest inner product) first
    decoded = index.reconstruct_all()
    assert decoded.shape == (N, DIM)
    expected = np.einsum("qd,qkd->qk", queries, decoded[rows])  # query . quantized vector of each hit
    np.testing.assert_allclose(scores, expected, atol=1e-4)


def test_flat_nearest_neighbour_is_itself_and_exact(built, vectors):
    index = built("Flat")
    scores, rows = index.search(vectors, k=5)
    np.testing.assert_array_equal(rows[:, 0], np.arange(N))
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    exact = vectors[:50] @ vectors.T
    expected_rows = np.argsort(-exact, axis=1)[:, :5]
    np.testing.assert_array_equal(rows[:50], expected_rows)
    np.testing.assert_allclose(scores[:50], np.take_along_axis(exact, expected_rows, axis=1), atol=1e-5)


@pytest.mark.parametrize("factory, expected", [("PQ8", 8), ("OPQ8,PQ8", 8), ("SQ8", 32), ("Flat", 128)])
def test_bytes_per_vector(built, factory, expected):
    assert built(factory).bytes_per_vector == expected


def test_bytes_per_vector_ivf(built):
    # the 8-byte PQ code, plus at most the 1-byte list number of the standalone codec
    assert built("IVF16,PQ8").bytes_per_vector in (8, 9)


def test_bytes_per_vector_hnsw(built):
    # the scalar-quantized storage codes; graph links are not counted
    assert built("HNSW16,SQ8").bytes_per_vector == 32


def test_factory_that_faiss_builds_as_l2_is_refused():
    # faiss 1.15's index_factory("HNSW16,PQ8", METRIC_INNER_PRODUCT) silently builds an L2 index
    with pytest.raises(ConfigError, match="builds an L2 index"):
        QuantizedIndex(DIM, "HNSW16,PQ8")


@pytest.mark.parametrize("factory", ["PQ7", "nonsense", "IVF16,PQ5", ""])
def test_invalid_factory_raises_config_error(factory):
    with pytest.raises(ConfigError, match="invalid --index_factory"):
        QuantizedIndex(DIM, factory)
    with pytest.raises(ConfigError):
        QuantizedIndex.validate_factory(DIM, factory)


def test_valid_factory_validates():
    QuantizedIndex.validate_factory(DIM, "PQ8")
    QuantizedIndex.validate_factory(DIM, "OPQ16,PQ16")


def test_search_on_empty_index():
    index = QuantizedIndex(DIM, "Flat", use_gpu=False)
    with pytest.raises(ArtifactError, match="empty"):
        index.search(np.zeros((1, DIM), dtype=np.float32), k=3)
    trained_only = QuantizedIndex(DIM, "SQ8", use_gpu=False)
    trained_only.train(_clustered(300))
    assert trained_only.is_trained and trained_only.ntotal == 0
    with pytest.raises(ArtifactError, match="empty"):
        trained_only.search(np.zeros((1, DIM), dtype=np.float32), k=3)


def test_k_larger_than_ntotal_is_clamped():
    small = _clustered(10, seed=4)
    index = QuantizedIndex(DIM, "Flat", use_gpu=False)
    index.build(small)
    scores, rows = index.search(small[:3], k=50)
    assert scores.shape == (3, 10) and rows.shape == (3, 10)
    for row in rows:
        assert sorted(row.tolist()) == list(range(10))


def test_search_accepts_float64_and_non_contiguous(built, vectors):
    index = built("Flat")
    expected = index.search(vectors[:4], k=3)
    strided = np.asfortranarray(vectors[:4].astype(np.float64))
    got = index.search(strided, k=3)
    np.testing.assert_array_equal(got[1], expected[1])
    np.testing.assert_allclose(got[0], expected[0], atol=1e-6)


# ----------------------------------------------------------------------------- refresh


def _changed(vectors: np.ndarray) -> np.ndarray:
    """The same bank after 'training': a random rotation of every row (the data distribution changes)."""
    rng = np.random.default_rng(11)
    rotation, _ = np.linalg.qr(rng.standard_normal((DIM, DIM)))
    return np.ascontiguousarray(vectors @ rotation.astype(np.float32))


def test_refresh_reencode_keeps_codebooks_and_reencodes(vectors):
    index = QuantizedIndex(DIM, "PQ8", use_gpu=False)
    index.build(vectors)
    centroids = _pq_centroids(index)
    codes_before = index.reconstruct_all()

    changed = _changed(vectors)
    index.refresh(changed, mode="reencode")
    assert index.ntotal == N  # re-encoded, not appended
    np.testing.assert_array_equal(_pq_centroids(index), centroids)

    pq = faiss.downcast_index(index.index).pq
    expected = pq.decode(pq.compute_codes(changed))  # the changed rows under the *old* codebooks
    after = index.reconstruct_all()
    np.testing.assert_array_equal(after, expected)
    assert not np.allclose(after, codes_before)
    scores, rows = index.search(changed[:100], k=10)
    assert (rows == np.arange(100)[:, None]).any(axis=1).mean() >= 0.5


def test_refresh_reencode_keeps_ivf_coarse_quantizer(vectors):
    index = QuantizedIndex(DIM, "IVF16,PQ8", search_params="nprobe=4", use_gpu=False)
    index.build(vectors)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index.index))
    coarse = ivf.quantizer.reconstruct_n(0, ivf.nlist).copy()
    centroids = faiss.vector_to_array(ivf.pq.centroids).copy()
    index.refresh(_changed(vectors), mode="reencode")
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index.index))
    np.testing.assert_array_equal(ivf.quantizer.reconstruct_n(0, ivf.nlist), coarse)
    np.testing.assert_array_equal(faiss.vector_to_array(ivf.pq.centroids), centroids)
    assert index.ntotal == N
    assert ivf.nprobe == 4


def test_refresh_retrain_retrains_codebooks(vectors):
    changed = _changed(vectors)
    reencoded = QuantizedIndex(DIM, "PQ8", use_gpu=False)
    reencoded.build(vectors)
    centroids = _pq_centroids(reencoded)
    retrained = QuantizedIndex(DIM, "PQ8", use_gpu=False)
    retrained.build(vectors)

    reencoded.refresh(changed, mode="reencode")
    retrained.refresh(changed, mode="retrain")
    assert retrained.ntotal == N
    assert not np.allclose(_pq_centroids(retrained), centroids)
    # codebooks fitted to the changed bank quantize it better than the stale ones
    err_retrain = float(((retrained.reconstruct_all() - changed) ** 2).sum())
    err_reencode = float(((reencoded.reconstruct_all() - changed) ** 2).sum())
    assert err_retrain < 0.9 * err_reencode, (err_retrain, err_reencode)


def _opq_iterations(index: QuantizedIndex) -> list[int]:
    top = faiss.downcast_index(index.index)
    transforms = [faiss.downcast_VectorTransform(top.chain.at(i)) for i in range(top.chain.size())]
    return [t.niter for t in transforms if isinstance(t, faiss.OPQMatrix)]


def test_opq_niter_sets_the_rotation_training_iterations_for_every_rebuild(vectors):
    index = QuantizedIndex(DIM, "OPQ8,PQ8", use_gpu=False, opq_niter=3)
    assert _opq_iterations(index) == [3]
    index.build(vectors)
    rotation = faiss.vector_to_array(faiss.downcast_VectorTransform(faiss.downcast_index(index.index).chain.at(0)).A)
    index.refresh(_changed(vectors), mode="retrain")  # a retrain builds a fresh FAISS index: the setting carries over
    assert _opq_iterations(index) == [3]
    new_rotation = faiss.downcast_VectorTransform(faiss.downcast_index(index.index).chain.at(0)).A
    assert not np.allclose(faiss.vector_to_array(new_rotation), rotation)
    assert QuantizedIndex(DIM, "PQ8", use_gpu=False, opq_niter=3).opq_niter == 3  # no OPQ stage: nothing to set


def test_opq_niter_must_be_positive():
    with pytest.raises(ConfigError, match="opq_niter must be at least 1"):
        QuantizedIndex(DIM, "OPQ8,PQ8", opq_niter=0)


def test_refresh_untrained_index_builds(vectors):
    index = QuantizedIndex(DIM, "SQ8", use_gpu=False)
    assert not index.is_trained
    index.refresh(vectors[:500], mode="reencode")
    assert index.is_trained and index.ntotal == 500


@pytest.mark.parametrize("mode", ["rebuild", "", "Reencode"])
def test_refresh_bad_mode(vectors, mode):
    index = QuantizedIndex(DIM, "Flat", use_gpu=False)
    index.build(vectors[:10])
    with pytest.raises(ConfigError, match="refresh mode"):
        index.refresh(vectors[:10], mode=mode)
    assert index.ntotal == 10


# ----------------------------------------------------------------------------- persistence


@pytest.mark.parametrize("factory", ["PQ8", "IVF16,PQ8", "OPQ8,PQ8"])
def test_save_load_round_trip(built, vectors, tmp_path, factory):
    index = built(factory)
    path = tmp_path / "index.faiss"
    index.save(path)
    assert not (tmp_path / "index.faiss.tmp").exists()
    loaded = QuantizedIndex.load(path, factory=factory)
    assert loaded.ntotal == N and loaded.factory == factory and loaded.dim == DIM
    assert loaded.bytes_per_vector == index.bytes_per_vector
    loaded.use_gpu = False
    expected = index.search(vectors[:100], k=10)
    got = loaded.search(vectors[:100], k=10)
    np.testing.assert_array_equal(got[1], expected[1])
    np.testing.assert_array_equal(got[0], expected[0])


def test_load_missing_truncated_and_garbage(built, tmp_path):
    with pytest.raises(ArtifactError, match="no such index file"):
        QuantizedIndex.load(tmp_path / "missing.faiss")
    path = tmp_path / "index.faiss"
    built("PQ8").save(path)
    data = path.read_bytes()
    for cut in (0, 7, len(data) // 2, len(data) - 1):
        truncated = tmp_path / f"cut{cut}.faiss"
        truncated.write_bytes(data[:cut])
        with pytest.raises(ArtifactError, match="corrupt or truncated"):
            QuantizedIndex.load(truncated)
    garbage = tmp_path / "garbage.faiss"
    garbage.write_bytes(b"this is not a faiss index" * 40)
    with pytest.raises(ArtifactError, match="corrupt or truncated"):
        QuantizedIndex.load(garbage)


# ----------------------------------------------------------------------------- search parameters


def test_nprobe_applies_to_ivf(vectors, tmp_path):
    index = QuantizedIndex(DIM, "IVF16,PQ8", search_params="nprobe=4", use_gpu=False)
    index.build(vectors)
    assert faiss.extract_index_ivf(index.index).nprobe == 4

    index.set_search_params("nprobe=1")
    assert faiss.extract_index_ivf(index.index).nprobe == 1
    one = index.search(vectors[:200], k=20)
    index.set_search_params("nprobe=16")
    assert faiss.extract_index_ivf(index.index).nprobe == 16
    all_lists = index.search(vectors[:200], k=20)
    assert not np.array_equal(one[1], all_lists[1])  # probing more lists changes (widens) the search
    assert (all_lists[0][:, 0] >= one[0][:, 0] - 1e-6).all()

    index.set_search_params("nprobe=4")
    index.refresh(vectors, mode="retrain")  # a fresh index gets the parameters again
    assert faiss.extract_index_ivf(index.index).nprobe == 4

    path = tmp_path / "ivf.faiss"
    index.save(path)
    assert faiss.extract_index_ivf(QuantizedIndex.load(path).index).nprobe == 4
    assert faiss.extract_index_ivf(QuantizedIndex.load(path, search_params="nprobe=8").index).nprobe == 8


def test_ef_search_applies_to_hnsw(built):
    index = built("HNSW16,SQ8")
    index.set_search_params("efSearch=48")
    assert faiss.downcast_index(index.index).hnsw.efSearch == 48


@pytest.mark.parametrize("factory, params", [("IVF16,PQ8", "bogus=3"), ("PQ8", "nprobe=4"), ("Flat", "efSearch=8")])
def test_invalid_search_params_raise_config_error(built, vectors, factory, params):
    index = QuantizedIndex(DIM, factory, search_params=params, use_gpu=False)
    with pytest.raises(ConfigError, match="search parameters"):
        index.build(vectors[:1000])
    other = built(factory)
    with pytest.raises(ConfigError, match="search parameters"):
        other.set_search_params(params)
    other.set_search_params(None)  # clearing them is always fine
