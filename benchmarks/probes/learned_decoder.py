"""Proxy: a learned decoder g(x_hat) (residual MLP on the decoded vectors, shared: 16 bytes per row still) re-scoring
the 16-byte index's top 100, trained on every row (regression to the float row) or on the flat ranking."""
import sys, json, time, numpy as np, torch
sys.path.insert(0, "/work/main/benchmarks"); sys.path.insert(0, "/work/main")
from pathlib import Path
from every_document import corpus_splits, seen_docs_of
from hf_qret.evaluation.evaluator import RetrievalEvaluator, search_run, _run_from
from hf_qret.serving.retriever import QuantizedRetriever
from hf_qret.index.core import QuantizedIndex
from hf_qret.index.exact import ExactSearch
from hf_qret.index.distill import distill_codebooks
torch.manual_seed(0)
art = Path(sys.argv[1]); cache = Path("/work/runs/adapter") / (art.parent.parent.name + art.name)
fac = sys.argv[2] if len(sys.argv) > 2 else "RQ16x8"
train, held = corpus_splits("insuranceqa", "/work/shared/data/insuranceqa")
r = QuantizedRetriever.from_pretrained(art, "cpu", load_bank=True)
doc_ids = r.doc_ids
bank = np.asarray(r.files.bank.local_numpy(), dtype="float32")
tq = np.load(cache / "tq.npy"); dq = np.load(cache / "dq.npy")
ev = RetrievalEvaluator(held.queries, held.qrels, seen_doc_ids=seen_docs_of(train))
def m3(run):
    m = ev.score({"q": run}); return [round(m["q_ndcg@10"], 4), round(m["q_ndcg@10_seen"], 4), round(m["q_ndcg@10_unseen"], 4)]
rng = np.random.default_rng(42); dqs = np.concatenate([tq, bank[np.sort(rng.choice(len(bank), 10000, replace=False))]])
t = time.time(); idx = QuantizedIndex(bank.shape[1], fac, normalize_decoded=True); idx.build(bank)
print(fac, "build", round(time.time() - t), "s", "plain", m3(search_run(dq, ev.query_ids, idx, doc_ids, 10)), flush=True)
rep = distill_codebooks(idx, bank, dqs, cosine=True, epochs=4)
print("distilled", getattr(rep, "kept", rep), m3(search_run(dq, ev.query_ids, idx, doc_ids, 10)), flush=True)
xh = idx.reconstruct_all().astype("float32")
print("mse", float(((xh - bank) ** 2).sum(1).mean()), flush=True)
_, cand = idx.raw_candidates(dq, 100)[:2] if False else (None, None)
scores_c, rows_c = idx.search(dq, 100)  # cosine top 100 of the served index

class Dec(torch.nn.Module):
    def __init__(s, d, r):
        super().__init__(); s.a = torch.nn.Linear(d, r); s.b = torch.nn.Linear(r, d); torch.nn.init.zeros_(s.b.weight); torch.nn.init.zeros_(s.b.bias)
    def forward(s, x): return x + s.b(torch.nn.functional.gelu(s.a(x)))

def evaluate(dec, tag):
    with torch.no_grad():
        g = torch.nn.functional.normalize(dec(torch.from_numpy(xh)), dim=-1).numpy()
    s = np.einsum("qd,qkd->qk", dq, g[rows_c])
    order = np.argsort(-s, axis=1)[:, :10]
    run = _run_from(np.take_along_axis(s, order, 1), np.take_along_axis(rows_c, order, 1), ev.query_ids, doc_ids)
    print(tag, m3(run), flush=True)

X = torch.from_numpy(bank); XH = torch.from_numpy(xh)
for rank, epochs, mode in [(256, 20, "cos"), (1024, 20, "cos"), (256, 4, "kl")]:
    dec = Dec(bank.shape[1], rank); opt = torch.optim.Adam(dec.parameters(), lr=1e-3)
    if mode == "cos":
        for ep in range(epochs):
            perm = torch.randperm(len(X))
            for s in range(0, len(X), 256):
                b = perm[s:s + 256]
                loss = 1 - torch.nn.functional.cosine_similarity(dec(XH[b]), X[b]).mean()
                opt.zero_grad(); loss.backward(); opt.step()
    else:
        ts, tr = ExactSearch(bank).search(dqs, 100)
        Q = torch.from_numpy(dqs); T = torch.from_numpy(ts) / 0.05; R = torch.from_numpy(tr)
        for ep in range(epochs):
            perm = torch.randperm(len(Q))
            for s in range(0, len(Q), 128):
                b = perm[s:s + 128]
                g = torch.nn.functional.normalize(dec(XH[R[b]]), dim=-1)
                st = torch.einsum("qd,qkd->qk", Q[b], g) / 0.05
                loss = torch.nn.functional.kl_div(st.log_softmax(-1), T[b].log_softmax(-1), log_target=True, reduction="batchmean")
                opt.zero_grad(); loss.backward(); opt.step()
    evaluate(dec, f"decoder r{rank} e{epochs} {mode}")
