"""normalize_decoded: quantized candidates scored by the cosine of their decoded vectors (cosine models)."""

import json

import numpy as np
import pytest

from hf_qret.index.core import RENORM_DEPTH, QuantizedIndex


def _unit_rows(n=3000, d=32, seed=0):
    rows = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


@pytest.mark.unit
@pytest.mark.parametrize("factory", ["RQ4x8", "PQ8", "OPQ8,PQ8"])
def test_scores_are_the_cosines_of_the_decoded_vectors(factory):
    rows = _unit_rows()
    index = QuantizedIndex(32, factory, normalize_decoded=True, use_gpu=False)
    index.build(rows)
    decoded = index.reconstruct_all()
    norms = np.linalg.norm(decoded, axis=1)
    assert norms.std() > 1e-3  # the quantizer shrinks rows unevenly: the case this exists for
    queries = rows[:20]
    scores, found = index.search(queries, 10)
    cosine = queries @ decoded.T / norms
    expected = np.argsort(-cosine, axis=1, kind="stable")[:, :10]
    assert np.array_equal(found, expected)
    assert np.allclose(scores, np.take_along_axis(cosine, expected, axis=1), atol=1e-5)
    raw_scores, raw_found = QuantizedIndex.from_index(index.index, factory).search(queries, 10)
    assert not np.array_equal(raw_found, found)  # without it: the raw inner products' order
    assert np.allclose(raw_scores, np.sort(queries @ decoded.T, axis=1)[:, ::-1][:, :10], atol=1e-5)


@pytest.mark.unit
def test_an_ivf_index_and_a_synced_copy_keep_it():
    rows = _unit_rows(4000)
    index = QuantizedIndex(32, "IVF16,PQ8", search_params="nprobe=16", normalize_decoded=True, use_gpu=False)
    index.build(rows)
    scores, found = index.search(rows[:5], 3)
    assert found[:, 0].tolist() == [0, 1, 2, 3, 4] and np.all(scores <= 1.0 + 1e-5)
    copy = index.synced_copy(rows, np.array([0]))
    assert copy.normalize_decoded
    assert np.array_equal(copy.search(rows[:5], 3)[1], found)
    assert RENORM_DEPTH >= 50


def test_the_trainer_turns_it_on_for_cosine_models_and_the_artifact_keeps_it(tmp_path, tiny_model, beir_dir):
    from test_trainer import make_args

    from hf_qret import QRetTrainer, QuantizedRetriever, build_pairs_dataset, load_beir

    data = load_beir(beir_dir, split="train")
    for setting, expected in ((None, True), (False, False)):
        args = make_args(tmp_path / str(setting), max_steps=1, normalize_decoded=setting)
        trainer = QRetTrainer(tiny_model, args, train_dataset=build_pairs_dataset(data), corpus=data)
        assert trainer.index.normalize_decoded is expected
        trainer.train()
        trainer.save_model()
        config = json.loads((tmp_path / str(setting) / "out" / "qret_config.json").read_text())
        assert config["normalize_decoded"] is expected
        retriever = QuantizedRetriever.from_pretrained(args.output_dir, "cpu")
        assert retriever.index.normalize_decoded is expected
