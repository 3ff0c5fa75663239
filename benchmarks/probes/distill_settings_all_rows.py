"""Proxy: codebook-distillation settings on the trained IQA seed-42 bank (RQ16x8 built once, cloned per setting)."""
import sys, json, time, numpy as np
sys.path.insert(0, "/work/main/benchmarks"); sys.path.insert(0, "/work/main")
from pathlib import Path
from every_document import corpus_splits, seen_docs_of
from hf_qret.evaluation.evaluator import RetrievalEvaluator, search_run
from hf_qret.serving.retriever import QuantizedRetriever
from hf_qret.index.core import QuantizedIndex
from hf_qret.index.distill import distill_codebooks
art = Path(sys.argv[1]); cache = Path("/work/runs/adapter") / (art.parent.parent.name + art.name)
train, held = corpus_splits("insuranceqa", "/work/shared/data/insuranceqa")
r = QuantizedRetriever.from_pretrained(art, "cpu", load_bank=True)
doc_ids = r.doc_ids; bank = np.asarray(r.files.bank.local_numpy(), dtype="float32")
tq = np.load(cache / "tq.npy"); dq = np.load(cache / "dq.npy")
ev = RetrievalEvaluator(held.queries, held.qrels, seen_doc_ids=seen_docs_of(train))
def m3(idx):
    m = ev.score({"q": search_run(dq, ev.query_ids, idx, doc_ids, 10)}); return [round(m["q_ndcg@10"], 4), round(m["q_ndcg@10_unseen"], 4)]
rng = np.random.default_rng(42)
base = QuantizedIndex(bank.shape[1], "RQ16x8", normalize_decoded=True); base.build(bank)
print("plain", m3(base), flush=True)
def clone():
    c = QuantizedIndex.from_index(base.faiss.clone_index(base.index), "RQ16x8"); c.normalize_decoded = True; return c
settings = [dict(name="docs all 8 ep", docs=len(bank), epochs=8), dict(name="docs all T0.1", docs=len(bank), temperature=0.1),
            dict(name="docs all 6 ep lr", docs=len(bank), epochs=6)]
for s in settings:
    n_docs = s.get("docs", 10000)
    q = np.concatenate([tq, bank[np.sort(rng.choice(len(bank), n_docs, replace=False))]]) if n_docs < len(bank) else np.concatenate([tq, bank])
    idx = clone(); t = time.time()
    for rnd in range(s.get("rounds", 1)):
        if rnd:
            idx.index.reset(); idx.index.add(bank)
            print("  re-encoded", m3(idx), flush=True)
        rep = distill_codebooks(idx, bank, q, cosine=True, epochs=s.get("epochs", 4), candidates=s.get("candidates", 100),
                                temperature=s.get("temperature", 0.05))
    print(s["name"], m3(idx), getattr(rep, "kept", rep), round(time.time() - t), "s", flush=True)
