"""Quantizer distillation (hf_qret.distill): the quantized ranking moves toward the flat teacher's, the result is a
plain FAISS index, and the recipe option runs it before the artifact is saved."""

from __future__ import annotations

import numpy as np
import pytest

from hf_qret.artifact import load_retrieval_files
from hf_qret.config import QRetTrainingArguments
from hf_qret.distill import distill_quantizer, pseudo_query_texts, ranking_kl
from hf_qret.errors import ConfigError
from hf_qret.index import QuantizedIndex, split_pretransform


def _data(seed: int = 0, docs: int = 2000, dim: int = 16, queries: int = 800) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((40, dim)).astype("float32")
    bank = centers[rng.integers(40, size=docs)] + 0.6 * rng.standard_normal((docs, dim)).astype("float32")
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    query = bank[rng.integers(docs, size=queries)] + 0.3 * rng.standard_normal((queries, dim)).astype("float32")
    query /= np.linalg.norm(query, axis=1, keepdims=True)
    return bank, query


def _distill(factory: str, **options) -> tuple[QuantizedIndex, np.ndarray, np.ndarray, object]:
    bank, queries = _data()
    index = QuantizedIndex(bank.shape[1], factory)
    index.build(bank)
    options = {"top_k": 30, "num_random": 30, "rounds": 2, "epochs": 2, "learning_rate": 2e-3, **options}
    return index, bank, queries, distill_quantizer(index, bank, queries, **options)


@pytest.mark.parametrize("factory", ["PQ4", "OPQ4,PQ4"])
def test_distillation_brings_the_quantized_ranking_closer_to_the_flat_one(factory):
    bank, queries = _data()
    reference = QuantizedIndex(bank.shape[1], factory)
    reference.build(bank)
    held_out = _data(seed=1)[1]  # queries the distillation never saw
    kl_before = ranking_kl(reference, bank, held_out, top_k=30)
    index, _, _, result = _distill(factory)
    assert result.kl_after < 0.9 * result.kl_before
    assert result.overlap_after > result.overlap_before  # the flat top-10 kept, on the distillation queries
    assert ranking_kl(index, bank, held_out, top_k=30) < kl_before  # and closer on queries it never saw
    # every row was re-encoded with the distilled centroids: stored codes are the nearest-centroid codes
    np.testing.assert_allclose(index.reconstruct_all(), index.quantize(bank), atol=1e-5)


def test_learned_rotation_stays_orthogonal_and_helps():
    index, bank, queries, result = _distill("OPQ4,PQ4", learn_rotation=True)
    assert result.kl_after < result.kl_before
    transform = split_pretransform(index.faiss, index.index)[0][0]
    matrix = index.faiss.vector_to_array(transform.A).reshape(transform.d_out, transform.d_in)
    np.testing.assert_allclose(matrix @ matrix.T, np.eye(matrix.shape[0]), atol=1e-4)
    np.testing.assert_allclose(index.reconstruct_all(), index.quantize(bank), atol=1e-5)


def test_distilled_index_is_a_plain_faiss_index_that_round_trips(tmp_path):
    index, bank, queries, _ = _distill("OPQ4,PQ4")
    faiss = index.faiss
    path = tmp_path / "index.faiss"
    index.save(path)
    loaded = faiss.read_index(str(path))
    assert type(faiss.downcast_index(loaded)).__name__ == "IndexPreTransform"
    expected = index.search(queries[:20], 10)
    got = loaded.search(queries[:20], 10)
    np.testing.assert_array_equal(got[1], expected[1])
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-5)


def test_no_improvement_leaves_the_index_unchanged():
    bank, queries = _data()
    index = QuantizedIndex(bank.shape[1], "PQ4")
    index.build(bank)
    codes_before = index.reconstruct_all()
    # a huge learning rate only makes things worse: the start (round 0) is kept
    result = distill_quantizer(index, bank, queries, top_k=20, num_random=20, rounds=1, epochs=1, learning_rate=10.0)
    assert result.best_round == 0 and result.kl_after == result.kl_before
    np.testing.assert_allclose(index.reconstruct_all(), codes_before, atol=1e-6)


def test_unsupported_indexes_and_settings_are_refused():
    bank, queries = _data(docs=600)
    ivf = QuantizedIndex(bank.shape[1], "IVF4,PQ4")
    ivf.build(bank)
    with pytest.raises(ConfigError, match="OPQ<M>,PQ<M>"):
        distill_quantizer(ivf, bank, queries)
    flat = QuantizedIndex(bank.shape[1], "PQ4")
    flat.build(bank)
    with pytest.raises(ConfigError, match="temperature"):
        distill_quantizer(flat, bank, queries, temperature=0)
    with pytest.raises(ConfigError, match="no queries"):
        distill_quantizer(flat, bank, queries[:0])
    with pytest.raises(ConfigError, match="distill_queries"):
        QRetTrainingArguments("out", distill_queries="dev")


def test_pseudo_queries_are_titles_else_first_sentences():
    corpus = {
        "a": {"title": "Vitamin D and bones", "text": "Long text."},
        "b": {"title": "", "text": "Sleep helps memory. It also does more."},
        "c": {"title": "", "text": ""},
    }
    assert pseudo_query_texts(corpus, ["a", "b", "c"]) == ["Vitamin D and bones", "Sleep helps memory."]


def test_recipe_option_distills_the_saved_index(tiny_model_dir, two_split_dir, tmp_path):
    from hf_qret.cli import train_main

    from test_cli import recipe_argv

    out = tmp_path / "out"
    argv = recipe_argv(tiny_model_dir, two_split_dir, out, "--distill_quantizer", "true", "--distill_rounds", "1",
                       "--distill_top_k", "10", "--distill_learning_rate", "1e-3")  # fmt: skip
    results = train_main(argv)
    assert results["distill"]["kl_after"] <= results["distill"]["kl_before"]
    # the distillation queries: 40 training queries + one title per document
    assert results["distill"]["queries"] > 40
    files = load_retrieval_files(out, load_bank=True)
    index = files.index
    np.testing.assert_allclose(index.reconstruct_all(), index.quantize(files.bank.numpy()), atol=1e-5)
