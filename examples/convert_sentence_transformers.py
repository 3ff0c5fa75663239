"""Before and after: ``train_sentence_transformers.py`` is a typical sentence-transformers training script
(MultipleNegativesRankingLoss, in-batch negatives); ``convert_sentence_transformers.py`` is the same script converted
to hf-qret, training the encoder and the corpus embeddings for the quantized index they will be served from. They
differ only by ``convert_sentence_transformers.diff``: the trainer and arguments classes, the index option and
``corpus=`` in place of the loss. The data (text pairs), the corpus and the evaluator stay as they are.

    python examples/train_sentence_transformers.py --data_dir recipes/data/scifact --output_dir runs/st-mnrl
    python examples/convert_sentence_transformers.py --data_dir recipes/data/scifact --output_dir runs/st-qret
"""

import argparse

from datasets import Dataset
from sentence_transformers import SentenceTransformer
from hf_qret import QRetTrainer, QRetTrainingArguments
from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

from hf_qret import load_beir
from hf_qret.config import resolve_model_path
from hf_qret.data import doc_text

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
parser.add_argument("--data_dir", default="recipes/data/scifact")
parser.add_argument("--eval_split", default="dev")
parser.add_argument("--output_dir", required=True)
parser.add_argument("--epochs", type=float, default=1.0)
parser.add_argument("--max_steps", type=int, default=-1)
parser.add_argument("--batch_size", type=int, default=32)
parser.add_argument("--bf16", action="store_true")
cli = parser.parse_args()

train, dev = load_beir(cli.data_dir, split="train"), load_beir(cli.data_dir, split=cli.eval_split)
model = SentenceTransformer(resolve_model_path(cli.model))
corpus = {doc_id: doc_text(doc) for doc_id, doc in train.corpus.items()}  # {doc_id: text}

pairs = [(train.queries[q], corpus[d]) for q, docs in train.qrels.items() for d in docs if docs[d] > 0]
train_dataset = Dataset.from_dict({"anchor": [q for q, _ in pairs], "positive": [p for _, p in pairs]})
relevant = {q: {d for d, score in docs.items() if score > 0} for q, docs in dev.qrels.items()}
evaluator = InformationRetrievalEvaluator(queries=dev.queries, corpus=corpus, relevant_docs=relevant, name="dev")

args = QRetTrainingArguments(output_dir=cli.output_dir, num_train_epochs=cli.epochs,
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
trainer = QRetTrainer(model=model, args=args, train_dataset=train_dataset, corpus=corpus, evaluator=evaluator)
trainer.train()
print(trainer.evaluate())
trainer.save_model()
