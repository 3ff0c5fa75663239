"""Embeddings that are not unit-norm: the model's similarity function decides the loss's scale (20 for cosine, 1 for
dot-product models), cosine models without a Normalize module are normalised, and a plain transformers encoder
pools as chosen (mean or cls), in training and in the served retriever."""

from __future__ import annotations

import json
from functools import partial

import numpy as np
import pytest
import torch
from test_trainer import make_args

from hf_qret import QRetTrainer, QuantizedRetriever, TargetBank, build_pairs_dataset, load_beir
from hf_qret.errors import ConfigError
from hf_qret.serving.encoder import (
    configure_encoder,
    embed,
    encode_texts,
    get_pooling,
    resolve_scale,
    set_pooling,
    similarity_function,
    tokenize,
)

TEXTS = ["insulin resistance in mice", "a vaccine trial", "sleep and memory"]


def st_without_normalize(model_dir: str, similarity: str | None):
    """The tiny encoder as Transformer + mean Pooling (no Normalize), like TAS-B / Contriever / msmarco-*-dot."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    transformer = Transformer(model_dir, max_seq_length=64)
    model = SentenceTransformer(modules=[transformer, Pooling(32, "mean")], device="cpu")
    if similarity is not None:
        model.similarity_fn_name = similarity
    return model


def trainer_for(model, beir_dir, tmp_path, tokenizer=None, **overrides):
    data = load_beir(beir_dir, split="train")
    bank = TargetBank.from_encoder(partial(encode_texts, model, tokenizer=tokenizer), data.doc_texts(), data.doc_ids)
    args = make_args(tmp_path, max_steps=2, **overrides)
    kwargs = {"processing_class": tokenizer} if tokenizer is not None else {}
    return QRetTrainer(model, args, train_dataset=build_pairs_dataset(data), bank=bank, **kwargs)


def test_dot_model_trains_at_scale_1_with_its_raw_embeddings(tiny_model_dir, beir_dir, tmp_path):
    model = st_without_normalize(tiny_model_dir, "dot")
    assert similarity_function(model) == "dot"
    norms = np.linalg.norm(encode_texts(model, TEXTS), axis=1)
    assert norms.min() > 2.0  # not unit-norm: dot products in the tens, logits in the hundreds at scale 20
    trainer = trainer_for(model, beir_dir, tmp_path)
    assert trainer.loss.scale == 1.0  # sentence-transformers' MultipleNegativesRankingLoss convention for dot_score
    assert np.linalg.norm(trainer.bank.numpy(), axis=1).min() > 2.0  # the bank keeps the model's raw embeddings
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert losses and all(np.isfinite(losses))
    trainer.save_model()
    config = json.loads((tmp_path / "out" / "qret_config.json").read_text())
    assert config["similarity"] == "dot" and config["scale"] == 1.0 and config["pooling"] is None
    assert trainer_for(model, beir_dir, tmp_path, scale=5.0).loss.scale == 5.0  # an explicit scale wins


def test_cosine_models_get_scale_20_and_unit_norm_embeddings(tiny_model, tiny_model_dir, beir_dir, tmp_path):
    assert similarity_function(tiny_model) == "cosine" and resolve_scale(tiny_model, None) == 20.0
    assert trainer_for(tiny_model, beir_dir, tmp_path).loss.scale == 20.0
    # cosine similarity without a Normalize module: the embeddings are normalised, so inner products are cosines
    bare = st_without_normalize(tiny_model_dir, None)
    assert similarity_function(bare) == "cosine"
    np.testing.assert_allclose(np.linalg.norm(encode_texts(bare, TEXTS), axis=1), 1.0, rtol=1e-5)
    with torch.no_grad():
        embedded = embed(bare, tokenize(bare, TEXTS))
    torch.testing.assert_close(embedded.norm(dim=1), torch.ones(3))


def test_euclidean_models_and_bad_scales_are_refused(tiny_model_dir, beir_dir, tmp_path):
    model = st_without_normalize(tiny_model_dir, "euclidean")
    with pytest.raises(ConfigError, match="similarity_fn_name is 'euclidean'.*'cosine' and 'dot'"):
        trainer_for(model, beir_dir, tmp_path)
    with pytest.raises(ConfigError, match="scale must be > 0"):
        make_args(tmp_path, scale=0.0)


def test_plain_encoder_cls_pooling_is_trained_saved_and_served(tiny_model_dir, beir_dir, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModel.from_pretrained(tiny_model_dir)
    mean = encode_texts(model, TEXTS, tokenizer=tokenizer)
    set_pooling(model, "cls")
    assert get_pooling(model) == "cls"
    cls = encode_texts(model, TEXTS, tokenizer=tokenizer)
    features = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        first_token = model(**features).last_hidden_state[:, 0]
    np.testing.assert_allclose(cls, torch.nn.functional.normalize(first_token, dim=-1).numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(cls, mean, atol=1e-3)
    trainer = trainer_for(model, beir_dir, tmp_path, tokenizer=tokenizer, pooling="cls")
    trainer.train()
    out = tmp_path / "plain_cls"
    trainer.save_model(str(out))
    assert json.loads((out / "qret_config.json").read_text())["pooling"] == "cls"
    served = QuantizedRetriever.from_pretrained(out, device="cpu").encode_queries(TEXTS)
    np.testing.assert_allclose(served, encode_texts(model, TEXTS, tokenizer=tokenizer), rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="pooling 'mean' differs from the 'cls' pooling"):
        configure_encoder(model, "mean")
    with pytest.raises(ConfigError, match="pooling must be one of mean, cls"):
        make_args(tmp_path, pooling="max")


def test_pooling_is_refused_for_a_sentence_transformer(tiny_model, beir_dir, tmp_path):
    with pytest.raises(ConfigError, match="SentenceTransformer pools with its own Pooling module"):
        trainer_for(tiny_model, beir_dir, tmp_path, pooling="cls")


def test_recipe_pooling_cls_on_a_plain_folder(tiny_model_dir, two_split_dir, tmp_path):
    from test_cli import recipe_argv
    from transformers import AutoModel, AutoTokenizer

    from hf_qret.cli import train_main

    plain = tmp_path / "plain_bert"  # config.json + weights + tokenizer, no modules.json
    AutoModel.from_pretrained(tiny_model_dir).save_pretrained(plain)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(plain)
    out = tmp_path / "run"
    train_main(recipe_argv(str(plain), two_split_dir, out, "--max_steps", "2", "--pooling", "cls"))
    pooling = json.loads((out / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode"] == "cls"
    model = AutoModel.from_pretrained(out)
    set_pooling(model, "cls")
    served = QuantizedRetriever.from_pretrained(out, device="cpu").encode_queries(TEXTS)
    np.testing.assert_allclose(served, encode_texts(model, TEXTS, tokenizer=AutoTokenizer.from_pretrained(out)),
                               rtol=1e-4, atol=1e-5)  # fmt: skip
    with pytest.raises(ConfigError, match="is a sentence-transformers model.*drop --pooling"):
        train_main(recipe_argv(tiny_model_dir, two_split_dir, tmp_path / "st", "--pooling", "cls"))
