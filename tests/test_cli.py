"""The recipe entry point (``train``) and ``hf-qret evaluate`` with a tiny model on synthetic data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytrec_eval
from conftest import REPO_ROOT, synthetic_beir, write_beir

from hf_qret.cli import evaluate_main, main, train_main
from hf_qret.errors import ConfigError, DataError


def recipe_argv(model_dir: str, data_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        str(REPO_ROOT / "recipes" / "scifact.yaml"),
        "--model_name_or_path",
        model_dir,
        "--data_dir",
        str(data_dir),
        "--eval_split",
        "dev",
        "--output_dir",
        str(out),
        "--index_factory",
        "PQ4",
        "--num_negatives",
        "8",
        "--per_device_train_batch_size",
        "8",
        "--max_steps",
        "4",
        "--logging_steps",
        "2",
        "--use_cpu",
        "true",
        "--dataloader_pin_memory",
        "false",
        *extra,
    ]


@pytest.fixture()
def trained(tiny_model_dir, two_split_dir, tmp_path):
    out = tmp_path / "out"
    results = train_main(recipe_argv(tiny_model_dir, two_split_dir, out))
    return out, results, two_split_dir


def test_recipe_trains_and_writes_the_artifact(trained):
    out, results, _ = trained
    for name in (
        "index.faiss",
        "doc_ids.json",
        "bank.safetensors",
        "qret_config.json",
        "modules.json",
        "eval_results.json",
    ):
        assert (out / name).is_file(), name
    assert results["bytes_per_vector"] == 4
    assert set(results) >= {"untrained", "trained"}
    assert 0 <= results["trained"]["trained_quantized_ndcg@10"] <= 1
    # the seen/unseen slices of the dev split are reported
    assert "trained_quantized_ndcg@10_unseen" in results["trained"]


def test_evaluate_prints_contract_json_and_matching_run_file(trained, capsys, tmp_path):
    out, _, data_dir = trained
    run_file = tmp_path / "runs" / "dev.trec"
    assert main(["evaluate", str(out), "--data", str(data_dir), "--split", "dev", "--run-file", str(run_file)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(last)
    assert result["split"] == "dev" and result["queries"] == 20 and result["bytes_per_vector"] == 4
    for kind in ("flat", "quantized"):
        assert set(result[kind]) == {"ndcg@10", "recall@100", "mrr@10"}
    # pytrec_eval on the written run file gives the reported quantized numbers
    with open(run_file) as handle:
        run = pytrec_eval.parse_run(handle)
    lines = run_file.read_text().splitlines()
    assert len(lines[0].split()) == 6 and lines[0].split()[1] == "Q0" and lines[0].split()[3] == "1"
    from hf_qret.data import load_qrels

    qrels = load_qrels(data_dir / "qrels" / "dev.tsv")
    scores = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.100"}).evaluate(run)
    ndcg = sum(s["ndcg_cut_10"] for s in scores.values()) / len(qrels)
    recall = sum(s["recall_100"] for s in scores.values()) / len(qrels)
    assert ndcg == pytest.approx(result["quantized"]["ndcg@10"], abs=1e-6)
    assert recall == pytest.approx(result["quantized"]["recall@100"], abs=1e-6)


def test_evaluate_seen_unseen_slices(trained, capsys):
    out, _, data_dir = trained
    result = evaluate_main(
        [str(out), "--data", str(data_dir), "--split", "dev", "--seen-qrels", str(data_dir / "qrels" / "train.tsv")]
    )
    assert result["seen"]["queries"] + result["unseen"]["queries"] == result["queries"]
    assert set(result["unseen"]["quantized"]) == {"ndcg@10", "recall@100", "mrr@10"}


def test_evaluate_refuses_another_corpus(trained, tmp_path):
    out, _, _ = trained
    corpus, queries, qrels = synthetic_beir(num_docs=120, seed=3)
    other = write_beir(
        tmp_path / "other",
        corpus,
        queries,
        {q: d for q, d in qrels.items() if all(int(x[1:]) < 120 for x in d)},
        "test",
    )
    with pytest.raises(DataError, match="does not match the artifact"):
        evaluate_main([str(out), "--data", str(other), "--split", "test"])


def test_invalid_factory_is_refused_before_encoding(tiny_model_dir, two_split_dir, tmp_path):
    argv = recipe_argv(tiny_model_dir, two_split_dir, tmp_path / "bad") + ["--index_factory", "PQ5"]
    with pytest.raises(ConfigError, match="invalid --index_factory 'PQ5'"):
        train_main(argv)
    assert not (tmp_path / "bad" / "index.faiss").exists()


def test_cli_overrides_beat_the_yaml_and_yaml_paths_are_relative_to_the_file(tmp_path):
    from hf_qret.config import parse_config

    config = tmp_path / "conf" / "c.yaml"
    config.parent.mkdir()
    config.write_text("data_dir: data/x\nnum_negatives: 7\nindex_factory: PQ8\noutput_dir: o\n")
    _, data_args, training_args = parse_config([str(config), "--num_negatives", "9"])
    assert training_args.num_negatives == 9 and training_args.index_factory == "PQ8"
    assert data_args.data_dir == str((config.parent / "data" / "x").resolve())
    with pytest.raises(ConfigError, match="unknown option"):
        parse_config([str(config), "--no_such_option", "1"])


@pytest.mark.parametrize(
    "breakage", ["no_folder", "bad_json", "missing_doc", "duplicate_ids", "empty_queries", "no_qrels", "bad_factory"]
)
def test_recipe_user_errors_exit_2_with_one_line_and_no_artifact(tiny_model_dir, two_split_dir, tmp_path, breakage):
    data_dir = two_split_dir
    extra: list[str] = []
    if breakage == "no_folder":
        data_dir = tmp_path / "nowhere"
    elif breakage == "bad_json":
        with open(data_dir / "corpus.jsonl", "a") as handle:
            handle.write("{not json\n")
    elif breakage == "missing_doc":
        with open(data_dir / "qrels" / "train.tsv", "a") as handle:
            handle.write("q0\tghost-doc\t1\n")
    elif breakage == "duplicate_ids":
        first = (data_dir / "corpus.jsonl").read_text().splitlines()[0]
        with open(data_dir / "corpus.jsonl", "a") as handle:
            handle.write(first + "\n")
    elif breakage == "empty_queries":
        (data_dir / "queries.jsonl").write_text("")
    elif breakage == "no_qrels":
        for path in (data_dir / "qrels").iterdir():
            path.unlink()
    else:
        extra = ["--index_factory", "IVF0,PQ3"]
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "recipes" / "train.py"), *recipe_argv(tiny_model_dir, data_dir, out, *extra)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1
    assert not (out / "index.faiss").exists()


@pytest.mark.parametrize(
    ("missing", "package"),
    [("sentence_transformers", "sentence-transformers"), ("accelerate", "accelerate"), ("datasets", "datasets")],
)
def test_train_on_a_serving_only_install_says_to_install_the_train_extra(
    missing, package, monkeypatch, capsys, tmp_path
):
    """`hf-qret train` and recipes/train.py check the train extra before anything else (here: before the data)."""
    import runpy

    monkeypatch.setitem(sys.modules, missing, None)  # import raises, find_spec says absent: as if not installed
    argv = [str(REPO_ROOT / "recipes" / "scifact.yaml"), "--data_dir", str(tmp_path / "none"), "--output_dir",
            str(tmp_path / "out")]  # fmt: skip
    assert main(["train", *argv]) == 2
    monkeypatch.setattr(sys, "argv", ["recipes/train.py", *argv])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(REPO_ROOT / "recipes" / "train.py"), run_name="__main__")
    assert exited.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and errors[0] == errors[1], errors
    assert errors[0].startswith("error: hf-qret train needs the train extra, and ") and package in errors[0]
    assert errors[0].endswith("pip install 'hf-qret[train]'")
    assert not (tmp_path / "out").exists()
