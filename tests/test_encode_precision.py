"""The corpus encoded into the bank in bfloat16 where the hardware computes it natively (``bank_encode_precision``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_qret import QRetTrainingArguments
from hf_qret.errors import ConfigError
from hf_qret.serving.encoder import encode_autocast_dtype, encode_texts
from hf_qret.training.corpus import document_encode

TEXTS = ["Vitamin D lowers cancer risk.", "A much longer document about proteins " * 5, "Short one.", "Cells divide."]


def test_auto_is_bf16_only_on_hardware_that_computes_it(monkeypatch):
    assert encode_autocast_dtype("fp32", "cpu") is None
    assert encode_autocast_dtype("bf16", "cpu") is torch.bfloat16
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert encode_autocast_dtype("auto", "cpu") is torch.bfloat16
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert encode_autocast_dtype("auto", "cpu") is None
    with pytest.raises(ConfigError, match="unknown encoding precision 'fp8'"):
        encode_autocast_dtype("fp8", "cpu")


def test_bf16_encoding_gives_float32_rows_close_to_float32s(tiny_model):
    reference = encode_texts(tiny_model, TEXTS, batch_size=2, role="document")
    fast = encode_texts(tiny_model, TEXTS, batch_size=2, role="document", precision="bf16")
    assert fast.dtype == np.float32 and fast.shape == reference.shape
    assert not np.array_equal(fast, reference)  # it did run in bfloat16
    cosine = (fast * reference).sum(1) / np.linalg.norm(fast, axis=1) / np.linalg.norm(reference, axis=1)
    assert cosine.min() > 0.99
    np.testing.assert_allclose(np.linalg.norm(fast, axis=1), 1.0, atol=1e-2)  # still unit vectors
    assert not torch.is_autocast_enabled("cpu")  # nothing leaks out of the encoding
    np.testing.assert_array_equal(document_encode(tiny_model, 2, precision="bf16")(TEXTS), fast)


def test_bank_encode_precision_is_checked(tmp_path):
    assert QRetTrainingArguments(output_dir=str(tmp_path)).bank_encode_precision == "auto"
    with pytest.raises(ConfigError, match="bank_encode_precision must be one of auto, fp32, bf16"):
        QRetTrainingArguments(output_dir=str(tmp_path), bank_encode_precision="half")


def test_document_precision_records_how_the_bank_was_encoded_not_the_arguments(tiny_model, beir_dir, tmp_path):
    from functools import partial

    from test_trainer import make_args

    from hf_qret import QRetTrainer, TargetBank, build_pairs_dataset, load_beir
    from hf_qret.training.corpus import encode_bank

    data = load_beir(beir_dir, split="train")
    texts, ids = data.doc_texts(), data.doc_ids

    def record(bank, **args):
        trainer = QRetTrainer(tiny_model, make_args(tmp_path, **args), build_pairs_dataset(data), bank=bank)
        return trainer.artifact_config()["document_precision"]

    # a bank= made by an encode function that does not say its precision: not known, whatever the arguments say
    plain = TargetBank.from_encoder(partial(encode_texts, tiny_model, role="document"), texts, ids)
    assert record(plain, bank_encode_precision="bf16") is None
    # a bank= encoded in bf16 by document_encode, trained with arguments that say fp32: bf16
    assert record(TargetBank.from_encoder(document_encode(tiny_model, 64, precision="bf16"), texts, ids),
                  bank_encode_precision="fp32") == "bf16"  # fmt: skip
    # a reused --bank_init_file: what the caller knows of it (nothing, by default), never the encode function's
    init_file = tmp_path / "init.npy"
    plain.save(init_file)
    bf16_encode = document_encode(tiny_model, 64, precision="bf16")
    assert encode_bank(bf16_encode, texts, ids, init_file=init_file).encode_precision is None
    assert encode_bank(bf16_encode, texts, ids, init_file=init_file, init_precision="fp32").encode_precision == "fp32"
    fresh = encode_bank(bf16_encode, texts, ids, init_file=tmp_path / "new.npy")  # encoded now, then written
    assert fresh.encode_precision == "bf16" and (tmp_path / "new.npy").is_file()


def test_add_documents_of_a_bf16_bank_falls_back_to_float32_without_native_bf16(
    tiny_model, beir_dir, tmp_path, monkeypatch, caplog
):
    import logging

    from test_trainer import make_args

    import hf_qret.serving.retriever as retriever_module
    from hf_qret import QRetTrainer, QuantizedRetriever, build_pairs_dataset, load_beir

    data = load_beir(beir_dir, split="train")
    args = make_args(tmp_path, bank_encode_precision="bf16", max_steps=1)
    trainer = QRetTrainer(tiny_model, args, build_pairs_dataset(data), corpus=str(beir_dir))  # encodes the bank
    trainer.train()
    trainer.save_model()
    used: list[str] = []
    original = retriever_module.encode_texts
    monkeypatch.setattr(
        retriever_module, "encode_texts", lambda *a, **k: used.append(k["precision"]) or original(*a, **k)
    )
    text = "Vitamin D and calcium in bone growth"
    for native, expected in ((False, "fp32"), (True, "bf16")):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda native=native: native)
        retriever = QuantizedRetriever.from_pretrained(tmp_path / "out", "cpu")
        assert retriever.config["document_precision"] == "bf16"
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="hf_qret"):
            retriever.add_documents([text], ["new"])
        assert used[-1] == expected
        noted = any("encoded in float32" in r.getMessage() for r in caplog.records)
        assert noted == (not native)
    # the fallback's row is the float32 encoding of the document encoder, through the document adapter's layers
    from hf_qret.serving.document_adapter import adapt_rows, load_document_adapters

    retriever = QuantizedRetriever.from_pretrained(tmp_path / "out", "cpu", load_bank=True)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    retriever.add_documents([text], ["new"])
    np.testing.assert_allclose(
        retriever.files.bank.float32_rows()[[len(retriever.doc_ids) - 1]][0],
        adapt_rows(
            encode_texts(retriever.document_encoder, [text], role="document", precision="fp32"),
            load_document_adapters(tmp_path / "out"),
        )[0],
        atol=1e-6,
    )
