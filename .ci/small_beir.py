"""Writes a small BEIR folder for the wheel check: the first N SciFact documents and the train/dev claims whose
relevant documents are all among them.

    python .ci/small_beir.py recipes/data/scifact OUT_DIR [--docs 400]
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
from pathlib import Path


def _lines(folder: Path, name: str) -> list[dict]:
    path = folder / name if (folder / name).is_file() else folder / f"{name}.gz"
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source")
    parser.add_argument("target")
    parser.add_argument("--docs", type=int, default=400)
    args = parser.parse_args()
    source, target = Path(args.source), Path(args.target)
    corpus = _lines(source, "corpus.jsonl")[: args.docs]
    kept = {str(doc["_id"]) for doc in corpus}
    (target / "qrels").mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    for split in ("train", "dev"):
        with open(source / "qrels" / f"{split}.tsv", encoding="utf-8") as handle:
            rows = list(csv.reader(handle, delimiter="\t"))[1:]
        by_query: dict[str, list[list[str]]] = {}
        for row in rows:
            by_query.setdefault(row[0], []).append(row)
        chosen = [r for rs in by_query.values() if all(r[1] in kept for r in rs) for r in rs]
        used |= {r[0] for r in chosen}
        with open(target / "qrels" / f"{split}.tsv", "w", encoding="utf-8") as handle:
            handle.write("query-id\tcorpus-id\tscore\n" + "".join("\t".join(r) + "\n" for r in chosen))
        print(f"{split}: {len({r[0] for r in chosen})} queries")
    with open(target / "corpus.jsonl", "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(doc, ensure_ascii=False) + "\n" for doc in corpus)
    queries = [q for q in _lines(source, "queries.jsonl") if str(q["_id"]) in used]
    with open(target / "queries.jsonl", "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(q, ensure_ascii=False) + "\n" for q in queries)
    print(f"{len(corpus)} documents -> {target}")


if __name__ == "__main__":
    main()
