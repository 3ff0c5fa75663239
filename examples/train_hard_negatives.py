"""Start from ``sentence_transformers.util.mine_hard_negatives``: its (anchor, positive, negative_1, ...) rows train
hf-qret as they are. The negatives' documents join every batch's candidates mined from the quantized index; the
corpus is given as ``{doc_id: text}`` and the bank is built from it (plus any text of the data not in it).

    python examples/train_hard_negatives.py --data_dir recipes/data/scifact --output_dir runs/st-hard-negatives
"""

import argparse

from datasets import Dataset
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator
from sentence_transformers.util import mine_hard_negatives

from hf_qret import QRetTrainer, QRetTrainingArguments, QuantizedRetriever, load_beir
from hf_qret.config import resolve_model_path
from hf_qret.data import doc_text

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
parser.add_argument("--data_dir", default="recipes/data/scifact")
parser.add_argument("--eval_split", default="dev")
parser.add_argument("--output_dir", required=True)
parser.add_argument("--num_hard_negatives", type=int, default=3)
parser.add_argument("--index_factory", default="RQ16x8")
parser.add_argument("--epochs", type=float, default=1.0)
parser.add_argument("--max_steps", type=int, default=-1)
parser.add_argument("--batch_size", type=int, default=32)
cli = parser.parse_args()

train, dev = load_beir(cli.data_dir, split="train"), load_beir(cli.data_dir, split=cli.eval_split)
model = SentenceTransformer(resolve_model_path(cli.model))
corpus = {doc_id: doc_text(doc) for doc_id, doc in train.corpus.items()}

pairs = [(train.queries[q], corpus[d]) for q, docs in train.qrels.items() for d in docs if docs[d] > 0]
pairs = Dataset.from_dict({"anchor": [q for q, _ in pairs], "positive": [p for _, p in pairs]})
# (anchor, positive, negative_1, ..., negative_n): the documents ranked just below the positive by the base model
train_dataset = mine_hard_negatives(
    pairs,
    model,
    corpus=list(corpus.values()),
    num_negatives=cli.num_hard_negatives,
    range_min=5,
    range_max=50,
    output_format="n-tuple",
    batch_size=64,
)

relevant = {q: {d for d, score in docs.items() if score > 0} for q, docs in dev.qrels.items()}
evaluator = InformationRetrievalEvaluator(queries=dev.queries, corpus=corpus, relevant_docs=relevant, name="dev")
args = QRetTrainingArguments(
    output_dir=cli.output_dir,
    index_factory=cli.index_factory,
    num_train_epochs=cli.epochs,
    max_steps=cli.max_steps,
    per_device_train_batch_size=cli.batch_size,
    logging_steps=10,
    save_strategy="no",
    report_to="none",
)
trainer = QRetTrainer(model=model, args=args, train_dataset=train_dataset, corpus=corpus, evaluator=evaluator)
trainer.train()
print(trainer.evaluate())
trainer.save_model()
# corpus texts ship with the artifact: documents come back, not only ids
print(
    QuantizedRetriever.from_pretrained(cli.output_dir).search(
        [dev.queries[next(iter(dev.queries))]], k=3, return_text=True
    )
)
