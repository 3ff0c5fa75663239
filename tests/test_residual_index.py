"""Residual quantizers (``RQ``, the recipe's 16-byte index): trained, refreshed, saved and served like PQ."""

from __future__ import annotations

import numpy as np
import pytest
from _helpers import record_refresh_modes
from test_trainer import make_trainer

from hf_qret import QuantizedRetriever
from hf_qret.index.core import QuantizedIndex
from hf_qret.serving.artifact import load_retrieval_files


def test_residual_index_codes_update_in_place_like_a_full_reencode():
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((400, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = QuantizedIndex(16, "RQ4x4")
    index.build(vectors)
    assert index.bytes_per_vector == 2
    moved = vectors.copy()
    rows = np.array([3, 50, 399])
    moved[rows] = rng.standard_normal((3, 16)).astype(np.float32)
    assert index.refresh(moved, mode="incremental", rows=rows) == 3  # in place, not a fallback re-encode of 400
    # the stored codes are exactly what the codebooks make of the moved bank (what a full re-encode would store)
    np.testing.assert_allclose(index.reconstruct_all(), index.quantize(moved), atol=1e-6)


@pytest.mark.parametrize("refresh_mode", ["retrain", "incremental"])
def test_trainer_with_a_residual_index_saves_an_index_in_sync_with_its_bank(
    tiny_model, beir_dir, tmp_path, refresh_mode
):
    trainer, data = make_trainer(tiny_model, beir_dir, tmp_path, index_factory="RQ4x4", refresh_mode=refresh_mode,
                                 refresh_steps=3, bank_update="all", max_steps=4)  # fmt: skip
    trainer.train()
    trainer.save_model()
    out = trainer.args.output_dir
    files = load_retrieval_files(out, load_bank=True)
    bank = files.bank.float32_rows()[:]
    assert files.config["index_factory"] == "RQ4x4" and files.config["bytes_per_vector"] == 2
    codes = files.index.index.sa_encode(bank)  # what the saved codebooks make of the saved bank
    stored = np.stack([files.index.index.reconstruct(i) for i in range(len(bank))])
    np.testing.assert_allclose(files.index.index.sa_decode(codes), stored, atol=1e-5)
    hits = QuantizedRetriever.from_pretrained(out).search([data.queries[next(iter(data.qrels))]], k=5)[0]
    assert len(hits) == 5 and all(doc_id in data.corpus for doc_id, _ in hits)


def test_residual_index_trains_on_fewer_rows_than_dimensions():
    """FAISS trains RQ codebooks over PCA-rotated dimensions, which fails on fewer rows than dimensions (a 351-
    document corpus of 384-d embeddings): the index then trains them without PCA."""
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((24, 32)).astype(np.float32)
    index = QuantizedIndex(32, "RQ4x4")
    index.build(vectors)
    assert index.ntotal == 24 and index.bytes_per_vector == 2
    scores, rows = index.search(vectors[:3], 5)
    assert rows.shape == (3, 5) and (rows >= 0).all()


def _beam(index: QuantizedIndex) -> int:
    return int(index.faiss.downcast_index(index.index).rq.max_beam_size)


def test_rq_beam_size_is_the_residual_quantizers_beam_for_every_build_and_survives_saving(tmp_path):
    vectors = np.random.default_rng(1).standard_normal((400, 16)).astype(np.float32)
    assert _beam(QuantizedIndex(16, "RQ4x4")) == 5  # FAISS's default unless asked
    index = QuantizedIndex(16, "RQ4x4", rq_beam_size=1)
    index.build(vectors)
    index.refresh(vectors, mode="retrain")  # a rebuild keeps it
    assert _beam(index) == 1
    assert _beam(index.synced_copy(vectors, np.array([0]))) == 1
    index.save(tmp_path / "index.faiss")
    assert _beam(QuantizedIndex.load(tmp_path / "index.faiss", "RQ4x4")) == 1  # what add_documents encodes with
    QuantizedIndex(16, "PQ4", rq_beam_size=1).build(vectors)  # no residual quantizer: ignored


def test_the_trainer_builds_its_residual_index_with_the_arguments_beam(tiny_model, beir_dir, tmp_path):
    from hf_qret import QRetTrainingArguments
    from hf_qret.errors import ConfigError

    assert QRetTrainingArguments(output_dir=str(tmp_path / "d")).rq_beam_size == 1
    with pytest.raises(ConfigError, match="rq_beam_size must be at least 1"):
        QRetTrainingArguments(output_dir=str(tmp_path / "d"), rq_beam_size=0)
    trainer, _ = make_trainer(tiny_model, beir_dir, tmp_path, index_factory="RQ4x4", rq_beam_size=2, max_steps=2)
    trainer.train()
    assert _beam(trainer.index) == 2


@pytest.mark.parametrize("epoch_end", [True, False])
def test_the_last_refresh_is_made_in_the_final_refresh_mode(tiny_model, beir_dir, tmp_path, epoch_end):
    trainer, _ = make_trainer(tiny_model, beir_dir, tmp_path, index_factory="RQ4x4", refresh_mode="incremental",
                              final_refresh_mode="retrain", refresh_steps=2, refresh_on_epoch_end=epoch_end,
                              bank_update="all", max_steps=5)  # fmt: skip
    modes = record_refresh_modes(trainer)
    trainer.train()
    # steps 2 and 4 follow the moved rows in place; the last one (train end, or the last epoch's end) retrains
    assert modes == ["incremental", "incremental", "retrain"]
    assert trainer.index_record()["final_refresh_mode"] == "retrain"
    files_bank = trainer.bank.float32_rows()[:]
    np.testing.assert_allclose(trainer.index.reconstruct_all(), trainer.index.quantize(files_bank), atol=1e-5)


def test_the_final_refresh_mode_runs_when_refresh_steps_divides_the_run(tiny_model, beir_dir, tmp_path):
    # refresh_steps=2, max_steps=4: the step-4 refresh is the run's last one (nothing is stale at epoch or train end)
    trainer, _ = make_trainer(tiny_model, beir_dir, tmp_path, index_factory="RQ4x4", refresh_mode="incremental",
                              final_refresh_mode="retrain", refresh_steps=2, bank_update="all", max_steps=4)  # fmt: skip
    modes = record_refresh_modes(trainer)
    trainer.train()
    assert modes == ["incremental", "retrain"]
    trainer.save_model()
    state = load_retrieval_files(trainer.args.output_dir).config["index_state"]
    assert state["last_refresh_step"] == 4 and state["last_refresh_mode"] == "retrain"  # what actually ran
    assert state["final_refresh_mode"] == "retrain"


def test_train_end_distils_the_flat_ranking_into_an_8_bit_residual_index(tiny_model, beir_dir, tmp_path):
    """distill_codebooks: the codebooks (not the codes) move at train end, the listwise KL to the flat ranking falls,
    the record says what ran, and the saved artifact serves the distilled codebooks."""
    trainer, data = make_trainer(tiny_model, beir_dir, tmp_path, index_factory="RQ2x8", max_steps=2,
                                 distill_codebooks=3, distill_doc_queries=100)  # fmt: skip
    trainer.ensure_index()
    books = trainer.index.faiss.vector_to_array(trainer.index.faiss.downcast_index(trainer.index.index).rq.codebooks)
    trainer.train()
    record = trainer.index_record()["codebook_distillation"]
    assert isinstance(record, dict) and record["epochs"] == 3 and record["kl_last"] < record["kl_first"]
    assert record["queries"] == len(set(data.queries[q] for q in data.qrels)) + 100
    index = trainer.index.faiss.downcast_index(trainer.index.index)
    codes_before = index.sa_encode(trainer.bank.float32_rows()[:])  # what a plain encode of the bank stores
    assert not np.allclose(trainer.index.faiss.vector_to_array(index.rq.codebooks), books)
    trainer.save_model()
    files = load_retrieval_files(trainer.args.output_dir)
    assert files.config["index_state"]["codebook_distillation"] == record
    saved = files.index.faiss.downcast_index(files.index.index)
    np.testing.assert_array_equal(
        files.index.faiss.vector_to_array(saved.rq.codebooks), files.index.faiss.vector_to_array(index.rq.codebooks)
    )
    assert codes_before.shape == (len(trainer.bank), 2)


def test_distillation_leaves_other_indexes_alone_and_can_be_switched_off(tiny_model, beir_dir, tmp_path):
    trainer, _ = make_trainer(tiny_model, beir_dir, tmp_path / "pq", index_factory="PQ4", max_steps=1)
    trainer.train()
    assert "not an additive quantizer" in trainer.index_record()["codebook_distillation"]
    trainer, _ = make_trainer(tiny_model, beir_dir, tmp_path / "off", index_factory="RQ2x8", max_steps=1,
                              distill_codebooks=0)  # fmt: skip
    trainer.train()
    assert trainer.index_record()["codebook_distillation"].startswith("off")


def test_distillation_default_covers_every_row_of_an_auto_rq_corpus():
    """``distill_doc_queries``'s default uses every bank row of any corpus ``index_factory auto`` serves from RQ16x8
    (InsuranceQA's 27,413 rows: 16 bytes 0.401 -> 0.405 over the 10,000-row sample, docs/experiments.md)."""
    from hf_qret.config import QRetTrainingArguments
    from hf_qret.index.auto import AUTO_SWITCH_ROWS

    args = QRetTrainingArguments("out", report_to="none", use_cpu=True)
    assert args.distill_doc_queries >= AUTO_SWITCH_ROWS
