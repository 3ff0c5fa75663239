"""A trained artifact indexed with codebooks trained on its *trained* bank vs on the *pretrained* bank.

Same encoder, same bank rows, same factory: only the data the codebooks are trained on differs (what
``refresh_mode: retrain`` vs ``incremental`` end with). Prints one JSON line per (codebooks, FAISS seed) with the
dev nDCG@10 of the quantized index over all / seen / unseen claims.

    python benchmarks/codebook_source.py runs/rq_sf --bank_init runs/bank_init.safetensors --seeds 1 2
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", help="a trained artifact folder (with bank.safetensors)")
    parser.add_argument("--bank_init", required=True, help="the pretrained bank (.safetensors / .npy), same rows")
    parser.add_argument("--data", default=str(REPO / "recipes" / "data" / "scifact"))
    parser.add_argument("--factory", help="default: the artifact's own index factory")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args(argv)

    from hf_qret.bank.storage import read_bank_file
    from hf_qret.cli import evaluate_main
    from hf_qret.index.faiss_ops import import_faiss
    from hf_qret.serving.artifact import INDEX_NAME, load_retrieval_files

    faiss = import_faiss()
    source = Path(args.artifact)
    files = load_retrieval_files(source, load_bank=True)
    factory = args.factory or files.config["index_factory"]
    trained = np.ascontiguousarray(files.bank.float32_rows()[:], dtype=np.float32)
    pretrained = np.ascontiguousarray(read_bank_file(Path(args.bank_init)).float().numpy(), dtype=np.float32)
    qrels = str(Path(args.data) / "qrels" / "train.tsv")
    results = []
    with tempfile.TemporaryDirectory() as work:
        for seed in args.seeds:
            for name, sample in (("trained_bank", trained), ("pretrained_bank", pretrained)):
                index = faiss.index_factory(trained.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
                node = faiss.downcast_index(index)
                for quantizer in ("rq", "pq"):
                    if hasattr(node, quantizer):
                        getattr(node, quantizer).cp.seed = seed
                index.train(sample)
                index.add(trained)
                target = Path(work) / f"{name}-{seed}"
                shutil.copytree(source, target, ignore=shutil.ignore_patterns("checkpoint-*"))
                faiss.write_index(index, str(target / INDEX_NAME))
                scores = evaluate_main([str(target), "--data", args.data, "--split", "dev", "--seen-qrels", qrels])
                result = {"codebooks": name, "seed": seed, "factory": factory,
                          **{part: round((scores if part == "all" else scores[part])["quantized"]["ndcg@10"], 4)
                             for part in ("all", "seen", "unseen")}}  # fmt: skip
                print(json.dumps(result), flush=True)
                results.append(result)
    return results


if __name__ == "__main__":
    main()
