"""Every checkpoint, and every mid-training push made from one, is a whole artifact: its ``qret_config.json`` names
the document encoder, which is there, so ``add_documents`` works on what the Hub holds at any commit."""

from __future__ import annotations

import json
from pathlib import Path

from test_hub import FakeHub
from test_trainer import make_args

from hf_qret import QRetTrainer, QuantizedRetriever, build_pairs_dataset, load_beir


def test_checkpoints_and_mid_training_pushes_carry_the_document_encoder(tiny_model, beir_dir, tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    hub = FakeHub().install(monkeypatch)
    pushed: list[tuple[set, dict]] = []

    def upload_folder(api, *, repo_id, folder_path, **kwargs):
        result = hub.upload_folder(api, repo_id=repo_id, folder_path=folder_path, **kwargs)
        config = json.loads((Path(folder_path) / "qret_config.json").read_text())
        pushed.append((hub.uploads[-1]["files"], config))  # what the commit holds, read when it is made
        return result

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    data = load_beir(beir_dir, split="train")
    args = make_args(tmp_path, push_to_hub=True, hub_model_id="me/tiny-qret", hub_strategy="every_save",
                     save_strategy="steps", save_steps=2, max_steps=4)  # fmt: skip
    trainer = QRetTrainer(tiny_model, args, build_pairs_dataset(data), corpus=str(beir_dir))  # saves the encoder
    trainer.train()
    out = Path(args.output_dir)
    assert len(pushed) == 2  # steps 2 and 4
    for files, config in pushed:
        assert config["document_encoder"] == "document_encoder" and "document_encoder/modules.json" in files
    for step in (2, 4):
        checkpoint = out / f"checkpoint-{step}"
        assert json.loads((checkpoint / "qret_config.json").read_text())["document_encoder"] == "document_encoder"
        retriever = QuantizedRetriever.from_pretrained(checkpoint, "cpu")
        retriever.add_documents(["A new abstract about vitamin D."], ["new"])
        assert retriever.index.ntotal == len(data.doc_ids) + 1
    # the checkpoint's document encoder is the run's (hard links of the same files where the file system allows)
    for name in ("modules.json", "model.safetensors"):
        run_file = next((out / "document_encoder").rglob(name))
        twin = out / "checkpoint-4" / run_file.relative_to(out)
        assert twin.read_bytes() == run_file.read_bytes()
