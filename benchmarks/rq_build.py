"""Time of one ``RQ16x8`` index build (codebook training + encoding), what a ``refresh_mode: retrain`` refresh costs,
over a saved bank, with ``rq_beam_size`` 1 (the default) and FAISS's 5. Prints one JSON object:
``{"rows", "dim", "beam1_s", "beam5_s", "cpu", "amx", "avx512f", "avx2"}``.

    python benchmarks/rq_build.py --bank scifact_bank.npy   # e.g. a --bank_init_file of the recipe
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from hf_qret.index.core import QuantizedIndex


def cpu_info() -> dict:
    """The CPU's model name and whether it has AMX, AVX-512 and AVX2 (Linux ``/proc/cpuinfo``)."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return {"cpu": None}
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), None)
    return {"cpu": model, "amx": "amx_tile" in flags, "avx512f": "avx512f" in flags, "avx2": "avx2" in flags}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bank", required=True, help="a float32 .npy bank (rows in corpus order)")
    parser.add_argument("--factory", default="RQ16x8")
    args = parser.parse_args()
    rows = np.load(args.bank).astype("float32")
    out = {"rows": int(rows.shape[0]), "dim": int(rows.shape[1]), "factory": args.factory}
    for beam in (1, 5):
        index = QuantizedIndex(rows.shape[1], args.factory, rq_beam_size=beam)
        start = time.perf_counter()
        index.build(rows)
        out[f"beam{beam}_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps({**out, **cpu_info()}))


if __name__ == "__main__":
    main()
