"""The second stage beyond the index's bytes: rescoring the quantized top candidates with an on-disk int8/fp16 copy."""

import numpy as np
import pytest

from hf_qret.errors import ArtifactError, ConfigError
from hf_qret.index.rescore import RescoreRows, rescore_file_name, write_rescore_rows


def _rows(n=500, d=32, seed=0):
    rows = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


@pytest.mark.unit
@pytest.mark.parametrize("dtype, tolerance", [("int8", 0.01), ("float16", 1e-3)])
def test_the_copy_keeps_the_rows_within_its_precision_and_is_memory_mapped(tmp_path, dtype, tolerance):
    rows = _rows()
    path = tmp_path / rescore_file_name(dtype)
    written = write_rescore_rows((rows[s : s + 128] for s in range(0, 500, 128)), 500, 32, path, dtype)
    copy = RescoreRows(path)
    assert isinstance(copy.data, np.memmap) and len(copy) == 500
    assert written >= copy.nbytes  # plus the .npy headers
    assert copy.nbytes == 500 * 32 * (1 if dtype == "int8" else 2) + (500 * 4 if dtype == "int8" else 0)
    assert np.abs(copy.rows(np.arange(500)) - rows).max() < tolerance
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.unit
def test_rescoring_reorders_the_candidates_by_the_copy_and_pads_missing_ones(tmp_path):
    rows = _rows()
    path = tmp_path / "rescore_int8.npy"
    write_rescore_rows([rows], 500, 32, path, "int8")
    queries = rows[:3]
    candidates = np.array([[7, 0, 9, -1], [1, 5, 6, 8], [-1, -1, 2, -1]])
    scores, found = RescoreRows(path).rescore(queries, candidates, k=3)
    assert found[0, 0] == 0 and found[1, 0] == 1 and found[2, 0] == 2  # each query's own row wins
    exact = np.einsum("qd,qkd->qk", queries, rows[np.where(candidates < 0, 0, candidates)])
    exact[candidates < 0] = -np.inf
    assert np.array_equal(found, np.take_along_axis(candidates, np.argsort(-exact, axis=1)[:, :3], axis=1))
    assert found[2, 1] == -1 and scores[2, 1] == -np.inf


@pytest.mark.unit
def test_bad_inputs_say_what_to_do(tmp_path):
    with pytest.raises(ConfigError, match="int8, float16"):
        rescore_file_name("int4")
    with pytest.raises(ArtifactError, match="write_rescore_rows"):
        RescoreRows(tmp_path / "rescore_int8.npy")
    with pytest.raises(ArtifactError, match="not 10"):
        write_rescore_rows([_rows(5)], 10, 32, tmp_path / "x.npy", "float16")
    assert not (tmp_path / "x.npy").exists()


def test_the_retriever_rescores_its_top_candidates_with_the_copy(tmp_path, tiny_model, beir_dir):
    """A trained tiny artifact: rescoring the PQ top-50 with the int8 copy ranks as the float bank does within those
    candidates; without the copy in the folder, one clear error."""
    from test_trainer import make_args

    from hf_qret import QRetTrainer, QuantizedRetriever, build_pairs_dataset, load_beir

    data = load_beir(beir_dir, split="train")
    args = make_args(tmp_path, index_factory="PQ4x4", max_steps=2)
    trainer = QRetTrainer(tiny_model, args, train_dataset=build_pairs_dataset(data), corpus=data)
    trainer.train()
    trainer.save_model()
    retriever = QuantizedRetriever.from_pretrained(args.output_dir, "cpu")
    with pytest.raises(ArtifactError, match="write_rescore_rows"):
        retriever.enable_rescoring(50)
    assert retriever.write_rescore_rows("int8").name == "rescore_int8.npy"
    queries = retriever.encode_queries(list(data.queries.values())[:8])
    _, quantized_rows = retriever.search_embeddings(queries, 50)
    retriever.enable_rescoring(50)
    scores, rows = retriever.search_embeddings(queries, 5)
    bank = QuantizedRetriever.from_pretrained(args.output_dir, "cpu", load_bank=True).files.bank.float32_rows()
    for i in range(len(queries)):
        exact = bank[quantized_rows[i]] @ queries[i]
        expected = quantized_rows[i][np.argsort(-exact, kind="stable")[:5]]
        assert set(rows[i]) <= set(quantized_rows[i])
        assert np.array_equal(rows[i][:2], expected[:2])  # int8 keeps the float order at the top
        assert np.allclose(scores[i], np.sort(exact)[::-1][:5], atol=0.02)
    retriever.disable_rescoring()
    assert np.array_equal(retriever.search_embeddings(queries, 5)[1], quantized_rows[:, :5])
