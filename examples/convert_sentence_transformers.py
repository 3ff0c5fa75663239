"""Before and after: ``train_sentence_transformers.py`` is a typical sentence-transformers training script
(MultipleNegativesRankingLoss, in-batch negatives); ``convert_sentence_transformers.py`` is the same script converted
to hf-qret, training the encoder and the corpus embeddings for the quantized index they will be served from. They
differ only by ``convert_sentence_transformers.diff``.

    python examples/train_sentence_transformers.py --data_dir recipes/data/scifact --output_dir runs/st-mnrl
    python examples/convert_sentence_transformers.py --data_dir recipes/data/scifact --output_dir runs/st-qret
"""

import argparse
from functools import partial

from sentence_transformers import SentenceTransformer

from hf_qret import QRetTrainer, QRetTrainingArguments, RetrievalEvaluator, TargetBank, build_pairs_dataset, load_beir
from hf_qret.config import resolve_model_path
from hf_qret.encoder import encode_texts

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
parser.add_argument("--data_dir", default="recipes/data/scifact")
parser.add_argument("--eval_split", default="dev")
parser.add_argument("--output_dir", required=True)
parser.add_argument("--index_factory", default="OPQ16,PQ16")
parser.add_argument("--epochs", type=float, default=1.0)
parser.add_argument("--max_steps", type=int, default=-1)
parser.add_argument("--batch_size", type=int, default=32)
parser.add_argument("--bf16", action="store_true")
cli = parser.parse_args()

train, dev = load_beir(cli.data_dir, split="train"), load_beir(cli.data_dir, split=cli.eval_split)
model = SentenceTransformer(resolve_model_path(cli.model))

train_dataset = build_pairs_dataset(train)  # rows of (query, positive doc id): the documents live in the bank
bank = TargetBank.from_encoder(partial(encode_texts, model), train.doc_texts(), train.doc_ids)  # replaces the loss

args = QRetTrainingArguments(
    output_dir=cli.output_dir,
    index_factory=cli.index_factory,
    num_train_epochs=cli.epochs,
    max_steps=cli.max_steps,
    per_device_train_batch_size=cli.batch_size,
    learning_rate=2e-5,
    warmup_steps=0.1,  # a float: a share of the steps (transformers 5)
    bf16=cli.bf16,
    eval_strategy="epoch",
    logging_steps=10,
    save_strategy="no",
    report_to="none",
    seed=42,
)
evaluator = RetrievalEvaluator(dev.queries, dev.qrels)
trainer = QRetTrainer(
    model=model,
    args=args,
    train_dataset=train_dataset,
    bank=bank,
    evaluator=evaluator,
)
trainer.train()
print(trainer.evaluate())
trainer.save_model(cli.output_dir)
