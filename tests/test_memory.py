"""A million-row run holds one copy of its bank: loading it, evaluating the flat baseline, training the index and
joining precomputed rows never materialise a second one (nor keep a file's pages resident)."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import textwrap
import weakref

import numpy as np
import pytest
import torch
from test_cli import recipe_argv
from test_precomputed_rows import extra_rows, without_auto

from hf_qret.bank.core import TargetBank
from hf_qret.bank.precomputed import write_rows_file
from hf_qret.bank.storage import load_bank_file, safetensors_chunks
from hf_qret.data import load_beir
from hf_qret.evaluation import evaluator as evaluator_module
from hf_qret.evaluation.evaluator import RetrievalEvaluator, search_run
from hf_qret.index.core import QuantizedIndex
from hf_qret.index.exact import ExactSearch
from hf_qret.index.faiss_ops import import_faiss, pq_encode_block

_PEAK_SCRIPT = """
import json, sys, torch
from pathlib import Path
from hf_qret.bank.core import TargetBank

def status(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

try:
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current resident set
except OSError:
    print(json.dumps({"skip": True}))
    sys.exit(0)
before = status("VmRSS")
bank = TargetBank.from_file(sys.argv[1], None, dtype=sys.argv[2])
print(json.dumps({"growth": status("VmHWM") - before, "bank": bank.nbytes}))
"""


def _load_growth(path, dtype: str) -> tuple[int, int]:
    """Peak resident-set growth of a fresh process while it loads the bank file ``path``, and the bank's bytes."""
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_PEAK_SCRIPT), str(path), dtype],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    found = json.loads(out.stdout.strip().splitlines()[-1])
    if found.get("skip"):
        pytest.skip("this kernel does not let a process reset its peak resident set")
    return found["growth"], found["bank"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("suffix,dtype", [(".npy", "fp32"), (".safetensors", "fp32"), (".safetensors", "fp16")])
def test_loading_a_bank_file_holds_one_copy_of_its_rows(tmp_path, suffix, dtype):
    rows = np.random.default_rng(0).standard_normal((400_000, 96)).astype(np.float32)  # 154 MB
    path = tmp_path / f"bank{suffix}"
    if suffix == ".npy":
        np.save(path, rows)
    else:
        write_rows_file(path, [rows])
    del rows
    growth, bank_bytes = _load_growth(path, dtype)
    # one bank in its dtype plus one 65,536-row chunk; a second full copy (or the file's pages) would be 2x+
    file_bytes = 400_000 * 96 * 4
    assert growth < bank_bytes + 0.5 * file_bytes, (growth, bank_bytes)


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_chunked_loading_gives_the_rows_safetensors_gives(tmp_path, dtype):
    from safetensors.torch import load_file, save_file

    from hf_qret.bank.storage import BANK_DTYPES

    rows = torch.randn(70_000, 8)
    stored = rows.to(BANK_DTYPES[dtype])
    save_file({"other": torch.zeros(3), "embeddings": stored}, str(tmp_path / "bank.safetensors"))
    expected = load_file(str(tmp_path / "bank.safetensors"))["embeddings"]
    shape, chunks = safetensors_chunks(tmp_path / "bank.safetensors", chunk_rows=65_536)
    assert shape == (70_000, 8)
    assert torch.equal(torch.cat(list(chunks)), expected)
    for target in ("fp32", "fp16"):
        loaded = load_bank_file(tmp_path / "bank.safetensors", BANK_DTYPES[target])
        assert torch.equal(loaded, expected.to(BANK_DTYPES[target]))
    bank = TargetBank.from_file(tmp_path / "bank.safetensors", None, dtype=dtype)
    assert torch.equal(bank.weight.detach(), expected) and not bank.is_mmap


def test_exact_search_ranks_as_a_flat_index_across_chunks():
    rng = np.random.default_rng(3)
    rows = rng.standard_normal((5_000, 16)).astype(np.float32)
    queries = rng.standard_normal((40, 16)).astype(np.float32)
    flat = QuantizedIndex(16, "Flat", use_gpu=False)
    flat.add(rows)
    for chunk_rows, k in ((1024, 10), (1024, 100), (4096, 5_000), (65_536, 7)):
        scores, found = ExactSearch(rows, chunk_rows=chunk_rows).search(queries, k)
        expected_scores, expected_rows = flat.search(queries, k)
        np.testing.assert_array_equal(found, expected_rows)
        np.testing.assert_array_equal(scores, expected_scores)
    assert ExactSearch(rows[:3]).search(queries, 10)[1].shape == (40, 3)  # k capped at the rows, as the index does


def test_the_evaluation_searches_the_bank_itself_not_a_flat_copy(tiny_model, beir_dir, monkeypatch):
    data = load_beir(beir_dir, split="train")
    rows = np.random.default_rng(1).standard_normal((len(data.doc_ids), 32)).astype(np.float32)
    bank = TargetBank(rows, data.doc_ids)
    index = QuantizedIndex(32, "PQ4", use_gpu=False)
    index.build(bank.float32_rows())
    evaluator = RetrievalEvaluator(data.queries, data.qrels)

    class NoFlatCopy(QuantizedIndex):
        def __init__(self, dim, factory, *args, **kwargs):
            assert factory != "Flat", "the evaluation copied the bank into a flat index"
            super().__init__(dim, factory, *args, **kwargs)

    monkeypatch.setattr(evaluator_module, "QuantizedIndex", NoFlatCopy)
    runs = evaluator.runs(tiny_model, bank, index)
    monkeypatch.undo()
    from hf_qret.serving.encoder import encode_texts

    flat = QuantizedIndex(32, "Flat", use_gpu=False)
    flat.add(rows)
    queries = encode_texts(tiny_model, evaluator.queries, batch_size=evaluator.batch_size, role="query")
    assert runs["flat"] == search_run(queries, evaluator.query_ids, flat, bank.doc_ids, evaluator.k)


def test_index_training_encodes_pq_codes_in_small_batches(monkeypatch):
    faiss = import_faiss()
    default = faiss.cvar.product_quantizer_compute_codes_bs
    index = faiss.index_factory(384, "OPQ16,IVF64,PQ16", faiss.METRIC_INNER_PRODUCT)
    with pq_encode_block(faiss, index) as rows:
        # (rows, 16, 256) float32 tables of about 128 MB instead of FAISS's 262,144-row batches (4 GB)
        assert faiss.cvar.product_quantizer_compute_codes_bs == rows and rows * 16 * 256 * 4 <= 1 << 27
    assert faiss.cvar.product_quantizer_compute_codes_bs == default
    seen = []
    trained_empty = QuantizedIndex._trained_empty

    def spy(self, sample):
        original = self.faiss.IndexPreTransform.train

        def train(index, *args):
            seen.append(faiss.cvar.product_quantizer_compute_codes_bs)
            return original(index, *args)

        monkeypatch.setattr(self.faiss.IndexPreTransform, "train", train)
        return trained_empty(self, sample)

    monkeypatch.setattr(QuantizedIndex, "_trained_empty", spy)
    vectors = np.random.default_rng(0).standard_normal((4_000, 32)).astype(np.float32)
    QuantizedIndex(32, "OPQ4,PQ4").build(vectors)
    assert seen and seen[0] < default
    assert faiss.cvar.product_quantizer_compute_codes_bs == default


def test_the_recipe_unmaps_the_precomputed_rows_once_they_are_joined(tiny_model_dir, two_split_dir, tmp_path,
                                                                     monkeypatch):  # fmt: skip
    import hf_qret.bank.precomputed as precomputed
    import hf_qret.training.corpus as corpus

    rows_file, ids_file, _ = extra_rows(tmp_path, 50)
    mapped = []
    load = precomputed.load_precomputed_rows

    def tracked_load(*args):
        extra = load(*args)
        mapped.append(weakref.ref(extra.rows))  # the read-only memory map of the .npy file
        return extra

    alive_at_bank = []
    encode_bank = corpus.encode_bank

    def tracked_encode_bank(encode, texts, ids, **kwargs):
        if len(ids) == 350:  # the whole bank (corpus + precomputed rows), read from the joined file
            gc.collect()
            alive_at_bank.append(mapped[0]() is not None)
        return encode_bank(encode, texts, ids, **kwargs)

    monkeypatch.setattr(precomputed, "load_precomputed_rows", tracked_load)
    monkeypatch.setattr(corpus, "encode_bank", tracked_encode_bank)
    argv = recipe_argv(tiny_model_dir, two_split_dir, tmp_path / "out", "--extra_rows_file", str(rows_file),
                       "--extra_ids_file", str(ids_file), "--max_steps", "1")  # fmt: skip
    from hf_qret.cli import train_main

    train_main(without_auto(argv))
    assert mapped and alive_at_bank == [False]


def _one_query_with(positives: int):
    from hf_qret.data import BeirData

    corpus = {f"d{i}": {"text": f"document {i}"} for i in range(positives)}
    return BeirData(corpus, {"q": "a query"}, {"q": {f"d{i}": 1 for i in range(positives)}}, split="train", path="mem")


def test_training_pairs_grow_with_the_pairs_not_with_the_square_of_a_querys_positives():
    from hf_qret.data import build_pairs_dataset

    # a per-row list of every positive of the row's query holds positives^2 ids (NFCorpus train: 30.7M ids for
    # 110,575 pairs, about 2 GB while built); 4x the pairs must cost about 4x the bytes, not 16x
    small, large = (build_pairs_dataset(_one_query_with(n)).data.nbytes for n in (500, 2_000))
    assert large < 6 * small, (small, large)


def test_the_trainers_collator_masks_every_positive_of_a_rows_query(tiny_model, tmp_path):
    from test_trainer import make_args

    from hf_qret.data import build_pairs_dataset
    from hf_qret.training.trainer import QRetTrainer

    data = _one_query_with(40)
    bank = TargetBank(np.random.default_rng(0).standard_normal((40, 32)).astype(np.float32), data.doc_ids)
    dataset = build_pairs_dataset(data)
    trainer = QRetTrainer(tiny_model, make_args(tmp_path), train_dataset=dataset, bank=bank)
    batch = trainer.data_collator([dataset[3], dataset[17]])
    assert batch["positive_rows"].tolist() == [3, 17]
    for row in batch["positive_sets"].tolist():
        assert sorted(row) == list(range(40))  # the query's other 39 positives are never its negatives
