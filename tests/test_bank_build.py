"""hf_qret.bank.build_bank: one constructor for every way a bank's rows come (encoded, written to an init file, read
from a file, cached, memory mapped)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hf_qret.bank import BankSpec, CacheSource, EncodeSource, FileSource, build_bank
from hf_qret.bank.build import CACHE_DIR
from hf_qret.bank.core import TargetBank
from hf_qret.errors import DataError
from hf_qret.training.corpus import encode_bank

IDS = ["d0", "d1", "d2"]
TEXTS = ["alpha", "beta gamma", "delta"]


class CountingEncode:
    """A deterministic encoder (a row per text, from its length and position) that counts the texts it encodes."""

    precision = "bf16"

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.calls += len(texts)
        return np.array([[len(t), 1.0 + i, -0.5] for i, t in enumerate(texts)], dtype=np.float32)


def test_encode_source_encodes_in_the_spec_dtype_and_records_the_precision():
    encode = CountingEncode()
    bank = build_bank(BankSpec(IDS, dtype="bf16"), EncodeSource(encode, TEXTS))
    assert type(bank) is TargetBank and bank.doc_ids == IDS and bank.dtype == torch.bfloat16
    assert torch.equal(bank.local_weight.float(), torch.from_numpy(CountingEncode()(TEXTS)))
    assert bank.encode_precision == "bf16" and encode.calls == 3
    assert bank.local_changed_rows().size == 0  # nothing to re-encode in an index built over it


def test_encode_source_writes_its_init_file_in_float32_and_a_file_source_reads_it(tmp_path):
    init = tmp_path / "sub" / "bank_init.npy"
    encoded = build_bank(BankSpec(IDS, dtype="fp16"), EncodeSource(CountingEncode(), TEXTS, init_file=init))
    assert np.load(init).dtype == np.float32 and np.array_equal(np.load(init), CountingEncode()(TEXTS))
    assert encoded.dtype == torch.float16
    read = build_bank(BankSpec(IDS, dtype="fp16"), FileSource(init, precision="fp32"))
    assert torch.equal(read.local_weight, encoded.local_weight) and read.encode_precision == "fp32"
    assert build_bank(BankSpec(IDS), FileSource(init)).encode_precision is None  # not known: not claimed


def test_cache_source_encodes_once_per_key(tmp_path):
    encode = CountingEncode()
    key = {"documents": "digest-1", "precision": "bf16"}
    first = build_bank(BankSpec(IDS), CacheSource(encode, TEXTS, tmp_path, key))
    assert encode.calls == 3
    assert json.loads((tmp_path / CACHE_DIR / "bank_init.json").read_text()) == key
    again = build_bank(BankSpec(IDS), CacheSource(encode, TEXTS, tmp_path, key))
    assert encode.calls == 3 and torch.equal(again.local_weight, first.local_weight)
    assert again.encode_precision == "bf16"  # the key includes the precision
    build_bank(BankSpec(IDS), CacheSource(encode, TEXTS, tmp_path, {**key, "documents": "digest-2"}))
    assert encode.calls == 6  # another key: encoded again, and the cache replaced
    assert json.loads((tmp_path / CACHE_DIR / "bank_init.json").read_text())["documents"] == "digest-2"


def test_a_memory_mapped_spec_keeps_the_rows_in_its_working_file(tmp_path):
    spec = BankSpec(IDS, mmap_path=tmp_path / "bank_mmap.npy")
    bank = build_bank(spec, EncodeSource(CountingEncode(), TEXTS))
    assert bank.is_mmap and bank.mmap_path == tmp_path / "bank_mmap.npy"
    assert np.array_equal(np.load(tmp_path / "bank_mmap.npy"), CountingEncode()(TEXTS))


def test_a_sharded_spec_with_one_process_is_the_whole_bank():
    bank = build_bank(BankSpec(IDS, shard=True), EncodeSource(CountingEncode(), TEXTS))
    assert type(bank) is TargetBank and len(bank) == 3


def test_rows_without_a_text_cannot_be_encoded_and_an_unknown_source_is_refused():
    with pytest.raises(DataError):
        build_bank(BankSpec(["d0", "x1"]), EncodeSource(CountingEncode(), ["alpha", None]))
    with pytest.raises(TypeError, match="EncodeSource, FileSource or CacheSource"):
        build_bank(BankSpec(IDS), "rows.npy")


def test_encode_bank_is_build_bank_with_the_source_its_arguments_name(tmp_path):
    init = tmp_path / "init.npy"
    encode = CountingEncode()
    written = encode_bank(encode, TEXTS, IDS, init_file=init)  # no file yet: encoded, written there
    assert encode.calls == 3 and written.encode_precision == "bf16"
    read = encode_bank(encode, TEXTS, IDS, init_file=init, init_precision="fp32")  # the file exists: read
    assert encode.calls == 3 and read.encode_precision == "fp32"
    assert torch.equal(read.local_weight, build_bank(BankSpec(IDS), FileSource(init)).local_weight)
