"""Rows from precomputed embeddings (ids without text) in the recipe's bank, and the index chosen from the bank's
size (``index_factory auto``)."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import synthetic_beir, write_beir
from test_cli import recipe_argv

from hf_qret.bank.precomputed import load_precomputed_rows, write_rows_file
from hf_qret.cli import evaluate_main, train_main
from hf_qret.errors import ConfigError, DataError
from hf_qret.index.auto import AUTO_SWITCH_ROWS, choose_index, resolve_auto_index
from hf_qret.training.corpus import encode_bank


def extra_rows(folder, n: int, dim: int = 32, seed: int = 1):
    rows = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    np.save(folder / "extra.npy", rows)
    (folder / "extra.json").write_text(json.dumps([f"x{i}" for i in range(n)]))
    return folder / "extra.npy", folder / "extra.json", rows


def without_auto(argv: list[str]) -> list[str]:
    """recipe_argv without its explicit --index_factory (so the default, auto, applies)."""
    at = argv.index("--index_factory")
    return argv[:at] + argv[at + 2 :]


def test_recipe_trains_over_precomputed_rows_and_evaluate_scores_them_as_non_relevant(
    tiny_model_dir, two_split_dir, tmp_path
):
    rows_file, ids_file, rows = extra_rows(tmp_path, 50)
    out = tmp_path / "out"
    argv = recipe_argv(tiny_model_dir, two_split_dir, out, "--extra_rows_file", str(rows_file),
                       "--extra_ids_file", str(ids_file))  # fmt: skip
    train_main(without_auto(argv))
    doc_ids = json.loads((out / "doc_ids.json").read_text())
    assert len(doc_ids) == 350 and doc_ids[300:] == [f"x{i}" for i in range(50)]
    config = json.loads((out / "qret_config.json").read_text())
    assert config["precomputed_rows"] == {"start": 300, "count": 50}
    # the default index was chosen from the 350 rows, recorded, and the working file is gone
    assert config["index_choice"]["requested"] == "auto" and config["index_choice"]["rows"] == 350
    assert config["index_factory"].startswith(choose_index(350).factory.split("x")[0])
    assert not any(p.name.startswith("bank_init.tmp") for p in out.iterdir())
    card = (out / "README.md").read_text()
    assert "| Index choice | `index_factory auto`: 350 rows" in card
    assert "| Rows from precomputed embeddings | 50 (ids without text) |" in card
    from safetensors.numpy import load_file

    bank = load_file(str(out / "bank.safetensors"))["embeddings"]
    # no training query touches them: as given, through the document adapter's layers every row went through
    from hf_qret.serving.document_adapter import adapt_rows, load_document_adapters

    layers = load_document_adapters(out)
    assert config["document_adapter"] == {"file": "document_adapter.safetensors", "layers": len(layers)} and layers
    np.testing.assert_allclose(bank[300:], adapt_rows(np.asarray(rows, dtype=np.float32), layers), atol=1e-5)
    result = evaluate_main([str(out), "--data", str(two_split_dir), "--split", "dev"])
    assert result["precomputed_rows"] == 50 and 0 <= result["quantized"]["ndcg@10"] <= 1


def test_qrels_may_name_precomputed_rows_and_bad_files_are_one_clear_error(tiny_model_dir, tmp_path):
    corpus, queries, qrels = synthetic_beir()
    rows_file, ids_file, _ = extra_rows(tmp_path, 20)
    # a training query whose relevant document has no text: it trains on the precomputed row
    qrels = dict(qrels)
    first = next(iter(qrels))
    qrels[first] = {"x3": 1}
    data = write_beir(tmp_path / "data", corpus, queries, dict(list(qrels.items())[:40]), split="train")
    write_beir(data, corpus, queries, dict(list(qrels.items())[40:]), split="dev")
    out = tmp_path / "out"
    base = recipe_argv(tiny_model_dir, data, out)
    with pytest.raises(DataError, match="not in corpus.jsonl"):  # without the rows, x3 is unknown
        train_main(base)
    train_main(base + ["--extra_rows_file", str(rows_file), "--extra_ids_file", str(ids_file)])
    assert "x3" in json.loads((out / "doc_ids.json").read_text())
    with pytest.raises(ConfigError, match="need both"):
        train_main(base + ["--extra_rows_file", str(rows_file)])
    (tmp_path / "short.json").write_text(json.dumps(["a", "b"]))
    with pytest.raises(DataError, match="20 rows but .* lists 2 ids"):
        load_precomputed_rows(rows_file, tmp_path / "short.json")


def test_rows_without_text_cannot_be_encoded(tmp_path):
    def encode(texts):
        raise AssertionError("must not be called")

    with pytest.raises(DataError, match="1 row\\(s\\) have no text \\(first: 'x1'\\)"):
        encode_bank(encode, ["a text", None], ["d1", "x1"], dim=4)
    # ... but they load from a file that holds them
    path = write_rows_file(tmp_path / "rows.safetensors", [np.ones((1, 4)), np.zeros((1, 4))])
    bank = encode_bank(encode, ["a text", None], ["d1", "x1"], init_file=path)
    np.testing.assert_array_equal(bank.numpy(), [[1, 1, 1, 1], [0, 0, 0, 0]])


def test_auto_index_switches_at_the_measured_point_and_explicit_factories_stay(caplog):
    small, large = choose_index(AUTO_SWITCH_ROWS - 1), choose_index(AUTO_SWITCH_ROWS)
    assert small.factory == "RQ16x8" and small.search_params is None
    assert (
        large.factory.startswith("OPQ16,IVF") and large.factory.endswith(",PQ16") and large.search_params == "nprobe=16"
    )
    args = SimpleNamespace(index_factory="auto", index_search_params=None)
    with caplog.at_level(logging.INFO, logger="hf_qret"):
        assert resolve_auto_index(args, AUTO_SWITCH_ROWS).factory == large.factory
        assert resolve_auto_index(args, 10) is None  # resolved once: a second call changes nothing, logs nothing
    assert args.index_factory == large.factory and args.index_choice.record()["rows"] == AUTO_SWITCH_ROWS
    assert sum("index_factory auto" in r.message for r in caplog.records) == 1
    explicit = SimpleNamespace(index_factory="OPQ16,PQ16", index_search_params=None)
    assert resolve_auto_index(explicit, 10**7) is None and explicit.index_factory == "OPQ16,PQ16"


def test_resume_with_precomputed_rows_continues_exactly_and_ships_one_artifact(tiny_model_dir, two_split_dir, tmp_path):
    """Item 4's properties on the new path: exact resume (a run interrupted at step 4 and resumed ends with the same
    metrics and bank), one artifact (the joined rows' working file removed)."""
    import torch
    from safetensors.torch import load_file

    rows_file, ids_file, _ = extra_rows(tmp_path, 40)
    extra = ["--extra_rows_file", str(rows_file), "--extra_ids_file", str(ids_file), "--max_steps", "8",
             "--refresh_steps", "3", "--keep_untrained_if_better", "false"]  # fmt: skip
    unbroken = train_main(recipe_argv(tiny_model_dir, two_split_dir, tmp_path / "a", *extra, "--save_strategy", "steps",
                                  "--save_steps", "4"))  # fmt: skip
    checkpoint = tmp_path / "a" / "checkpoint-4"
    resumed = train_main(
        recipe_argv(tiny_model_dir, two_split_dir, tmp_path / "b", *extra, "--resume_from_checkpoint", str(checkpoint))
    )
    for key, value in unbroken["trained"].items():
        assert resumed["trained"][key] == pytest.approx(value, abs=1e-4), key
    a = load_file(str(tmp_path / "a" / "bank.safetensors"))["embeddings"]
    b = load_file(str(tmp_path / "b" / "bank.safetensors"))["embeddings"]
    assert a.shape[0] == 340
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for out in (tmp_path / "a", tmp_path / "b"):
        assert not list(out.glob("bank_init.tmp*"))
        assert len(json.loads((out / "doc_ids.json").read_text())) == 340


def test_the_switch_point_is_below_the_measured_crossing_of_the_serving_goal():
    """``AUTO_SWITCH_ROWS`` is the measured number: at most where ``RQ16x8`` (decoded cosine, k = 10) falls below the
    serving goal on 1 thread and on all (benchmarks/switch_point.py), and not far below it (within 10 %)."""
    import json
    from pathlib import Path

    from hf_qret.index.auto import SERVING_TARGET_QPS

    record = json.loads((Path(__file__).parents[1] / "benchmarks/results/switch_point.json").read_text())
    assert record["goal_qps"] == SERVING_TARGET_QPS
    crossings = [record["RQ16x8_crossing"][threads]["rows_at_goal"] for threads in ("1thread", "all")]
    assert all(crossings) and 0.9 * min(crossings) <= AUTO_SWITCH_ROWS <= min(crossings)
    below = [r for r in record["sizes"] if r["factory"] == "RQ16x8" and r["rows"] < AUTO_SWITCH_ROWS]
    assert below and all(r["qps_k10_1thread"] >= SERVING_TARGET_QPS for r in below)


def test_large_auto_index_trains_searches_and_updates_in_place():
    """The large-corpus default (an OPQ rotation in front of IVF-PQ) goes through every path the trainer uses."""
    import faiss

    from hf_qret.index.core import QuantizedIndex

    rows = AUTO_SWITCH_ROWS
    choice = choose_index(rows)
    rng = np.random.default_rng(0)
    bank = rng.standard_normal((rows, 32)).astype(np.float32)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    index = QuantizedIndex(32, choice.factory, choice.search_params, opq_niter=4, normalize_decoded=True)
    index.build(bank, max_train_rows=12_000)
    assert isinstance(faiss.downcast_index(index.index), faiss.IndexPreTransform)
    assert faiss.extract_index_ivf(index.index).nprobe == 16 and index.ntotal == rows
    scores, found = index.search(bank[:8], 10)
    assert (found[:, 0] == np.arange(8)).mean() >= 0.75  # a row finds itself through the rotation and the lists
    assert np.all(np.diff(scores, axis=1) <= 1e-6)
    moved = np.arange(0, rows, 5)
    bank[moved] = -bank[moved]
    assert index.refresh(bank, mode="incremental", rows=moved) == len(moved)  # in place, no fallback
    in_place = index.search(bank[:64], 10)[1]
    index.refresh(bank, mode="reencode")
    np.testing.assert_array_equal(in_place, index.search(bank[:64], 10)[1])
