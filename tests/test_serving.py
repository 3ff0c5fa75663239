"""Serving like a library: the light import path, the transformers-only encoder, and growing a trained index with
``QuantizedRetriever.add_documents``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT, half_corpus_beir
from test_cli import recipe_argv

from hf_qret.cli import train_main
from hf_qret.errors import ArtifactError, DataError
from hf_qret.serving.encoder import encode_texts

#: What serving must not import (the training stack).
TRAINING_STACK = ("transformers.trainer", "peft", "datasets", "evaluate", "accelerate", "matplotlib")


def run_python(code: str, *args: str) -> dict:
    """Runs ``code`` in a fresh interpreter on this source tree; its last stdout line is JSON."""
    env_path = str(REPO_ROOT)
    result = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "PYTHONPATH": env_path, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------- light imports
def test_serving_import_skips_the_training_stack():
    loaded = run_python(
        "import json, sys\n"
        "from hf_qret import QuantizedRetriever\n"
        "import hf_qret.serving.retriever\n"
        f"print(json.dumps({{m: m in sys.modules for m in {TRAINING_STACK + ('sentence_transformers',)!r}}}))\n"
    )
    assert not any(loaded.values()), loaded


def test_lazy_package_exposes_every_public_name():
    import hf_qret

    for name in hf_qret.__all__:
        assert getattr(hf_qret, name) is not None, name
    assert set(hf_qret.__all__) <= set(dir(hf_qret))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        hf_qret.nope  # noqa: B018


# ----------------------------------------------------------------------------------------------------- encoder
def test_sentence_encoder_embeds_exactly_like_sentence_transformers(tiny_model_dir, tmp_path):
    from sentence_transformers import SentenceTransformer

    from hf_qret.serving.sentence_encoder import SentenceEncoder, load_encoder

    texts = ["  Protein Gene cell ", "virus " * 200, "x"]  # stripped, truncated at max_seq_length, padded
    encoder = SentenceEncoder.from_folder(tiny_model_dir, "cpu")
    assert encoder is not None and encoder.max_seq_length == 64
    reference = SentenceTransformer(tiny_model_dir, device="cpu")
    np.testing.assert_array_equal(encode_texts(encoder, texts), reference.encode(texts, convert_to_numpy=True))
    # a folder with another module (here a Dense layer) is left to sentence-transformers
    modules = json.loads((Path(tiny_model_dir) / "modules.json").read_text())
    other = tmp_path / "dense"
    __import__("shutil").copytree(tiny_model_dir, other)
    modules.insert(2, {"idx": 9, "name": "9", "path": "9_Dense", "type": "sentence_transformers.models.Dense"})
    (other / "modules.json").write_text(json.dumps(modules))
    assert SentenceEncoder.from_folder(other) is None
    assert isinstance(load_encoder(tiny_model_dir, "cpu"), SentenceEncoder)


# -------------------------------------------------------------------------------------------- growing the index
@pytest.fixture(scope="module")
def half_artifact(tiny_model_dir, tmp_path_factory):
    """The recipe (2 steps) over the first 200 of 300 documents; the other 100 (no training positives) are left
    to add. Returns the artifact folder, the full BEIR folder and the added documents."""
    base = tmp_path_factory.mktemp("grow")
    data, added = half_corpus_beir(base)
    out = base / "out"
    train_main(recipe_argv(tiny_model_dir, data, out, "--max_steps", "2", "--index_factory", "PQ4x4"))
    return out, added


def test_recipe_ships_the_document_encoder_the_bank_was_built_with(half_artifact, tiny_model_dir):
    from safetensors.numpy import load_file
    from sentence_transformers import SentenceTransformer

    from hf_qret import QuantizedRetriever, load_beir

    out, _ = half_artifact
    config = json.loads((out / "qret_config.json").read_text())
    assert config["document_encoder"] == "document_encoder" and (out / "document_encoder" / "modules.json").is_file()
    retriever = QuantizedRetriever.from_pretrained(out, device="cpu")
    # rows training did not move are exactly the document encoder's (= the pretrained model's) embeddings
    data = load_beir(out.parent / "half", split="train")
    positives = {d for docs in data.qrels.values() for d in docs}
    untouched = [i for i, d in enumerate(data.doc_ids) if d not in positives][:20]
    texts = [data.doc_texts()[i] for i in untouched]
    bank = load_file(str(out / "bank.safetensors"))["embeddings"]
    precision = config["document_precision"]  # the bank's encoding precision ('auto': bf16 on a CPU with AMX)
    shipped = encode_texts(retriever.document_encoder, texts, precision=precision)
    np.testing.assert_allclose(shipped, bank[untouched], atol=1e-6)
    pretrained = SentenceTransformer(tiny_model_dir, device="cpu")
    np.testing.assert_allclose(shipped, encode_texts(pretrained, texts, precision=precision), atol=1e-6)
    np.testing.assert_allclose(shipped, pretrained.encode(texts, convert_to_numpy=True), atol=2e-2)


def test_add_documents_encodes_codes_and_saves_the_grown_artifact(half_artifact, tmp_path):
    from hf_qret import QuantizedRetriever

    out, added = half_artifact
    ids = list(added)
    texts = [f"{doc['title']} {doc['text']}" for doc in added.values()]
    retriever = QuantizedRetriever.from_pretrained(out, device="cpu")
    before = retriever.index.reconstruct_all()
    retriever.add_documents(texts, ids)
    assert retriever.index.ntotal == 300 and retriever.doc_ids[200:] == ids
    # the added rows carry the codes of the document encoder's embeddings under the unchanged codebooks
    grown = retriever.index.reconstruct_all()
    np.testing.assert_array_equal(grown[:200], before)
    expected = retriever.index.quantize(encode_texts(retriever.document_encoder, texts))
    np.testing.assert_allclose(grown[200:], expected, atol=1e-6)
    queries = ["protein gene cell", texts[-1]]
    hits = retriever.search(queries, k=300)
    assert {d for d, _ in hits[1]} >= set(ids)

    saved = retriever.save_pretrained(tmp_path / "grown")
    assert json.loads((out / "doc_ids.json").read_text()) == retriever.doc_ids[:200]  # the source is untouched
    reloaded = QuantizedRetriever.from_pretrained(saved, device="cpu", load_bank=True)
    assert reloaded.doc_ids == retriever.doc_ids and reloaded.config["num_vectors"] == 300
    assert reloaded.config["documents_added"] == 100
    assert reloaded.search(queries, k=10) == retriever.search(queries, k=10)
    bank = reloaded.files.bank.numpy()
    precision = retriever.config["document_precision"]  # the bank's, which add_documents encodes in
    np.testing.assert_allclose(
        bank[200:], encode_texts(retriever.document_encoder, texts, precision=precision), atol=1e-6
    )
    assert (saved / "document_encoder" / "modules.json").is_file() and (saved / "README.md").is_file()
    assert "| Documents | 300 |" in (saved / "README.md").read_text()


def test_retrain_index_trains_the_codebooks_on_every_served_row(half_artifact, tmp_path):
    """After growing, retrain_index() codes all 300 rows with codebooks trained on the grown bank (not on the 200
    rows the artifact was built on); encoder and bank are untouched, and the saved artifact serves the new index."""
    from safetensors.numpy import load_file

    from hf_qret import QuantizedRetriever

    out, added = half_artifact
    texts = [f"{doc['title']} {doc['text']}" for doc in added.values()]
    retriever = QuantizedRetriever.from_pretrained(out, device="cpu")  # bank not loaded: read from the folder
    retriever.add_documents(texts, list(added))
    grown_codes = retriever.index.reconstruct_all()
    retriever.retrain_index()
    bank = np.concatenate([load_file(str(out / "bank.safetensors"))["embeddings"],
                           encode_texts(retriever.document_encoder, texts)])  # fmt: skip
    retrained = retriever.index.reconstruct_all()
    assert retriever.index.ntotal == 300 and not np.allclose(retrained, grown_codes)
    np.testing.assert_allclose(retrained, retriever.index.quantize(bank), atol=1e-5)
    # the new codebooks fit the grown bank at least as well as the ones trained on its first 200 rows
    assert np.square(retrained - bank).sum() <= np.square(grown_codes - bank).sum()
    saved = retriever.save_pretrained(tmp_path / "retrained")
    reloaded = QuantizedRetriever.from_pretrained(saved, device="cpu")
    np.testing.assert_allclose(reloaded.index.reconstruct_all(), retrained, atol=1e-6)
    assert reloaded.config["num_vectors"] == 300


def test_add_documents_refuses_duplicate_ids_clearly(half_artifact):
    from hf_qret import QuantizedRetriever

    out, _ = half_artifact
    retriever = QuantizedRetriever.from_pretrained(out, device="cpu")
    existing = retriever.doc_ids[0]
    with pytest.raises(DataError, match=f"already in the index \\(first: '{existing}'\\)"):
        retriever.add_documents(["text a", "text b"], ["brand-new", existing])
    with pytest.raises(DataError, match="'n1' is given twice"):
        retriever.add_documents(["a", "b"], ["n1", "n1"])
    with pytest.raises(DataError, match="2 texts but 1 ids"):
        retriever.add_documents(["a", "b"], ["n1"])
    assert retriever.index.ntotal == 200 and len(retriever.doc_ids) == 200  # nothing was added


def test_add_documents_needs_a_document_encoder(half_artifact, tmp_path, tiny_model_dir):
    import shutil

    from hf_qret import QuantizedRetriever

    out, _ = half_artifact
    bare = tmp_path / "bare"
    shutil.copytree(out, bare, ignore=shutil.ignore_patterns("document_encoder"))
    config = json.loads((bare / "qret_config.json").read_text())
    del config["document_encoder"]
    (bare / "qret_config.json").write_text(json.dumps(config))
    retriever = QuantizedRetriever.from_pretrained(bare, device="cpu")
    with pytest.raises(ArtifactError, match="no document encoder"):
        retriever.add_documents(["a text"], ["new"])
    # ... or one given explicitly, and a shipped corpus grows with the index
    (bare / "corpus.jsonl").write_text(json.dumps({"_id": retriever.doc_ids[0], "title": "T", "text": "x"}) + "\n")
    retriever = QuantizedRetriever.from_pretrained(
        bare, device="cpu", document_encoder=tiny_model_dir, load_corpus=False
    )
    retriever.add_documents(["a new text"], ["new"])
    retriever.save_pretrained(bare)
    reloaded = QuantizedRetriever.from_pretrained(bare, device="cpu")
    assert reloaded.corpus == {retriever.doc_ids[0]: "T x", "new": "a new text"}
    assert reloaded.doc_ids[-1] == "new" and reloaded.index.ntotal == 201


def r_has(hits: list, doc_id: str) -> bool:
    return any(d == doc_id for d, _ in hits)


def test_serving_and_growing_skip_the_training_stack(half_artifact):
    out, added = half_artifact
    result = run_python(
        "import json, sys\n"
        "from hf_qret import QuantizedRetriever\n"
        "r = QuantizedRetriever.from_pretrained(sys.argv[1], device='cpu')\n"
        "r.add_documents(['protein gene cell'], ['new-doc'])\n"
        "hits = r.search(['protein gene cell'], k=3)\n"
        f"print(json.dumps({{'hits': hits, 'loaded': [m for m in {TRAINING_STACK + ('sentence_transformers',)!r} "
        "if m in sys.modules]}))\n",
        str(out),
    )
    assert len(result["hits"][0]) == 3 and r_has(result["hits"][0], "new-doc")
    # transformers imports accelerate itself when it is installed; the rest of the training stack stays out
    assert set(result["loaded"]) <= {"accelerate"}, result["loaded"]


def test_the_evaluator_computes_metrics_without_the_evaluate_module():
    result = run_python(
        "import json, sys\n"
        "from hf_qret.evaluation.evaluator import RetrievalEvaluator\n"
        "from hf_qret.evaluation.metrics import compute_metrics\n"
        "qrels = {'q1': {'d1': 1}, 'q2': {'d3': 1}}\n"
        "runs = {'quantized': {'q1': {'d1': 0.5, 'd2': 0.9}, 'q2': {'d3': 0.1}}}\n"
        "evaluator = RetrievalEvaluator({'q1': 'a', 'q2': 'b'}, qrels, seen_doc_ids=['d1'])\n"
        "scores = evaluator.score(runs)\n"
        "assert scores['quantized_mrr@10'] == compute_metrics(runs['quantized'], qrels)['mrr@10'] == 0.75\n"
        "print(json.dumps({'scores': scores, 'evaluate': 'evaluate' in sys.modules}))\n"
    )
    assert result["evaluate"] is False and result["scores"]["quantized_mrr@10_seen"] == 0.5


def test_serving_core_works_without_the_train_extra(half_artifact, tmp_path):
    """Load, search, grow and save with the train extra's packages made unimportable (a serving-only install)."""
    from hf_qret.cli import TRAIN_EXTRA_MODULES

    blocked = [name for name in TRAIN_EXTRA_MODULES if name != "yaml"]  # pyyaml also comes with huggingface_hub
    result = run_python(
        "import json, sys\n"
        f"for name in {blocked!r}: sys.modules[name] = None  # import raises, find_spec says absent\n"
        "from hf_qret import QuantizedRetriever\n"
        "r = QuantizedRetriever.from_pretrained(sys.argv[1], device='cpu')\n"
        "r.add_documents(['protein gene cell'], ['new-doc'])\n"
        "saved = r.save_pretrained(sys.argv[2])\n"
        "hits = QuantizedRetriever.from_pretrained(saved, device='cpu').search(['protein gene cell'], k=201)\n"
        "print(json.dumps({'rows': len(hits[0]), 'new': any(d == 'new-doc' for d, _ in hits[0])}))\n",
        str(half_artifact[0]),
        str(tmp_path / "grown"),
    )
    assert result == {"rows": 201, "new": True}


def test_push_to_hub_uploads_the_grown_artifact(half_artifact, monkeypatch, tmp_path):
    from test_hub import FakeHub

    from hf_qret import QuantizedRetriever

    class RecordingHub(FakeHub):
        def upload_folder(self, api, *, repo_id, folder_path, **kwargs):
            self.doc_ids = json.loads((Path(folder_path) / "doc_ids.json").read_text())
            return super().upload_folder(api, repo_id=repo_id, folder_path=folder_path, **kwargs)

    hub = RecordingHub().install(monkeypatch)
    out, _ = half_artifact
    retriever = QuantizedRetriever.from_pretrained(out, device="cpu")
    retriever.add_documents(["protein gene cell"], ["pushed-doc"])
    retriever.push_to_hub("me/grown")
    upload = hub.uploads[0]
    assert hub.doc_ids[-1] == "pushed-doc" and len(hub.doc_ids) == 201
    assert {"index.faiss", "bank.safetensors", "document_encoder/model.safetensors"} <= upload["files"]
    assert "| Documents | 201 |" in upload["card"]
    # the loaded folder is untouched, and saving afterwards still writes the added document
    assert json.loads((out / "doc_ids.json").read_text())[-1] != "pushed-doc"
    saved = QuantizedRetriever.from_pretrained(retriever.save_pretrained(tmp_path / "later"), load_bank=True)
    assert saved.doc_ids[-1] == "pushed-doc" and len(saved.files.bank) == 201


# ------------------------------------------------------------------------------------- what a Hub download fetches
def fake_hub(monkeypatch, repo: Path, cache: Path) -> list[list[str]]:
    """``snapshot_download`` served from the local folder ``repo`` into a snapshot folder under ``cache``, applying
    the allow / ignore patterns as huggingface_hub does; returns the files each call downloaded."""
    import shutil

    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    calls: list[list[str]] = []
    commit = "0123456789abcdef0123456789abcdef01234567"

    def snapshot_download(repo_id, revision=None, allow_patterns=None, ignore_patterns=None, **kwargs):
        assert revision in (None, "main", commit)
        snapshot = cache / "snapshots" / commit
        files = sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file())
        chosen = list(filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
        for name in chosen:
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(repo / name, snapshot / name)
        calls.append(chosen)
        snapshot.mkdir(parents=True, exist_ok=True)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_serving_downloads_only_what_serving_needs(half_artifact, tmp_path, monkeypatch):
    """from_pretrained("user/repo") fetches the encoder, index, ids, config and card; the bank and
    document_encoder/ come only when add_documents / retrain_index / load_bank=True need them."""
    from hf_qret import QuantizedRetriever

    out, added = half_artifact
    calls = fake_hub(monkeypatch, out, tmp_path / "cache")
    retriever = QuantizedRetriever.from_pretrained("me/repo", device="cpu")
    first = calls[0]
    assert {"index.faiss", "doc_ids.json", "qret_config.json", "model.safetensors"} <= set(first)
    assert "bank.safetensors" not in first and not any(f.startswith("document_encoder/") for f in first)
    hits = retriever.search(["protein gene cell"], k=5)
    assert len(hits[0]) == 5 and len(calls) == 1  # serving needed nothing more
    # growing: the document encoder is fetched when add_documents needs it, the bank when retrain_index does
    texts = [f"{doc['title']} {doc['text']}" for doc in added.values()]
    retriever.add_documents(texts[:3], list(added)[:3])
    assert calls[1] and all(f.startswith("document_encoder/") for f in calls[1]) and len(calls) == 2
    retriever.retrain_index()
    assert calls[2] == ["bank.safetensors"]
    # load_bank=True downloads the bank with the rest, still not the document encoder
    with_bank = QuantizedRetriever.from_pretrained("me/repo", device="cpu", load_bank=True)
    assert "bank.safetensors" in calls[3] and not any(f.startswith("document_encoder/") for f in calls[3])
    assert with_bank.files.bank is not None and len(with_bank.files.bank) == 200


def test_lazy_bank_missing_from_the_repo_is_one_clear_error(half_artifact, tmp_path, monkeypatch):
    import shutil

    from hf_qret import QuantizedRetriever

    out, _ = half_artifact
    repo = tmp_path / "repo"
    shutil.copytree(out, repo, ignore=shutil.ignore_patterns("bank.safetensors"))
    fake_hub(monkeypatch, repo, tmp_path / "cache")
    retriever = QuantizedRetriever.from_pretrained("me/repo", device="cpu")
    with pytest.raises(ArtifactError, match="no bank"):
        retriever.retrain_index()
    with pytest.raises(ArtifactError, match="lacks it"):
        QuantizedRetriever.from_pretrained("me/repo", device="cpu", load_bank=True)
