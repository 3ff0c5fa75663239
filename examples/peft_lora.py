"""Train a LoRA query encoder together with the TargetBank, then save it the peft way and merged.

    python examples/peft_lora.py --data_dir recipes/data/scifact --output_dir runs/lora

Only the adapter (and the bank) trains; the base weights stay frozen. ``OUTPUT_DIR/adapter`` holds the adapter
(``adapter_config.json`` + ``adapter_model.safetensors``, on the base model its config names) next to the index;
``OUTPUT_DIR/merged`` holds a plain model with the adapter merged in. Both load with ``SentenceTransformer(path)``
and ``QuantizedRetriever.from_pretrained(path)``.
"""

import argparse
from functools import partial

from peft import LoraConfig
from sentence_transformers import SentenceTransformer

from hf_qret import (
    QRetTrainer,
    QRetTrainingArguments,
    QuantizedRetriever,
    RetrievalEvaluator,
    TargetBank,
    build_pairs_dataset,
    load_beir,
)
from hf_qret.config import resolve_model_path
from hf_qret.serving.encoder import encode_texts
from hf_qret.serving.peft_utils import add_adapter

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
parser.add_argument("--data_dir", default="recipes/data/scifact")
parser.add_argument("--eval_split", default="dev")
parser.add_argument("--output_dir", required=True)
parser.add_argument("--index_factory", default="RQ16x8")
parser.add_argument("--r", type=int, default=16, help="LoRA rank")
parser.add_argument("--epochs", type=float, default=4.0)
parser.add_argument("--max_steps", type=int, default=-1)
parser.add_argument("--batch_size", type=int, default=32)
parser.add_argument("--bf16", action="store_true")
cli = parser.parse_args()

train, dev = load_beir(cli.data_dir, split="train"), load_beir(cli.data_dir, split=cli.eval_split)
model = SentenceTransformer(resolve_model_path(cli.model))
bank = TargetBank.from_encoder(
    partial(encode_texts, model, role="document"), train.doc_texts(), train.doc_ids
)  # before the adapter

# LoRA on the attention projections of the transformers backbone (model[0].model becomes a peft.PeftModel).
lora = LoraConfig(r=cli.r, lora_alpha=2 * cli.r, lora_dropout=0.1, target_modules=["query", "value"])
model = add_adapter(model, lora)

args = QRetTrainingArguments(
    output_dir=cli.output_dir,
    index_factory=cli.index_factory,
    num_train_epochs=cli.epochs,
    max_steps=cli.max_steps,
    per_device_train_batch_size=cli.batch_size,
    learning_rate=5e-4,  # adapters take a larger learning rate than full fine-tuning
    bf16=cli.bf16,
    logging_steps=10,
    save_strategy="no",
    report_to="none",
    seed=42,
)
trainer = QRetTrainer(
    model=model,
    args=args,
    train_dataset=build_pairs_dataset(train),
    bank=bank,
    evaluator=RetrievalEvaluator(dev.queries, dev.qrels),
)
trainer.train()
print(trainer.evaluate())

trainer.save_model(f"{cli.output_dir}/adapter")  # adapter_config.json + adapter_model.safetensors + index
trainer.save_merged_model(f"{cli.output_dir}/merged")  # merge_and_unload: a plain model + index

query = next(iter(dev.queries.values()))
for kind in ("adapter", "merged"):
    retriever = QuantizedRetriever.from_pretrained(f"{cli.output_dir}/{kind}")
    print(kind, retriever.search([query], k=3)[0])
