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
