"""Small corpora never abort the process: the factory is checked against the training rows before FAISS trains
(OPQ below 512 rows, PQ below one row per centroid, IVF below one row per list), adapted with a logged reason or
refused with a clear error; the artifact records the factory actually built."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT, synthetic_beir, write_beir

from hf_qret.errors import ConfigError
from hf_qret.index.core import QuantizedIndex
from hf_qret.index.factory import OPQ_MIN_ROWS, fit_factory

# 351 documents: the BEIR folder size that made OPQ16,PQ16 (the default then) abort inside FAISS k-means (exit 134 / 139).
BUILD_351 = """
import numpy as np
from hf_qret.index.core import QuantizedIndex
x = np.random.default_rng(0).standard_normal((351, 384)).astype("float32")
x /= np.linalg.norm(x, axis=1, keepdims=True)
index = QuantizedIndex(384, "OPQ16,PQ16")
index.build(x)
index.refresh(x, mode="retrain")
print("BUILT", index.factory, index.bytes_per_vector, index.ntotal)
"""


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}


def test_opq_factory_on_351_vectors_builds_instead_of_aborting():
    done = subprocess.run([sys.executable, "-c", BUILD_351], capture_output=True, text=True, env=_env(), timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]  # FAISS used to kill the process here (SIGABRT / SIGSEGV)
    assert "BUILT PQ16 16 351" in done.stdout  # OPQ dropped, same 16 bytes per vector
    assert "training 'PQ16' instead" in done.stderr


@pytest.mark.parametrize("rows, dim, fitted", [(100, 32, "RQ16x6"), (3, 8, "RQ16x1")])
def test_the_default_factory_trains_on_tiny_corpora(tmp_path, rows, dim, fitted):
    """The default index (auto: RQ16x8 on a small corpus) gets as many bits per codebook as the rows allow, and refreshes."""
    from hf_qret.config import QRetTrainingArguments

    args = QRetTrainingArguments(str(tmp_path), use_cpu=True, report_to="none")
    x = np.random.default_rng(0).standard_normal((rows, dim)).astype("float32")
    index = QuantizedIndex.from_args(dim, args)
    index.build(x)
    index.refresh(x, mode=args.refresh_mode)
    # the default ("auto") chose RQ16x8 for so few rows, then fitted it to them
    assert args.index_factory == "auto" and index.choice.factory == "RQ16x8"
    assert index.factory == fitted and index.ntotal == rows
    assert index.search(x[:2], min(rows, 3))[1].shape == (2, min(rows, 3))


@pytest.mark.parametrize(
    "factory, rows, fitted",
    [
        ("OPQ16,PQ16", OPQ_MIN_ROWS, "OPQ16,PQ16"),
        ("OPQ16,PQ16", OPQ_MIN_ROWS - 1, "PQ16"),
        ("OPQ8_64,IVF4,PQ8", 300, "IVF4,PQ8"),
        ("PQ16", 256, "PQ16"),
        ("PQ16", 255, "PQ16x7"),
        ("PQ8x4", 15, "PQ8x3"),
        ("IVF16,PQ16", 100, "IVF16,PQ16x6"),
        ("SQ8", 3, "SQ8"),
        ("Flat", 1, "Flat"),
    ],
)
def test_fit_factory(factory, rows, fitted):
    got, reason = fit_factory(factory, rows)
    assert got == fitted
    assert bool(reason) == (got != factory)


def test_factories_that_cannot_fit_are_refused_with_what_would_work():
    with pytest.raises(
        ConfigError, match=r"'IVF1024,PQ16' cannot be trained on 351 rows: IVF1024 needs at least 1024.*'IVF9,PQ16'"
    ):
        fit_factory("IVF1024,PQ16", 351)
    with pytest.raises(ConfigError, match=r"'PQ16x4fs' cannot be trained on 10 rows"):
        fit_factory("PQ16x4fs", 10)
    with pytest.raises(ConfigError, match="IVF1024 needs at least 1024"):
        QuantizedIndex.validate_factory(32, "IVF1024,PQ4", num_rows=351)  # the recipe checks before encoding
    with pytest.raises(ConfigError, match="IVF1024 needs"):
        QuantizedIndex(32, "IVF1024,PQ4").build(np.random.default_rng(0).standard_normal((351, 32)).astype("float32"))


def test_adapted_bits_are_the_built_index_and_survive_refreshes(caplog):
    x = np.random.default_rng(0).standard_normal((200, 32)).astype("float32")
    index = QuantizedIndex(32, "PQ8")
    with caplog.at_level(logging.WARNING, logger="hf_qret.index.core"):
        index.build(x)
        index.refresh(x, mode="retrain")
    assert index.factory == "PQ8x7" and index.requested_factory == "PQ8" and index.bytes_per_vector == 7
    assert sum("training 'PQ8x7' instead" in r.getMessage() for r in caplog.records) == 1  # logged once
    rows = np.arange(10)
    assert index.refresh(x + 0.1, mode="incremental", rows=rows) == 10
    assert index.search(x[:2], 5)[1].shape == (2, 5)


def test_recipe_on_a_351_document_folder_writes_the_real_factory(tiny_model_dir, tmp_path):
    corpus, queries, qrels = synthetic_beir(num_docs=351, num_queries=60)
    data = write_beir(tmp_path / "beir351", corpus, queries, qrels)
    write_beir(data, corpus, queries, {q: qrels[q] for q in list(qrels)[40:]}, split="dev")
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "hf_qret.cli", "train", str(REPO_ROOT / "recipes" / "scifact.yaml"),
            "--model_name_or_path", tiny_model_dir, "--data_dir", str(data), "--output_dir", str(out),
            "--max_steps", "2", "--per_device_train_batch_size", "8", "--num_negatives", "8", "--use_cpu", "true",
            "--opq_niter", "5", "--dataloader_pin_memory", "false", "--disable_tqdm", "true",
            "--index_factory", "OPQ16,PQ16"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, env=_env(), timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    config = json.loads((out / "qret_config.json").read_text())
    assert config["index_factory"] == "PQ16" and config["bytes_per_vector"] == 16  # OPQ16,PQ16 without its OPQ stage
    assert "training 'PQ16' instead" in done.stderr
