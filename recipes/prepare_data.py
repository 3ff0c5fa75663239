"""Re-creates recipes/data/scifact from a BEIR SciFact folder: compresses the corpus and queries and carves a dev
split (20 % of the training claims, seed 13) out of qrels/train.tsv.

    python recipes/prepare_data.py SRC_BEIR_FOLDER recipes/data/scifact
"""

from __future__ import annotations

import argparse
import gzip
import shutil
from pathlib import Path

from hf_qret.data import carve_dev_split, load_qrels, write_qrels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    parser.add_argument("--dev_fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=13)
    args = parser.parse_args()
    args.target.mkdir(parents=True, exist_ok=True)
    for name in ("corpus.jsonl", "queries.jsonl"):
        with (
            open(args.source / name, "rb") as src,
            gzip.GzipFile(args.target / f"{name}.gz", "wb", compresslevel=9, mtime=0) as dst,
        ):
            shutil.copyfileobj(src, dst)
    train, dev = carve_dev_split(load_qrels(args.source / "qrels" / "train.tsv"), args.dev_fraction, args.seed)
    write_qrels(train, args.target / "qrels" / "train.tsv")
    write_qrels(dev, args.target / "qrels" / "dev.tsv")
    print(f"train: {len(train)} queries, dev: {len(dev)} queries")


if __name__ == "__main__":
    main()
