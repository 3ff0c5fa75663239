"""Proxy: does a shared doc-side residual MLP (trained with frozen query embeddings) raise flat / 16B on unseen docs?"""
import sys, json, time, numpy as np, torch
sys.path.insert(0, "/work/main/benchmarks"); sys.path.insert(0, "/work/main")
from pathlib import Path
from every_document import corpus_splits, seen_docs_of
from hf_qret.evaluation.evaluator import RetrievalEvaluator, search_run
from hf_qret.serving.retriever import QuantizedRetriever
from hf_qret.index.core import QuantizedIndex
from hf_qret.index.exact import ExactSearch
torch.manual_seed(0)
art = Path(sys.argv[1]); cache = Path("/work/runs/adapter") / (art.parent.parent.name + art.name)
cache.mkdir(exist_ok=True, parents=True)
train, held = corpus_splits("insuranceqa", "/work/shared/data/insuranceqa")
r = QuantizedRetriever.from_pretrained(art, "cpu", load_bank=True)
doc_ids = r.doc_ids; pos = {d: i for i, d in enumerate(doc_ids)}
bank = np.asarray(r.files.bank.local_numpy(), dtype="float32")
if not (cache / "tq.npy").exists():
    tqids = list(train.qrels); np.save(cache / "tq.npy", r.encode_queries([train.queries[q] for q in tqids]))
    json.dump(tqids, open(cache / "tq.json", "w"))
tq = np.load(cache / "tq.npy"); tqids = json.load(open(cache / "tq.json"))
ev = RetrievalEvaluator(held.queries, held.qrels, seen_doc_ids=seen_docs_of(train))
if not (cache / "dq.npy").exists():
    np.save(cache / "dq.npy", r.encode_queries([held.queries[q] for q in ev.query_ids]))
dq = np.load(cache / "dq.npy")
pairs = [(qi, pos[d]) for qi, q in enumerate(tqids) for d, s in train.qrels[q].items() if s > 0]
posmask = {qi: [pos[d] for d, s in train.qrels[q].items() if s > 0] for qi, q in enumerate(tqids)}
print("pairs", len(pairs), "bank", bank.shape, flush=True)

def score(X, tag):
    out = {}
    run = search_run(dq, ev.query_ids, ExactSearch(X), doc_ids, ev.k); m = ev.score({"q": run})
    out["flat"] = [round(m["q_ndcg@10"], 4), round(m["q_ndcg@10_seen"], 4), round(m["q_ndcg@10_unseen"], 4)]
    idx = QuantizedIndex(X.shape[1], "RQ16x8", normalize_decoded=True); idx.build(X)
    run = search_run(dq, ev.query_ids, idx, doc_ids, ev.k); m = ev.score({"q": run})
    out["rq16"] = [round(m["q_ndcg@10"], 4), round(m["q_ndcg@10_seen"], 4), round(m["q_ndcg@10_unseen"], 4)]
    print(tag, out, flush=True); return out

class Adapter(torch.nn.Module):
    def __init__(s, d, r):
        super().__init__(); s.a = torch.nn.Linear(d, r); s.b = torch.nn.Linear(r, d); torch.nn.init.zeros_(s.b.weight); torch.nn.init.zeros_(s.b.bias)
    def forward(s, x): return torch.nn.functional.normalize(x + s.b(torch.nn.functional.gelu(s.a(x))), dim=-1)

def train_adapter(r_, epochs, lr, scale=20.0, bs=64, wd=0.0):
    ad = Adapter(bank.shape[1], r_); opt = torch.optim.AdamW(ad.parameters(), lr=lr, weight_decay=wd)
    Xb = torch.from_numpy(bank); Q = torch.from_numpy(tq); P = np.array(pairs)
    for ep in range(epochs):
        perm = np.random.permutation(len(P)); tot = 0
        for s in range(0, len(P), bs):
            b = P[perm[s:s + bs]]; X = ad(Xb); q = Q[b[:, 0]]
            logits = scale * q @ X.T
            m = torch.zeros_like(logits, dtype=torch.bool)
            for i, (qi, di) in enumerate(b):
                for o in posmask[qi]:
                    if o != di: m[i, o] = True
            logits = logits.masked_fill(m, -1e4)
            loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(b[:, 1]))
            opt.zero_grad(); loss.backward(); opt.step(); tot += loss.item()
        print(f"r={r_} ep{ep} loss {tot / (len(P) / bs):.4f}", flush=True)
    with torch.no_grad(): return ad(Xb).numpy()


def train_qadapter(r_, epochs, lr, scale=20.0, bs=64):
    global dq
    ad = Adapter(bank.shape[1], r_); opt = torch.optim.AdamW(ad.parameters(), lr=lr, weight_decay=0.0)
    Xb = torch.from_numpy(bank); Q = torch.from_numpy(tq); P = np.array(pairs)
    for ep in range(epochs):
        perm = np.random.permutation(len(P))
        for s in range(0, len(P), bs):
            b = P[perm[s:s + bs]]; q = ad(Q[b[:, 0]])
            logits = scale * q @ Xb.T
            m = torch.zeros_like(logits, dtype=torch.bool)
            for i, (qi, di) in enumerate(b):
                for o in posmask[qi]:
                    if o != di: m[i, o] = True
            loss = torch.nn.functional.cross_entropy(logits.masked_fill(m, -1e4), torch.from_numpy(b[:, 1]))
            opt.zero_grad(); loss.backward(); opt.step()
    with torch.no_grad(): dq = ad(torch.from_numpy(dq)).numpy()
    return bank
score(train_qadapter(64, 1, 1e-3), "query-side r64 e1")
