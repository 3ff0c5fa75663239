"""Reliability: atomic checkpoints that resume exactly, NaN stops, and clear errors for bad banks and indexes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_cli import recipe_argv
from test_trainer import make_trainer

from hf_qret.cli import evaluate_main, main, train_main
from hf_qret.errors import ArtifactError, TrainingDivergedError


@pytest.fixture()
def data_dir(two_split_dir) -> Path:
    return two_split_dir


def test_checkpoints_hold_everything_and_no_staging_is_left(tiny_model, beir_dir, tmp_path):
    trainer, _ = make_trainer(tiny_model, beir_dir, tmp_path, save_strategy="steps", save_steps=3, refresh_steps=2)
    trainer.train()
    out = Path(trainer.args.output_dir)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-3", "checkpoint-6"]
    for name in (
        "bank.safetensors",
        "bank_optimizer.safetensors",
        "index.faiss",
        "doc_ids.json",
        "qret_config.json",
        "optimizer.pt",
        "scheduler.pt",
        "trainer_state.json",
        "model.safetensors",
    ):
        assert (out / "checkpoint-3" / name).is_file(), name
    assert not any(p.name.startswith("_staging") for p in out.iterdir())


def test_recipe_resume_continues_as_if_nothing_happened(tiny_model_dir, data_dir, tmp_path):
    # (--keep_untrained_if_better false: the tiny random model's dev score is noise, and this run must train)
    unbroken = train_main(
        recipe_argv(
            tiny_model_dir,
            data_dir,
            tmp_path / "a",
            "--max_steps",
            "8",
            "--refresh_steps",
            "3",
            "--save_strategy",
            "steps",
            "--save_steps",
            "4",
            "--keep_untrained_if_better",
            "false",
        )
    )
    checkpoint = tmp_path / "a" / "checkpoint-4"
    assert (checkpoint / "bank.safetensors").is_file()
    resumed = train_main(
        recipe_argv(
            tiny_model_dir,
            data_dir,
            tmp_path / "b",
            "--max_steps",
            "8",
            "--refresh_steps",
            "3",
            "--resume_from_checkpoint",
            str(checkpoint),
            "--keep_untrained_if_better",
            "false",
        )
    )
    for key, value in unbroken["trained"].items():
        assert resumed["trained"][key] == pytest.approx(value, abs=1e-4), key
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "a" / "bank.safetensors"))["embeddings"]
    b = load_file(str(tmp_path / "b" / "bank.safetensors"))["embeddings"]
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tiny_model, beir_dir, tmp_path):
    trainer, _ = make_trainer(tiny_model, beir_dir, tmp_path, save_strategy="steps", save_steps=2, max_steps=6)
    forward = trainer.loss.forward

    def poisoned(query_embeddings, mined):
        loss, stats = forward(query_embeddings, mined)
        third_step = trainer.state.global_step == 2  # two steps done
        return (loss * float("nan"), stats) if third_step else (loss, stats)

    trainer.loss.forward = poisoned
    with pytest.raises(TrainingDivergedError, match=r"loss became nan at step 3 .*checkpoint-2"):
        trainer.train()
    from safetensors.torch import load_file

    # the checkpoint's rows to resume from (its bank.safetensors serves them through the pending document adapter)
    saved = load_file(str(Path(trainer.args.output_dir) / "checkpoint-2" / "bank_before_adapter.safetensors"))["rows"]
    # the bad step changed nothing: the live bank is still the one of the last good step
    torch.testing.assert_close(trainer.bank.weight.detach(), saved)
    assert not (Path(trainer.args.output_dir) / "index.faiss").exists()


def test_bank_file_with_wrong_rows_or_dimension_is_refused(tiny_model_dir, data_dir, tmp_path, capsys):
    wrong_rows = tmp_path / "rows.npy"
    np.save(wrong_rows, np.zeros((7, 32), dtype=np.float32))
    with pytest.raises(ArtifactError, match="7 rows but 300 document ids"):
        train_main(recipe_argv(tiny_model_dir, data_dir, tmp_path / "o1", "--bank_init_file", str(wrong_rows)))
    wrong_dim = tmp_path / "dim.npy"
    np.save(wrong_dim, np.zeros((300, 16), dtype=np.float32))
    assert (
        main(["train", *recipe_argv(tiny_model_dir, data_dir, tmp_path / "o2", "--bank_init_file", str(wrong_dim))])
        == 2
    )
    assert "the bank has dimension 16" in capsys.readouterr().err
    assert not (tmp_path / "o2" / "index.faiss").exists()


def test_bank_init_file_is_created_then_reused(tiny_model_dir, data_dir, tmp_path):
    cache = tmp_path / "cache" / "bank.npy"
    train_main(
        recipe_argv(tiny_model_dir, data_dir, tmp_path / "o1", "--max_steps", "1", "--bank_init_file", str(cache))
    )
    first = np.load(cache, allow_pickle=False)
    assert first.shape == (300, 32)
    train_main(
        recipe_argv(tiny_model_dir, data_dir, tmp_path / "o2", "--max_steps", "1", "--bank_init_file", str(cache))
    )
    np.testing.assert_array_equal(np.load(cache, allow_pickle=False), first)


def test_num_negatives_larger_than_corpus_is_clamped_with_a_warning(tiny_model_dir, data_dir, tmp_path, caplog):
    import logging

    with caplog.at_level(logging.WARNING):
        train_main(recipe_argv(tiny_model_dir, data_dir, tmp_path / "o", "--max_steps", "1", "--num_negatives", "5000"))
    assert "clamping it to the corpus size" in caplog.text
    config = json.loads((tmp_path / "o" / "qret_config.json").read_text())
    assert config["num_negatives"] == 300


@pytest.mark.parametrize("damage", ["truncate", "garbage", "doc_ids"])
def test_damaged_artifact_is_a_clear_error(tiny_model_dir, data_dir, tmp_path, capsys, damage):
    out = tmp_path / "o"
    train_main(recipe_argv(tiny_model_dir, data_dir, out, "--max_steps", "1"))
    index_path = out / "index.faiss"
    if damage == "truncate":
        index_path.write_bytes(index_path.read_bytes()[: index_path.stat().st_size // 2])
        expected = "corrupt or truncated"
    elif damage == "garbage":
        index_path.write_bytes(b"not a faiss index at all")
        expected = "corrupt or truncated"
    else:
        (out / "doc_ids.json").write_text(json.dumps(["d0", "d1"]))
        expected = "the index holds 300 vectors but the doc-id map lists 2"
    assert main(["evaluate", str(out), "--data", str(data_dir), "--split", "dev"]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    with pytest.raises(ArtifactError):
        evaluate_main([str(out), "--data", str(data_dir), "--split", "dev"])


def test_fp16_loss_scaling_is_refused_naming_bf16(tmp_path, monkeypatch):
    from test_trainer import make_args

    from hf_qret.errors import ConfigError

    # The bank's row gradients are never unscaled and its step would run on a skipped (overflowed) encoder step.
    with pytest.raises(ConfigError, match=r"fp16 mixed precision \(--fp16\) is not supported.*Use bf16=True"):
        make_args(tmp_path, fp16=True)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # accelerate launch --mixed_precision fp16
    with pytest.raises(ConfigError, match=r"accelerate mixed_precision fp16.*bf16"):
        make_args(tmp_path)
    assert make_args(tmp_path, bf16=True).mixed_precision == "bf16"  # bf16 keeps working (tests/test_dropin.py)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    assert make_args(tmp_path, bank_dtype="fp16").bank_dtype == "fp16"  # the bank's storage dtype is another thing
