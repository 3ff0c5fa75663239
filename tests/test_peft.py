"""PEFT: a LoRA query encoder trains with the bank; the adapter is saved the peft way, merged on request, and both
artifacts load for search."""

from __future__ import annotations

import ast
import json
import os
from functools import partial

import numpy as np
import pytest
import torch
from conftest import synthetic_beir, write_beir
from test_dropin import run_example
from test_trainer import make_args

from hf_qret import QRetTrainer, QuantizedRetriever, TargetBank, build_pairs_dataset, load_beir
from hf_qret.serving.encoder import encode_texts
from hf_qret.serving.peft_utils import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    adapter_base_model,
    add_adapter,
    backbone,
    has_adapter,
    merge_adapter,
)

TEXTS = ["protein gene", "virus vaccine immune", "insulin diabetes risk"]


def lora_trainer(model_dir, beir_dir, output, max_steps=4):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(model_dir, device="cpu")
    data = load_beir(beir_dir, split="train")
    bank = TargetBank.from_encoder(partial(encode_texts, model), data.doc_texts(), data.doc_ids)
    model = add_adapter(model, r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["query", "value"])
    args = make_args(output, max_steps=max_steps)
    trainer = QRetTrainer(model, args, train_dataset=build_pairs_dataset(data), bank=bank)
    return trainer, model


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    """One LoRA training run (4 steps) with the weights before and after, and its two saved artifacts."""
    tmp = tmp_path_factory.mktemp("lora")
    beir_dir = write_beir(tmp / "beir", *synthetic_beir())
    trainer, model = lora_trainer(tiny_model_dir, beir_dir, tmp)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    bank_before = trainer.bank.weight.detach().clone()
    trainer.train()
    trainer.save_model(str(tmp / "adapter"))
    trainer.save_merged_model(str(tmp / "merged"))
    return {"trainer": trainer, "model": model, "before": before, "bank_before": bank_before, "tmp": tmp,
            "beir_dir": beir_dir}  # fmt: skip


def test_lora_run_updates_the_adapter_and_the_bank_only(lora_run):
    model, before = lora_run["model"], lora_run["before"]
    trainer = lora_run["trainer"]
    after = model.state_dict()
    lora = [k for k in after if "lora_" in k]
    base = [k for k in after if "lora_" not in k]
    assert len(lora) == 8 and len(base) > 30  # A and B of query and value, 2 layers
    assert all(torch.equal(after[k], before[k]) for k in base)  # the base weights are frozen
    assert any(not torch.equal(after[k], before[k]) for k in lora if "lora_B" in k)  # B starts at 0
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == trainable and len(trainable) == 8
    assert not torch.equal(trainer.bank.weight.detach(), lora_run["bank_before"])
    assert has_adapter(model)


def test_adapter_artifact_reloads_with_identical_query_embeddings(lora_run):
    from sentence_transformers import SentenceTransformer

    folder, model = lora_run["tmp"] / "adapter", lora_run["model"]
    names = set(os.listdir(folder))
    assert {ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, "modules.json", "index.faiss", "bank.safetensors"} <= names
    assert "model.safetensors" not in names  # peft convention: the adapter only, on its base model
    assert adapter_base_model(folder) == backbone(model).peft_config["default"].base_model_name_or_path
    config = json.loads((folder / "qret_config.json").read_text())
    assert config["adapter"]["peft_type"] == "LORA" and config["adapter"]["r"] == 4 and not config["adapter"]["merged"]

    expected = encode_texts(model, TEXTS)
    reloaded = SentenceTransformer(str(folder), device="cpu")
    assert has_adapter(reloaded)  # attached, not merged
    np.testing.assert_allclose(encode_texts(reloaded, TEXTS), expected, rtol=0, atol=1e-6)

    attached = QuantizedRetriever.from_pretrained(folder, device="cpu")
    np.testing.assert_allclose(attached.encode_queries(TEXTS), expected, rtol=0, atol=1e-6)
    merged_on_load = QuantizedRetriever.from_pretrained(folder, device="cpu", merge_adapter=True)
    assert not has_adapter(merged_on_load.model)
    np.testing.assert_allclose(merged_on_load.encode_queries(TEXTS), expected, rtol=1e-5, atol=1e-6)
    assert [d for d, _ in attached.search(TEXTS, k=5)[1]] == [d for d, _ in merged_on_load.search(TEXTS, k=5)[1]]


def test_merged_artifact_is_a_plain_model(lora_run):
    from sentence_transformers import SentenceTransformer

    folder, model = lora_run["tmp"] / "merged", lora_run["model"]
    names = set(os.listdir(folder))
    assert {"model.safetensors", "config.json", "modules.json", "index.faiss"} <= names
    assert ADAPTER_CONFIG_NAME not in names and ADAPTER_WEIGHTS_NAME not in names
    assert has_adapter(model)  # the trainer's own encoder keeps its adapter
    assert json.loads((folder / "qret_config.json").read_text())["adapter"]["merged"] is True
    plain = SentenceTransformer(str(folder), device="cpu")
    assert not has_adapter(plain)
    expected = encode_texts(model, TEXTS)
    np.testing.assert_allclose(encode_texts(plain, TEXTS), expected, rtol=1e-5, atol=1e-6)
    retriever = QuantizedRetriever.from_pretrained(folder, device="cpu")
    assert retriever.index.ntotal == len(lora_run["trainer"].bank)


def test_resuming_a_lora_run_matches_the_unbroken_run(tiny_model_dir, beir_dir, tmp_path):
    def run(output, resume=None, **overrides):
        torch.manual_seed(0)  # the same LoRA initialisation in every run
        trainer, model = lora_trainer(tiny_model_dir, beir_dir, output, max_steps=4)
        for key, value in overrides.items():
            setattr(trainer.args, key, value)
        trainer.train(resume_from_checkpoint=resume)
        return trainer, model

    unbroken, unbroken_model = run(tmp_path / "a")
    run(tmp_path / "b", save_strategy="steps", save_steps=2)
    checkpoint = tmp_path / "b" / "out" / "checkpoint-2"
    assert (checkpoint / ADAPTER_WEIGHTS_NAME).is_file() and (checkpoint / "bank_optimizer.safetensors").is_file()
    resumed, resumed_model = run(tmp_path / "c", resume=str(checkpoint))
    expected = unbroken_model.state_dict()
    for key, value in resumed_model.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6, msg=key)
    torch.testing.assert_close(resumed.bank.weight, unbroken.bank.weight, rtol=1e-5, atol=1e-6)
    assert torch.equal(resumed.bank_optimizer.row_steps, unbroken.bank_optimizer.row_steps)


def test_plain_transformers_peft_model(tiny_model_dir, beir_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = add_adapter(AutoModel.from_pretrained(tiny_model_dir), r=4, lora_dropout=0.0)
    assert isinstance(model, PeftModel)
    data = load_beir(beir_dir, split="train")
    bank = TargetBank.from_encoder(partial(encode_texts, model, tokenizer=tokenizer), data.doc_texts(), data.doc_ids)
    trainer = QRetTrainer(
        model, make_args(tmp_path, max_steps=3), train_dataset=build_pairs_dataset(data), bank=bank,
        processing_class=tokenizer,
    )  # fmt: skip
    trainer.train()
    out = tmp_path / "plain"
    trainer.save_model(str(out))
    assert (out / ADAPTER_CONFIG_NAME).is_file() and (out / ADAPTER_WEIGHTS_NAME).is_file()
    expected = encode_texts(model, TEXTS, tokenizer=tokenizer)
    retriever = QuantizedRetriever.from_pretrained(out, device="cpu")
    got = retriever.encode_queries(TEXTS)
    # sentence-transformers loads a bare transformers folder with mean pooling and no Normalize module
    np.testing.assert_allclose(got / np.linalg.norm(got, axis=1, keepdims=True), expected, rtol=1e-5, atol=1e-6)
    merged = merge_adapter(model)
    assert not isinstance(merged, PeftModel) and not has_adapter(merged)
    np.testing.assert_allclose(encode_texts(merged, TEXTS, tokenizer=tokenizer), expected, rtol=1e-5, atol=1e-6)


def test_add_adapter_takes_a_config_or_options(tiny_model):
    from peft import LoraConfig

    with pytest.raises(TypeError, match="not both"):
        add_adapter(tiny_model, LoraConfig(r=2), r=4)
    model = add_adapter(tiny_model, LoraConfig(r=2, target_modules=["query"]))
    assert model is tiny_model and has_adapter(model)
    assert backbone(model).peft_config["default"].r == 2


def test_peft_example_runs(tiny_model_dir, beir_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "example"
    argv = ["--model", tiny_model_dir, "--data_dir", str(beir_dir), "--eval_split", "train", "--output_dir", str(out),
            "--max_steps", "2", "--batch_size", "8", "--index_factory", "PQ4", "--r", "4"]  # fmt: skip
    run_example("peft_lora.py", argv, monkeypatch)
    printed = capsys.readouterr().out
    assert (out / "adapter" / ADAPTER_WEIGHTS_NAME).is_file() and (out / "merged" / "model.safetensors").is_file()
    lines = {line.split(" ", 1)[0]: line for line in printed.splitlines() if line.startswith(("adapter ", "merged "))}
    assert set(lines) == {"adapter", "merged"}
    ids = [[d for d, _ in ast.literal_eval(lines[kind].split(" ", 1)[1])] for kind in ("adapter", "merged")]
    assert ids[0] == ids[1] and len(ids[0]) == 3
