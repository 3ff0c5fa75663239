"""The document adapter (``doc_adapter_rank``): every bank row moves, baked into the bank at each refresh."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_trainer import make_args, make_trainer

from hf_qret.bank.core import TargetBank
from hf_qret.errors import ConfigError
from hf_qret.index.mining import IndexMiner
from hf_qret.training.adapter import AdapterOptimizer, DocumentAdapter
from hf_qret.training.loss import MinedNegativesLoss


def unit_rows(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_adapter_moves_rows_no_candidate_ever_reached():
    """Trained on candidates 0-3 only, the shared adapter moves rows 4-7 too, and keeps every row's norm."""
    bank = TargetBank(unit_rows(8, 16), [f"d{i}" for i in range(8)])
    adapter = DocumentAdapter(16, rank=8)
    optimizer = AdapterOptimizer(adapter, lr=1e-2)
    loss_fn = MinedNegativesLoss(bank, train_bank=False, adapter=adapter, adapter_optimizer=optimizer)
    queries = unit_rows(4, 16, seed=1)
    for _ in range(5):
        mined = IndexMiner.candidates_from(np.array([[1, 2], [0, 3], [0, 1], [2, 3]]), torch.tensor([0, 1, 2, 3]))
        loss, _ = loss_fn(queries, mined)
        loss.backward()
        loss_fn.after_optimizer_step(1.0)
    before = bank.weight.detach().clone()
    assert loss_fn.adapter_pending()
    assert loss_fn.bake_adapter() == 8
    after = bank.weight.detach()
    untouched = slice(4, 8)
    assert (after[untouched] - before[untouched]).norm(dim=1).min() > 1e-4  # rows no candidate reached moved
    torch.testing.assert_close(after.norm(dim=1), before.norm(dim=1))
    assert not loss_fn.adapter_pending() and bank.num_changed == 8 and bank.version == 1


def test_bad_adapter_rate_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="doc_adapter_learning_rate"):
        make_args(tmp_path, doc_adapter_rank=8, doc_adapter_learning_rate=0.0)


def test_trainer_bakes_adapter_before_final_refresh(tiny_model, beir_dir, tmp_path):
    """The index that is evaluated and saved holds the adapted rows: after training the adapter is baked (identity
    again), every row of the bank moved (not only training positives'), and the index was rebuilt over them."""
    trainer, data = make_trainer(tiny_model, beir_dir, tmp_path, doc_adapter_rank=8, doc_adapter_learning_rate=1e-2)
    assert trainer.loss.adapter is not None
    initial = trainer.bank.weight.detach().clone()
    trainer.train()
    assert trainer.loss.adapter.is_identity()
    moved = (trainer.bank.weight.detach() - initial).norm(dim=1) > 1e-6
    never_positive = ~trainer.trainable_rows
    assert bool(moved[never_positive].all())
    # the bake bumped the bank's version before the train-end refresh read it: the index serves the adapted rows
    assert trainer.refresh_callback.bank_version_at_refresh == trainer.bank.version
    assert trainer.refresh_callback.last_refresh_step == trainer.state.global_step
    assert trainer.served_index() is trainer.index


def test_adapter_resumes_exactly(tiny_model_dir, beir_dir, tmp_path):
    """Its parameters and AdamW moments travel with checkpoints: a resumed run ends where the unbroken one does."""
    from sentence_transformers import SentenceTransformer

    def run(output, resume=None, **overrides):
        model = SentenceTransformer(tiny_model_dir, device="cpu")
        options = {"max_steps": 8, "doc_adapter_rank": 8, "doc_adapter_learning_rate": 1e-2, **overrides}
        trainer, _ = make_trainer(model, beir_dir, output, **options)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    unbroken = run(tmp_path / "a")
    run(tmp_path / "b", save_strategy="steps", save_steps=4)
    resumed = run(tmp_path / "c", resume=str(tmp_path / "b" / "out" / "checkpoint-4"))
    torch.testing.assert_close(resumed.bank.weight, unbroken.bank.weight, rtol=1e-4, atol=1e-5)
    assert not torch.equal(unbroken.bank.weight, run(tmp_path / "d", doc_adapter_rank=0).bank.weight)


def test_frozen_bank_gets_no_adapter(tiny_model, beir_dir, tmp_path):
    """``bank_learning_rate`` 0 freezes the documents: no adapter moves them either."""
    trainer, _ = make_trainer(tiny_model, beir_dir, tmp_path, bank_learning_rate=0.0)
    assert trainer.loss.adapter is None
    assert make_trainer(tiny_model, beir_dir, tmp_path / "b")[0].loss.adapter is not None  # the default has one


def test_artifact_ships_the_layers_and_new_documents_go_through_them(tiny_model_dir, beir_dir, tmp_path):
    """The saved bank is the pretrained embeddings through the baked layers, and a document added to the artifact
    gets the row a bank document with the same text has (without the layers it would get the pretrained one)."""
    from sentence_transformers import SentenceTransformer

    from hf_qret.serving.artifact import save_document_encoder
    from hf_qret.serving.document_adapter import adapt_rows, load_document_adapters
    from hf_qret.serving.retriever import QuantizedRetriever

    model = SentenceTransformer(tiny_model_dir, device="cpu")
    trainer, data = make_trainer(model, beir_dir, tmp_path, doc_adapter_rank=8, doc_adapter_learning_rate=1e-2)
    out = tmp_path / "out"
    save_document_encoder(out, model)
    initial = trainer.bank.local_numpy().copy()  # local_numpy may share the live rows
    trainer.train()
    trainer.save_model()
    layers = load_document_adapters(out)
    assert len(layers) == 1  # one bake: the train-end refresh
    never_positive = (~trainer.trainable_rows).nonzero().squeeze(1).numpy()
    retriever = QuantizedRetriever.from_pretrained(out, "cpu", load_bank=True)
    saved = retriever.files.bank.local_numpy()
    np.testing.assert_allclose(saved[never_positive], adapt_rows(initial[never_positive], layers), atol=1e-5)
    doc = int(never_positive[0])
    retriever.add_documents([data.doc_texts()[doc]], ["added"])
    added = retriever.files.bank.local_numpy()[-1]
    np.testing.assert_allclose(added, saved[doc], atol=1e-4)
    assert np.abs(added - initial[doc]).max() > 1e-4


def test_mid_training_checkpoint_serves_the_adapted_rows(tiny_model_dir, beir_dir, tmp_path):
    """A checkpoint written while the adapter is not yet baked is a consistent artifact (its bank holds the adapted
    rows, its layer file the pending layer), and still resumes from the rows before the adapter."""
    from sentence_transformers import SentenceTransformer

    from hf_qret.serving.artifact import load_retrieval_files
    from hf_qret.serving.document_adapter import adapt_rows, load_document_adapters
    from hf_qret.serving.manifest import RAW_BANK_NAME

    model = SentenceTransformer(tiny_model_dir, device="cpu")
    trainer, _ = make_trainer(
        model, beir_dir, tmp_path, max_steps=4, save_strategy="steps", save_steps=2, doc_adapter_rank=8,
        doc_adapter_learning_rate=1e-2,
    )  # fmt: skip
    initial = trainer.bank.local_numpy().copy()  # local_numpy may share the live rows
    trainer.train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    layers = load_document_adapters(checkpoint)
    assert len(layers) == 1 and (checkpoint / RAW_BANK_NAME).is_file()
    rows = load_retrieval_files(checkpoint, load_bank=True).bank.local_numpy()
    never_positive = (~trainer.trainable_rows).nonzero().squeeze(1).numpy()
    np.testing.assert_allclose(rows[never_positive], adapt_rows(initial[never_positive], layers), atol=1e-5)
