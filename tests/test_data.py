"""Unit tests of hf_qret.data: BEIR loading and validation, dev-split carving, training pairs, qrels I/O."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest
from conftest import synthetic_beir, write_beir

from hf_qret.data import (
    BeirData,
    build_pairs_dataset,
    carve_dev_split,
    doc_text,
    load_beir,
    load_qrels,
    write_qrels,
)
from hf_qret.errors import DataError
from hf_qret.training.collator import positives_by_query

# ----------------------------------------------------------------------------- helpers


def _tiny() -> tuple[dict, dict, dict]:
    corpus = {
        "d1": {"title": "Alpha", "text": "first doc"},
        "d2": {"title": "", "text": "second doc"},
        "d3": {"title": "Gamma", "text": "third doc"},
    }
    queries = {"q1": "what is alpha", "q2": "second thing"}
    qrels = {"q1": {"d1": 1}, "q2": {"d2": 1, "d3": 2}}
    return corpus, queries, qrels


def _write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def _gzip_file(path: Path) -> Path:
    target = path.with_name(path.name + ".gz")
    with open(path, "rb") as src, gzip.open(target, "wb") as dst:
        shutil.copyfileobj(src, dst)
    path.unlink()
    return target


# ----------------------------------------------------------------------------- load_beir: happy paths


def test_load_beir_synthetic_counts_order_and_texts(beir_dir):
    corpus, queries, qrels = synthetic_beir()
    data = load_beir(beir_dir, split="train")

    assert isinstance(data, BeirData)
    assert data.split == "train"
    assert Path(data.path) == beir_dir
    assert len(data.corpus) == 300
    assert len(data.queries) == 60
    assert len(data.qrels) == 60
    assert data.doc_ids == [f"d{i}" for i in range(300)]  # file order
    assert data.queries == queries
    assert data.qrels == qrels
    texts = data.doc_texts()
    assert len(texts) == 300
    for i in (0, 17, 299):
        doc = corpus[f"d{i}"]
        assert texts[i] == f"{doc['title']} {doc['text']}"
    assert sum(len(docs) for docs in data.qrels.values()) == sum(len(docs) for docs in qrels.values())


def test_doc_text_joins_title_and_text_and_strips():
    assert doc_text({"title": "T", "text": "body words"}) == "T body words"
    assert doc_text({"title": "", "text": "body"}) == "body"
    assert doc_text({"text": "body"}) == "body"
    assert doc_text({"title": "Only title", "text": ""}) == "Only title"
    assert doc_text({"title": None, "text": None}) == ""


def test_load_beir_keeps_only_queries_with_qrels_in_split(tmp_path):
    corpus, queries, qrels = _tiny()
    queries = {**queries, "q3": "no judgements for me"}
    folder = write_beir(tmp_path / "b", corpus, queries, qrels, split="test")
    data = load_beir(folder, split="test")
    assert set(data.queries) == {"q1", "q2"}
    assert data.qrels == qrels
    assert data.doc_texts() == ["Alpha first doc", "second doc", "Gamma third doc"]


def test_load_beir_gzip_loads_the_same(tmp_path):
    corpus, queries, qrels = synthetic_beir(num_docs=50, num_queries=12, seed=3)
    plain = load_beir(write_beir(tmp_path / "plain", corpus, queries, qrels), split="train")
    folder = write_beir(tmp_path / "gz", corpus, queries, qrels)
    _gzip_file(folder / "corpus.jsonl")
    _gzip_file(folder / "queries.jsonl")
    assert not (folder / "corpus.jsonl").exists() and (folder / "corpus.jsonl.gz").exists()
    packed = load_beir(folder, split="train")
    assert packed.corpus == plain.corpus
    assert packed.doc_ids == plain.doc_ids
    assert packed.queries == plain.queries
    assert packed.qrels == plain.qrels
    assert packed.doc_texts() == plain.doc_texts()

    _gzip_file(folder / "qrels" / "train.tsv")  # the qrels may be compressed too
    assert load_beir(folder, split="train").qrels == plain.qrels


# ----------------------------------------------------------------------------- load_beir: user errors


def test_missing_folder(tmp_path):
    missing = tmp_path / "does-not-exist"
    with pytest.raises(DataError, match="no such data folder") as info:
        load_beir(missing)
    assert str(missing) in str(info.value)


def test_missing_corpus(tmp_path):
    folder = write_beir(tmp_path / "b", *_tiny())
    (folder / "corpus.jsonl").unlink()
    with pytest.raises(DataError, match=r"no corpus\.jsonl"):
        load_beir(folder, split="train")


def test_missing_queries(tmp_path):
    folder = write_beir(tmp_path / "b", *_tiny())
    (folder / "queries.jsonl").unlink()
    with pytest.raises(DataError, match=r"no queries\.jsonl"):
        load_beir(folder, split="train")


def test_missing_split_lists_available_splits(tmp_path):
    corpus, queries, qrels = _tiny()
    folder = write_beir(tmp_path / "b", corpus, queries, qrels, split="train")
    write_beir(folder, corpus, queries, qrels, split="test")
    with pytest.raises(DataError) as info:
        load_beir(folder, split="dev")
    message = str(info.value)
    assert "qrels/dev.tsv" in message
    assert "available splits: test, train" in message


def test_missing_split_without_qrels_folder(tmp_path):
    folder = write_beir(tmp_path / "b", *_tiny())
    shutil.rmtree(folder / "qrels")
    with pytest.raises(DataError, match="available splits: none"):
        load_beir(folder, split="train")


@pytest.mark.parametrize("which", ["corpus.jsonl", "queries.jsonl"])
def test_malformed_json_line_names_file_and_line(tmp_path, which):
    folder = write_beir(tmp_path / "b", *_tiny())
    path = folder / which
    lines = path.read_text().splitlines()
    # line 1 valid, line 2 blank (still counted), line 3 broken
    _write_lines(path, [lines[0], "", '{"_id": "broken", "text": ', *lines[1:]])
    with pytest.raises(DataError) as info:
        load_beir(folder, split="train")
    message = str(info.value)
    assert f"{which}:3" in message
    assert "malformed JSON" in message


def test_json_line_without_id(tmp_path):
    folder = write_beir(tmp_path / "b", *_tiny())
    path = folder / "corpus.jsonl"
    _write_lines(path, [*path.read_text().splitlines(), json.dumps({"title": "x", "text": "y"})])
    with pytest.raises(DataError, match=r'corpus\.jsonl:4: .*"_id"'):
        load_beir(folder, split="train")


def test_duplicate_corpus_id(tmp_path):
    folder = write_beir(tmp_path / "b", *_tiny())
    path = folder / "corpus.jsonl"
    _write_lines(path, [*path.read_text().splitlines(), json.dumps({"_id": "d2", "title": "", "text": "again"})])
    with pytest.raises(DataError, match=r"corpus\.jsonl:4: duplicate corpus id 'd2'"):
        load_beir(folder, split="train")


def test_duplicate_query_id(tmp_path):
    folder = write_beir(tmp_path / "b", *_tiny())
    path = folder / "queries.jsonl"
    _write_lines(path, [*path.read_text().splitlines(), json.dumps({"_id": "q1", "text": "dup"})])
    with pytest.raises(DataError, match=r"queries\.jsonl:3: duplicate query id 'q1'"):
        load_beir(folder, split="train")


@pytest.mark.parametrize("text", ["", "   ", None])
def test_empty_query_text(tmp_path, text):
    corpus, queries, qrels = _tiny()
    folder = write_beir(tmp_path / "b", corpus, queries, qrels)
    path = folder / "queries.jsonl"
    _write_lines(path, [*path.read_text().splitlines(), json.dumps({"_id": "q9", "text": text})])
    with pytest.raises(DataError, match=r"queries\.jsonl:3: query 'q9' has an empty text"):
        load_beir(folder, split="train")


def test_empty_corpus_file(tmp_path):
    folder = write_beir(tmp_path / "b", *_tiny())
    (folder / "corpus.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="corpus is empty"):
        load_beir(folder, split="train")


def test_empty_queries_file(tmp_path):
    folder = write_beir(tmp_path / "b", *_tiny())
    (folder / "queries.jsonl").write_text("")
    with pytest.raises(DataError, match="no queries"):
        load_beir(folder, split="train")


@pytest.mark.parametrize("content", ["", "query-id\tcorpus-id\tscore\n", "query-id\tcorpus-id\tscore\n\n\n"])
def test_empty_qrels(tmp_path, content):
    folder = write_beir(tmp_path / "b", *_tiny())
    (folder / "qrels" / "train.tsv").write_text(content)
    with pytest.raises(DataError, match="qrels file is empty") as info:
        load_beir(folder, split="train")
    assert "train.tsv" in str(info.value)


def test_qrels_name_document_absent_from_corpus(tmp_path):
    corpus, queries, qrels = _tiny()
    qrels["q1"]["d404"] = 1
    folder = write_beir(tmp_path / "b", corpus, queries, qrels)
    with pytest.raises(DataError) as info:
        load_beir(folder, split="train")
    message = str(info.value)
    assert "1 document id(s) are not in corpus.jsonl" in message
    assert "'d404'" in message


def test_qrels_name_unknown_query(tmp_path):
    corpus, queries, qrels = _tiny()
    qrels["q77"] = {"d1": 1}
    folder = write_beir(tmp_path / "b", corpus, queries, qrels)
    with pytest.raises(DataError) as info:
        load_beir(folder, split="train")
    message = str(info.value)
    assert "1 query id(s) are not in queries.jsonl" in message
    assert "'q77'" in message


def test_qrels_bad_score_and_short_row(tmp_path):
    path = tmp_path / "qrels.tsv"
    path.write_text("query-id\tcorpus-id\tscore\nq1\td1\tabc\n")
    with pytest.raises(DataError, match=r"qrels\.tsv:2: the score 'abc' is not a number"):
        load_qrels(path)
    path.write_text("q1\td1\t1\nq1\td2\n")
    with pytest.raises(DataError, match=r"qrels\.tsv:2: expected"):
        load_qrels(path)


def test_errors_are_value_errors():
    assert issubclass(DataError, ValueError)


# ----------------------------------------------------------------------------- carve_dev_split


def _many_qrels(n: int = 100) -> dict[str, dict[str, int]]:
    return {f"q{i}": {f"d{i}": 1, f"d{i + 1}": i % 3} for i in range(n)}


def test_carve_dev_split_disjoint_union_and_fraction():
    qrels = _many_qrels(100)
    train, dev = carve_dev_split(qrels, dev_fraction=0.2, seed=13)
    assert set(train).isdisjoint(dev)
    assert set(train) | set(dev) == set(qrels)
    assert len(dev) == 20 and len(train) == 80
    for q in dev:
        assert dev[q] == qrels[q]
    for q in train:
        assert train[q] == qrels[q]

    for fraction, expected in ((0.1, 10), (0.35, 35), (0.5, 50), (0.9, 90)):
        _, dev = carve_dev_split(qrels, dev_fraction=fraction, seed=1)
        assert len(dev) == expected


def test_carve_dev_split_deterministic_per_seed():
    qrels = _many_qrels(100)
    a = carve_dev_split(qrels, dev_fraction=0.3, seed=7)
    b = carve_dev_split(dict(reversed(list(qrels.items()))), dev_fraction=0.3, seed=7)  # input order irrelevant
    assert set(a[1]) == set(b[1])
    assert a == carve_dev_split(qrels, dev_fraction=0.3, seed=7)
    other = carve_dev_split(qrels, dev_fraction=0.3, seed=8)
    assert set(other[1]) != set(a[1])
    assert len(other[1]) == len(a[1])


def test_carve_dev_split_small_keeps_at_least_one_dev_query():
    _, dev = carve_dev_split(_many_qrels(3), dev_fraction=0.01, seed=0)
    assert len(dev) == 1


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_carve_dev_split_bad_fraction(fraction):
    with pytest.raises(DataError, match="dev_fraction"):
        carve_dev_split(_many_qrels(10), dev_fraction=fraction)


# ----------------------------------------------------------------------------- build_pairs_dataset


def _pairs_data() -> BeirData:
    corpus = {f"d{i}": {"title": "", "text": f"doc {i}"} for i in range(6)}
    queries = {"qa": "query a", "qb": "query b", "qc": "query c"}
    qrels = {
        "qa": {"d0": 1, "d1": 2, "d2": 0},  # two positives, one judged non-relevant
        "qb": {"d3": 1},
        "qc": {"d4": 0, "d5": 0},  # judged, nothing relevant
    }
    return BeirData(corpus=corpus, queries=queries, qrels=qrels, split="train", path="mem")


def test_build_pairs_dataset_one_row_per_relevant_pair():
    dataset = build_pairs_dataset(_pairs_data())
    assert set(dataset.column_names) == {"query_id", "query", "positive_id"}
    rows = dataset.to_list()
    assert len(rows) == 3
    assert sorted((r["query_id"], r["positive_id"]) for r in rows) == [("qa", "d0"), ("qa", "d1"), ("qb", "d3")]
    positives = positives_by_query(dataset)  # what the trainer's collator masks for each row's query
    for row in rows:
        assert row["query"] == {"qa": "query a", "qb": "query b"}[row["query_id"]]
        expected = {"qa": ["d0", "d1"], "qb": ["d3"]}[row["query_id"]]
        assert sorted(positives[row["query_id"]]) == expected
        assert row["positive_id"] in positives[row["query_id"]]
    assert all(r["positive_id"] not in ("d2", "d4", "d5") for r in rows)
    assert all("d2" not in docs for docs in positives.values())


def test_build_pairs_dataset_min_relevance():
    dataset = build_pairs_dataset(_pairs_data(), min_relevance=2)
    assert [(r["query_id"], r["positive_id"]) for r in dataset.to_list()] == [("qa", "d1")]
    assert positives_by_query(dataset) == {"qa": ["d1"]}


def test_build_pairs_dataset_no_relevant_pairs():
    data = _pairs_data()
    data.qrels = {"qc": {"d4": 0}}
    with pytest.raises(DataError, match="no relevant"):
        build_pairs_dataset(data)


def test_build_pairs_dataset_from_loaded_synthetic(beir_dir):
    data = load_beir(beir_dir, split="train")
    dataset = build_pairs_dataset(data)
    rows = dataset.to_list()
    assert len(rows) == sum(1 for docs in data.qrels.values() for s in docs.values() if s >= 1)
    positives = positives_by_query(dataset)
    for row in rows:
        assert sorted(positives[row["query_id"]]) == sorted(data.qrels[row["query_id"]])


# ----------------------------------------------------------------------------- qrels I/O


def test_write_qrels_load_qrels_round_trip(tmp_path):
    qrels = {"q1": {"d1": 1, "d2": 0}, "q 2": {"d3": 2}, "q3": {"d-4": 3, "d5": 1}}
    path = tmp_path / "nested" / "qrels" / "dev.tsv"
    write_qrels(qrels, path)
    assert path.read_text().splitlines()[0] == "query-id\tcorpus-id\tscore"
    assert not path.with_name("dev.tsv.tmp").exists()
    assert load_qrels(path) == qrels


def test_load_qrels_without_header_and_float_scores(tmp_path):
    path = tmp_path / "q.tsv"
    path.write_text("q1\td1\t1\nq1\td2\t2.0\n")
    assert load_qrels(path) == {"q1": {"d1": 1, "d2": 2}}


def test_load_qrels_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such qrels file"):
        load_qrels(tmp_path / "nope.tsv")
