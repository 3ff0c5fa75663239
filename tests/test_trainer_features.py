"""Standard Trainer features on QRetTrainer give the right encoder, bank and index (issue: drop-in reliability)."""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from _helpers import FakeTrainerHubApi
from test_trainer import make_args, record_candidates
from transformers import TrainerCallback

from hf_qret import QRetTrainer, RetrievalEvaluator, TargetBank, build_pairs_dataset, load_beir
from hf_qret.serving.artifact import load_retrieval_files
from hf_qret.serving.encoder import encode_texts


def _trainer(model, folder: Path, tmp_path: Path, bank: TargetBank | None = None, **overrides) -> QRetTrainer:
    data = load_beir(folder, split="train")
    if bank is None:
        bank = TargetBank.from_encoder(partial(encode_texts, model), data.doc_texts(), data.doc_ids)
    evaluator = None
    if overrides.pop("with_evaluator", True):
        dev = load_beir(folder, split="dev")
        evaluator = RetrievalEvaluator(dev.queries, dev.qrels)
    kwargs = {k: overrides.pop(k) for k in ("eval_dataset", "optimizers") if k in overrides}
    return QRetTrainer(
        model, make_args(tmp_path, **overrides), train_dataset=build_pairs_dataset(data), bank=bank,
        evaluator=evaluator, **kwargs,
    )  # fmt: skip


def test_load_best_model_at_end_restores_encoder_bank_and_index(tiny_model_dir, two_split_dir, tmp_path):
    """A run made to degrade ends on its best checkpoint: evaluate() and the saved artifact equal best_metric."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(tiny_model_dir, device="cpu")
    trainer = _trainer(
        model, two_split_dir, tmp_path, max_steps=12, learning_rate=3e-2, bank_learning_rate=0.5,
        eval_strategy="steps", eval_steps=3, save_strategy="steps", save_steps=3, load_best_model_at_end=True,
        metric_for_best_model="eval_quantized_ndcg@10", refresh_steps=5,
        lr_scheduler_type="linear",  # the schedule this degrading run was designed with (the default is constant)
        bank_optimizer="adam",  # and the bank optimizer: row-wise Adam at 0.5 moves every row far (the default is SGD)
        keep_untrained_if_better=False,  # the checkpoints' own selection (tests/test_safety_net.py: with step 0)
    )  # fmt: skip
    trainer.train()
    logged = [e["eval_quantized_ndcg@10"] for e in trainer.state.log_history if "eval_quantized_ndcg@10" in e]
    assert len(logged) == 4 and trainer.state.best_metric == max(logged)
    assert trainer.state.best_global_step != 12, "the run was meant to degrade: its best step is not the last"
    assert trainer.evaluate()["eval_quantized_ndcg@10"] == pytest.approx(trainer.state.best_metric, abs=1e-12)
    best = Path(trainer.state.best_model_checkpoint)
    torch.testing.assert_close(trainer.bank.weight, TargetBank.from_file(best / "bank.safetensors", None).weight)

    out = tmp_path / "final"
    trainer.save_model(str(out))
    files = load_retrieval_files(out, load_bank=True)
    reloaded = SentenceTransformer(str(out), device="cpu")
    scores = trainer.evaluator(reloaded, files.bank, files.index)
    assert scores["quantized_ndcg@10"] == pytest.approx(trainer.state.best_metric, abs=1e-12)
    # the record is the best checkpoint's, the model shipped (not the last step's)
    assert files.config["global_step"] == trainer.state.best_global_step
    assert files.config["index_state"] == json.loads((best / "qret_config.json").read_text())["index_state"]


def test_evaluation_and_saving_use_an_index_in_sync_with_the_bank(tiny_model, two_split_dir, tmp_path):
    """Between refreshes the run mines from a stale index, but what is evaluated or saved encodes the bank of that
    step, and evaluating or saving does not change what the run mines next."""
    trainer = _trainer(tiny_model, two_split_dir, tmp_path, max_steps=3, refresh_on_epoch_end=False)
    trainer.train()  # no step refresh: the train-end refresh re-encodes
    trainer.refresh_callback.refresh(3)
    with torch.no_grad():
        trainer.bank.weight[:5] = -trainer.bank.weight[:5]  # rows move after the last refresh
        trainer.bank.mark_changed(torch.arange(5))
        trainer.bank.version += 1
    before = trainer.index.reconstruct_all().copy()

    metrics = trainer.evaluate()
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    saved = load_retrieval_files(out, load_bank=True)
    expected = trainer.index.quantize(trainer.bank.numpy())
    np.testing.assert_allclose(saved.index.reconstruct_all(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(trainer.index.reconstruct_all(), before)  # the mining index is untouched
    assert trainer.bank.num_changed == 5  # the next refresh still sees the moved rows
    config = json.loads((out / "qret_config.json").read_text())
    assert config["index_state"]["step"] == 3 and config["index_state"]["rows_reencoded_since_refresh"] == 5
    assert metrics["eval_quantized_ndcg@10"] == pytest.approx(
        trainer.evaluator(trainer.model, saved.bank, saved.index)["quantized_ndcg@10"], abs=1e-12
    )


def test_checkpoint_index_agrees_with_its_bank_and_resume_stays_exact(tiny_model_dir, two_split_dir, tmp_path):
    from sentence_transformers import SentenceTransformer

    def run(output, resume=None, **overrides):
        model = SentenceTransformer(tiny_model_dir, device="cpu")
        trainer = _trainer(model, two_split_dir, output, max_steps=8, refresh_steps=3, with_evaluator=False,
                           refresh_on_epoch_end=False, **overrides)  # fmt: skip
        seen = record_candidates(trainer)
        trainer.train(resume_from_checkpoint=resume)
        return trainer, seen

    unbroken, seen_unbroken = run(tmp_path / "a")
    first, _ = run(tmp_path / "b", save_strategy="steps", save_steps=4)
    checkpoint = tmp_path / "b" / "out" / "checkpoint-4"  # step 4: one step after the refresh at step 3
    files = load_retrieval_files(checkpoint, load_bank=True)
    np.testing.assert_allclose(
        files.index.reconstruct_all(), files.index.quantize(files.bank.numpy()), rtol=1e-5, atol=1e-6
    )
    assert (checkpoint / "mining_index.faiss").is_file()
    resumed, seen_resumed = run(tmp_path / "c", resume=str(checkpoint))
    assert len(seen_resumed) == 4
    for after, expected in zip(seen_resumed, seen_unbroken[4:]):
        assert torch.equal(after, expected)
    torch.testing.assert_close(resumed.bank.weight, unbroken.bank.weight, rtol=1e-4, atol=1e-5)


def test_hub_checkpoint_push_reads_the_final_checkpoint_folder(tiny_model, two_split_dir, tmp_path):
    api = FakeTrainerHubApi()
    with api.patch():
        trainer = _trainer(
            tiny_model, two_split_dir, tmp_path, max_steps=2, save_strategy="steps", save_steps=2, push_to_hub=True,
            hub_model_id="user/model", hub_strategy="checkpoint", with_evaluator=False,
            hub_push_training_state=True,  # the resume state goes to the Hub only when asked
        )  # fmt: skip
        trainer.train()
    checkpoint_pushes = [u for u in api.uploads if u["path_in_repo"] == "last-checkpoint"]
    assert checkpoint_pushes, api.uploads
    for upload in checkpoint_pushes:
        folder, files = upload["folder_path"], upload["files"]
        assert os.path.basename(folder) == "checkpoint-2" and "_staging" not in folder
        assert files is not None and "index.faiss" in files and "bank.safetensors" in files
        assert os.path.isdir(folder)


def test_hub_checkpoint_strategy_keeps_the_resume_state_local_unless_asked(tiny_model, two_split_dir, tmp_path, caplog):
    from huggingface_hub.utils import filter_repo_objects

    api = FakeTrainerHubApi()
    with api.patch():
        trainer = _trainer(
            tiny_model, two_split_dir, tmp_path, max_steps=2, save_strategy="steps", save_steps=1, push_to_hub=True,
            hub_model_id="user/model", hub_strategy="checkpoint", with_evaluator=False,
        )  # fmt: skip
        trainer.train()
    # what each push sends: the folder's files at the push, less its ignore patterns
    uploads = [
        (u["path_in_repo"], set(filter_repo_objects(u["files"], ignore_patterns=u["ignore_patterns"])))
        for u in api.uploads
    ]
    assert [path for path, _ in uploads] == [None, None]  # the artifact at steps 1 and 2, no last-checkpoint/
    for _, files in uploads:
        assert "index.faiss" in files
        assert not [f for f in files if f.endswith((".pt", ".pth", ".bin")) or f.startswith("checkpoint-")], files
    notes = [r.getMessage() for r in caplog.records if "hub_push_training_state" in r.getMessage()]
    assert len(notes) == 1 and "stays local" in notes[0]


def test_evaluate_with_eval_dataset_and_evaluator_logs_once(tiny_model, two_split_dir, tmp_path):
    from transformers import TrainerCallback

    class Count(TrainerCallback):
        calls: list = []

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            self.calls.append(dict(metrics))

    dev = build_pairs_dataset(load_beir(two_split_dir, split="dev"))
    trainer = _trainer(tiny_model, two_split_dir, tmp_path, max_steps=1, eval_dataset=dev)
    trainer.add_callback(Count())
    metrics = trainer.evaluate()
    assert len(Count.calls) == 1 and "eval_loss" in Count.calls[0] and "eval_quantized_ndcg@10" in Count.calls[0]
    logged = [e for e in trainer.state.log_history if "eval_quantized_ndcg@10" in e or "eval_loss" in e]
    assert len(logged) == 1 and "eval_loss" in metrics and "eval_flat_ndcg@10" in metrics


class _RecordRates(TrainerCallback):
    """After the bank's step (its callback runs first): (bank lr used, encoder lr used) per optimizer step."""

    def __init__(self, trainer, rates, scheduler=None):
        self.trainer, self.rates, self.scheduler = trainer, rates, scheduler

    def on_optimizer_step(self, args, state, control, **kwargs):
        scheduler = self.scheduler or self.trainer.lr_scheduler
        self.rates.append((self.trainer.bank_optimizer.lr, scheduler.get_last_lr()[0]))


def test_bank_learning_rate_follows_a_user_scheduler(tiny_model, two_split_dir, tmp_path):
    """optimizers=(optimizer, scheduler) with another base learning rate: the bank follows the scheduler's ratio."""
    optimizer = torch.optim.AdamW(tiny_model.parameters(), lr=5e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    trainer = _trainer(
        tiny_model, two_split_dir, tmp_path, max_steps=4, learning_rate=1e-3, bank_learning_rate=1e-2,
        optimizers=(optimizer, scheduler), with_evaluator=False,
    )  # fmt: skip
    rates = []
    trainer.add_callback(_RecordRates(trainer, rates, scheduler))
    trainer.train()
    assert len(rates) == 4
    for bank_lr, encoder_lr in rates:
        assert bank_lr == pytest.approx(1e-2 * encoder_lr / 5e-4)
    assert rates[-1][0] == pytest.approx(1e-2 / 4)


def test_bank_learning_rate_follows_warmup_and_decay(tiny_model, two_split_dir, tmp_path):
    trainer = _trainer(
        tiny_model, two_split_dir, tmp_path, max_steps=6, lr_scheduler_type="linear", warmup_steps=2,
        bank_learning_rate=1e-2, with_evaluator=False,
    )  # fmt: skip
    rates = []
    trainer.add_callback(_RecordRates(trainer, rates))
    trainer.train()
    expected = [0.0, 0.5, 1.0, 0.75, 0.5, 0.25]
    assert [bank for bank, _ in rates] == pytest.approx([1e-2 * r for r in expected])


def test_resume_takes_the_kept_norms_from_the_checkpoint(tiny_model_dir, two_split_dir, tmp_path):
    """Drift control (the norms moved rows keep) comes from the checkpoint, not from the bank a resuming script passes."""
    from sentence_transformers import SentenceTransformer

    options = dict(max_steps=6, bank_update="all", bank_keep_norm=True, with_evaluator=False)
    model = SentenceTransformer(tiny_model_dir, device="cpu")
    unbroken = _trainer(model, two_split_dir, tmp_path / "a", **options)
    initial = unbroken.bank.weight.detach().clone()
    unbroken.train()
    first = _trainer(SentenceTransformer(tiny_model_dir, device="cpu"), two_split_dir, tmp_path / "b",
                     save_strategy="steps", save_steps=3, **options)  # fmt: skip
    first.train()
    checkpoint = tmp_path / "b" / "out" / "checkpoint-3"
    # The resuming script passes a bank of other norms (the checkpoint's trained rows, doubled).
    data = load_beir(two_split_dir, split="train")
    trained = TargetBank.from_file(checkpoint / "bank.safetensors", data.doc_ids).weight.detach()
    resumed = _trainer(SentenceTransformer(tiny_model_dir, device="cpu"), two_split_dir, tmp_path / "c",
                       bank=TargetBank(2 * trained, data.doc_ids), **options)  # fmt: skip
    resumed.train(resume_from_checkpoint=str(checkpoint))
    torch.testing.assert_close(resumed.bank_optimizer.keep_norms, initial.norm(dim=1))
    torch.testing.assert_close(resumed.bank.weight, unbroken.bank.weight, rtol=1e-4, atol=1e-5)


def test_resume_builds_no_index_it_would_throw_away(tiny_model_dir, two_split_dir, tmp_path):
    from sentence_transformers import SentenceTransformer

    from hf_qret.index.core import QuantizedIndex

    first = _trainer(SentenceTransformer(tiny_model_dir, device="cpu"), two_split_dir, tmp_path / "a", max_steps=2,
                     save_strategy="steps", save_steps=2, with_evaluator=False)  # fmt: skip
    first.train()
    # (a re-encode at train end too: a final retrain would build the index to save, on purpose)
    resumed = _trainer(SentenceTransformer(tiny_model_dir, device="cpu"), two_split_dir, tmp_path / "b", max_steps=3,
                       refresh_mode="reencode", final_refresh_mode="reencode", with_evaluator=False)  # fmt: skip
    with mock.patch.object(QuantizedIndex, "build", side_effect=AssertionError("built a full index")) as build:
        resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "out" / "checkpoint-2"))
    assert build.call_count == 0


def test_resume_restores_the_mining_shortlist_exactly(tiny_model_dir, two_split_dir, tmp_path):
    from sentence_transformers import SentenceTransformer

    def run(output, resume=None, **overrides):
        trainer = _trainer(SentenceTransformer(tiny_model_dir, device="cpu"), two_split_dir, output, max_steps=6,
                           index_factory="PQ4", mining_nlist=8, mining_nprobe=2, num_negatives=4,
                           refresh_mode="incremental", refresh_steps=2, with_evaluator=False, **overrides)  # fmt: skip
        seen = record_candidates(trainer)
        trainer.train(resume_from_checkpoint=resume)
        return seen

    unbroken = run(tmp_path / "a")
    run(tmp_path / "b", save_strategy="steps", save_steps=3)
    resumed = run(tmp_path / "c", resume=str(tmp_path / "b" / "out" / "checkpoint-3"))
    assert len(resumed) == 3
    for after, expected in zip(resumed, unbroken[3:]):
        assert torch.equal(after, expected)


def test_resume_at_an_epoch_end_refreshes_the_index_as_the_unbroken_run(tiny_model_dir, two_split_dir, tmp_path):
    """A checkpoint written at an epoch's last step precedes that epoch's end-of-epoch refresh (the Trainer saves at
    the step, then ends the epoch); the resumed run, which starts at the next epoch, makes that refresh first."""
    from sentence_transformers import SentenceTransformer

    def run(output, resume=None, **overrides):
        trainer = _trainer(SentenceTransformer(tiny_model_dir, device="cpu"), two_split_dir, output, max_steps=-1,
                           num_train_epochs=2, refresh_steps=0, refresh_on_epoch_end=True, with_evaluator=False,
                           **overrides)  # fmt: skip
        seen = record_candidates(trainer)
        trainer.train(resume_from_checkpoint=resume)
        return trainer, seen

    unbroken, seen_unbroken = run(tmp_path / "a")
    per_epoch = len(seen_unbroken) // 2
    assert per_epoch > 1 and unbroken.refresh_callback.refreshes == 2  # at the end of each epoch
    run(tmp_path / "b", save_strategy="steps", save_steps=per_epoch)
    checkpoint = tmp_path / "b" / "out" / f"checkpoint-{per_epoch}"  # the first epoch's last step
    saved = json.loads((checkpoint / "index_refresh_state.json").read_text())
    assert saved["epoch_end_pending"] is True and saved["stale"] is True and saved["refreshes"] == 0
    resumed, seen_resumed = run(tmp_path / "c", resume=str(checkpoint))
    assert len(seen_resumed) == per_epoch
    for step, (after, expected) in enumerate(zip(seen_resumed, seen_unbroken[per_epoch:]), start=per_epoch + 1):
        assert torch.equal(after, expected), f"step {step} mined other candidates than the unbroken run"
    torch.testing.assert_close(resumed.bank.weight, unbroken.bank.weight, rtol=1e-4, atol=1e-5)
    assert resumed.refresh_callback.refreshes == unbroken.refresh_callback.refreshes
    assert resumed.index_record() == unbroken.index_record()
