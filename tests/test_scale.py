"""Scale options: bank storage dtypes, memory-mapped banks, the compact row optimizer, incremental index refresh."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from hf_qret.bank.core import RowIds, TargetBank, _StagedGather
from hf_qret.config import ModelArguments, QRetTrainingArguments, parse_config
from hf_qret.errors import ArtifactError, ConfigError
from hf_qret.index.core import QuantizedIndex
from hf_qret.training.callbacks import IndexRefreshCallback
from hf_qret.training.optim import RowAdam

LR, BETAS, EPS = 0.05, (0.9, 0.999), 1e-8


@pytest.fixture(scope="module", autouse=True)
def one_faiss_thread():
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # deterministic and fast on a small, busy CPU (see test_index.py)
    yield
    faiss.omp_set_num_threads(threads)


def _init(n: int = 12, dim: int = 8, seed: int = 0) -> torch.Tensor:
    # values exactly representable in fp16 and bf16, so every storage dtype starts from the same bank
    generator = torch.Generator().manual_seed(seed)
    return (torch.randint(-8, 9, (n, dim), generator=generator).float() / 8).contiguous()


def _schedule_grads(step: int, count: int, dim: int = 8) -> torch.Tensor:
    # gradients exact in fp16/bf16 (multiples of 1/4 in [-2, 2]), so the storage dtype's gradient is not rounded
    generator = torch.Generator().manual_seed(100 + step)
    return torch.randint(-8, 9, (count, dim), generator=generator).float() / 4


# step -> gathered rows (duplicates summed, new rows appear late, one step without gradient)
SCHEDULE = [[0, 1], [1, 2, 2], [0], [], [7, 1, 1], [9], [0, 9, 2, 11], [9, 3], [4, 5, 6, 7, 8, 10]]


def _run(bank: TargetBank, opt, schedule=SCHEDULE) -> None:
    for step, rows in enumerate(schedule):
        if rows:
            (bank.gather(torch.tensor(rows)) * _schedule_grads(step, len(rows))).sum().backward()
        opt.step()
        opt.zero_grad()


class DenseRowAdam:
    """The dense reference: RowAdam as it was before the compact store ((N, dim) moments, (N,) step counts)."""

    def __init__(self, weight: torch.Tensor, lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0, round_to=None):
        self.weight, self.lr, self.betas, self.eps, self.weight_decay = weight, lr, betas, eps, weight_decay
        self.round_to = round_to
        self.exp_avg = torch.zeros_like(weight)
        self.exp_avg_sq = torch.zeros_like(weight)
        self.row_steps = torch.zeros(weight.shape[0], dtype=torch.int64)

    @torch.no_grad()
    def step(self, rows: torch.Tensor, grads: torch.Tensor) -> None:
        beta1, beta2 = self.betas
        self.row_steps[rows] += 1
        steps = self.row_steps[rows].to(torch.float32).unsqueeze(1)
        exp_avg = self.exp_avg[rows].mul_(beta1).add_(grads, alpha=1 - beta1)
        exp_avg_sq = self.exp_avg_sq[rows].mul_(beta2).addcmul_(grads, grads, value=1 - beta2)
        self.exp_avg[rows] = exp_avg
        self.exp_avg_sq[rows] = exp_avg_sq
        denom = (exp_avg_sq / (1 - beta2**steps)).sqrt_().add_(self.eps)
        current = self.weight[rows]
        if self.weight_decay:
            current = current * (1 - self.lr * self.weight_decay)
        new = current - self.lr * ((exp_avg / (1 - beta1**steps)) / denom)
        if self.round_to is not None:
            new = new.to(self.round_to).float()  # written back in the storage dtype
        self.weight[rows] = new


def _run_reference(reference: DenseRowAdam, schedule=SCHEDULE) -> None:
    for step, rows in enumerate(schedule):
        if not rows:
            continue
        grads = _schedule_grads(step, len(rows))
        unique, inverse = torch.unique(torch.tensor(rows), return_inverse=True)
        summed = torch.zeros(len(unique), grads.shape[1]).index_add_(0, inverse, grads)
        reference.step(unique, summed)


# ----------------------------------------------------------------------------- storage dtype


@pytest.mark.parametrize(
    "dtype, torch_dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)]
)
def test_bank_dtype_storage_gathers_float32_and_updates_in_float32(dtype, torch_dtype):
    bank = TargetBank(_init(), None, dtype=dtype)
    assert bank.weight.dtype == torch_dtype and bank.dtype == torch_dtype
    assert bank.nbytes == 12 * 8 * torch.tensor([], dtype=torch_dtype).element_size()
    gathered = bank.gather(torch.tensor([3, 1]))
    assert gathered.dtype == torch.float32 and gathered.requires_grad
    assert torch.equal(gathered, _init()[[3, 1]])
    gathered.sum().backward()
    assert bank.weight.grad.is_sparse and bank.weight.grad.dtype == torch_dtype

    bank = TargetBank(_init(), None, dtype=dtype)
    opt = RowAdam(bank, lr=LR, betas=BETAS, eps=EPS)
    reference = DenseRowAdam(_init(), round_to=None if dtype == "fp32" else torch_dtype)
    _run(bank, opt)
    _run_reference(reference)
    # the float32 update written back in the storage dtype: exactly the reference rounded at every step
    assert bank.weight.dtype == torch_dtype
    assert torch.equal(bank.weight.detach().float(), reference.weight)
    assert torch.equal(opt.row_steps, reference.row_steps)
    assert opt.exp_avg.dtype == torch.float32 and torch.equal(opt.exp_avg, reference.exp_avg)


def test_bank_dtype_names_and_errors():
    assert TargetBank(_init(), None, dtype="float16").dtype == torch.float16
    assert TargetBank(_init(), None, dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="bank_dtype must be one of fp32, bf16, fp16, got 'int8'"):
        TargetBank(_init(), None, dtype="int8")
    bank = TargetBank(_init(), None)
    bank.to_storage("fp16")
    assert bank.dtype == torch.float16 and torch.equal(bank.weight.detach().float(), _init())
    assert bank.float32_rows()[2:4].dtype == np.float32


def test_float32_rows_view_converts_only_the_rows_asked_for():
    bank = TargetBank(_init(), None, dtype="bf16")
    view = bank.float32_rows()
    assert view.shape == (12, 8) and len(view) == 12
    np.testing.assert_array_equal(view[np.array([5, 2])], _init()[[5, 2]].numpy())
    np.testing.assert_array_equal(view[3:6], _init()[3:6].numpy())
    assert view[3:6].flags["C_CONTIGUOUS"]


def test_staged_gather_matches_embedding_gradient():
    # the path a CPU bank takes to feed a GPU (here CPU -> CPU): same rows, same sparse gradient
    bank = TargetBank(_init(), None, dtype="fp16")
    rows = torch.tensor([4, 1, 4])
    weights = _schedule_grads(0, 3)
    staged = _StagedGather.apply(bank.weight, rows, torch.device("cpu"), False)
    assert staged.dtype == torch.float32
    (staged * weights).sum().backward()
    via_staging = bank.weight.grad.coalesce()
    bank.weight.grad = None
    (bank.gather(rows) * weights).sum().backward()
    direct = bank.weight.grad.coalesce()
    assert torch.equal(via_staging.indices(), direct.indices())
    assert torch.equal(via_staging.values(), direct.values())


def test_compute_device_routes_through_staging(monkeypatch):
    bank = TargetBank(_init(), None)
    calls = []
    real = _StagedGather.apply
    monkeypatch.setattr(_StagedGather, "apply", lambda *a: calls.append(a[2]) or real(*a))
    bank.gather(torch.tensor([0]))
    assert calls == []  # same device: the plain sparse embedding, as before
    bank.compute_device = torch.device("meta")  # stands in for a GPU: another device than the bank's
    out = bank.gather(torch.tensor([0, 2]))
    assert calls == [torch.device("meta")]
    assert out.device.type == "meta" and out.shape == (2, 8) and out.dtype == torch.float32 and out.requires_grad


def test_row_ids_stand_in_for_a_list_of_row_numbers():
    bank = TargetBank(_init(), None)
    assert isinstance(bank.doc_ids, RowIds) and bank.doc_ids == [str(i) for i in range(12)]
    assert bank.row_of("7") == 7 and bank.rows_of(["0", "11"]) == [0, 11]
    for bad in ("12", "07", "-1", "x"):
        with pytest.raises(KeyError):
            bank.row_of(bad)
    assert bank.doc_ids != [str(i) for i in range(11)]
    assert json.loads(json.dumps(list(bank.doc_ids)))[-1] == "11"


# ----------------------------------------------------------------------------- compact optimizer


@pytest.mark.parametrize("block_rows", [16384, 3, 1])
def test_compact_row_adam_equals_the_dense_reference(block_rows):
    # repeated rows, rows first touched late, a step without gradient; compared after every step
    bank = TargetBank(_init(), None)
    opt = RowAdam(bank, lr=LR, betas=BETAS, eps=EPS, weight_decay=0.1, block_rows=block_rows)
    reference = DenseRowAdam(_init(), weight_decay=0.1)
    for step, rows in enumerate(SCHEDULE):
        if rows:
            grads = _schedule_grads(step, len(rows))
            (bank.gather(torch.tensor(rows)) * grads).sum().backward()
            unique, inverse = torch.unique(torch.tensor(rows), return_inverse=True)
            reference.step(unique, torch.zeros(len(unique), 8).index_add_(0, inverse, grads))
        opt.step()
        opt.zero_grad()
        assert torch.equal(bank.weight.detach(), reference.weight), step
        assert torch.equal(opt.row_steps, reference.row_steps), step
        assert torch.equal(opt.exp_avg, reference.exp_avg) and torch.equal(opt.exp_avg_sq, reference.exp_avg_sq)
    assert opt.num_touched_rows == 12


def test_compact_state_grows_with_touched_rows_only():
    n, dim = 100_000, 16
    bank = TargetBank(torch.zeros(n, dim), None)
    opt = RowAdam(bank, lr=LR, block_rows=64)
    assert opt.nbytes == 4 * n  # the int32 row -> slot map, nothing else
    dense_bytes = 2 * 4 * n * dim + 8 * n
    for step in range(3):
        rows = torch.arange(step * 50, step * 50 + 100)  # 50 new rows per step after the first
        bank.gather(rows).sum().backward()
        opt.step()
        opt.zero_grad()
    assert opt.num_touched_rows == 200
    assert torch.equal(opt.touched_rows(), torch.arange(200))
    per_row = 2 * 4 * dim + 8
    assert opt.nbytes == 4 * n + 256 * per_row  # 4 blocks of 64 rows
    assert opt.nbytes < dense_bytes / 25  # the dense (N, dim) moments and steps: 31x more here
    assert int(opt.row_steps.sum()) == 300


def test_compact_state_dict_round_trip_and_dense_format(tmp_path):
    from safetensors.torch import load_file, save_file

    bank_a = TargetBank(_init(), None)
    opt_a = RowAdam(bank_a, lr=LR, block_rows=2)
    _run(bank_a, opt_a, SCHEDULE[:6])
    state = opt_a.state_dict()
    touched = int(opt_a.row_steps.gt(0).sum())
    assert state["exp_avg"].shape == (touched, 8) and state["row_steps"].shape == (12,)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "opt.safetensors"))
    loaded = load_file(str(tmp_path / "opt.safetensors"))

    # an older checkpoint: dense (N, dim) moments
    dense = {"exp_avg": opt_a.exp_avg, "exp_avg_sq": opt_a.exp_avg_sq, "row_steps": opt_a.row_steps}
    for restored_state in (loaded, dense):
        bank_b = TargetBank(bank_a.weight.detach(), None)
        opt_b = RowAdam(bank_b, lr=LR, block_rows=3)
        opt_b.load_state_dict(restored_state)
        for name in ("exp_avg", "exp_avg_sq", "row_steps"):
            assert torch.equal(getattr(opt_b, name), getattr(opt_a, name))
        bank_c = TargetBank(bank_a.weight.detach(), None)
        opt_c = RowAdam(bank_c, lr=LR)
        opt_c.load_state_dict(restored_state)
        _run(bank_b, opt_b, SCHEDULE[6:])
        _run(bank_c, opt_c, SCHEDULE[6:])
        assert torch.equal(bank_b.weight, bank_c.weight)
    _run(bank_a, opt_a, SCHEDULE[6:])
    assert torch.equal(bank_a.weight, bank_c.weight)  # continuing from the restored state: the same updates

    bad = dict(loaded, exp_avg=loaded["exp_avg"][:-1])
    with pytest.raises(ArtifactError, match="'exp_avg' is missing or has the wrong shape"):
        RowAdam(TargetBank(_init(), None)).load_state_dict(bad)


# ----------------------------------------------------------------------------- memory-mapped bank


def test_mmap_bank_is_backed_by_the_file_and_updates_land_in_it(tmp_path):
    path = tmp_path / "bank.npy"
    bank = TargetBank.create_mmap(path, 12, 8, dtype="fp16")
    bank.write_rows(0, _init()[:5])
    bank.write_rows(5, _init()[5:])
    assert bank.is_mmap and bank.mmap_path == path and bank.num_changed == 12
    mapped = bank._mmap
    assert isinstance(mapped, np.memmap)
    pointer = bank.weight.data_ptr()
    assert pointer == mapped.ctypes.data  # the parameter IS the mapping, no copy
    opt = RowAdam(bank, lr=LR)
    reference = DenseRowAdam(_init(), round_to=torch.float16)
    _run(bank, opt)
    _run_reference(reference)
    assert bank.weight.data_ptr() == pointer  # still the mapping after gathers, sparse grads and row writes
    assert torch.equal(bank.weight.detach().float(), reference.weight)
    bank.flush()
    on_disk = np.load(path)
    assert on_disk.dtype == np.float16
    np.testing.assert_array_equal(on_disk.astype(np.float32), reference.weight.numpy())
    reopened = TargetBank.open_mmap(path, None)
    assert torch.equal(reopened.weight.detach(), bank.weight.detach())


def _anonymous_rss() -> int:
    """Resident anonymous memory (heap: what a copy of the bank would take), from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    pytest.skip("no RssAnon in /proc/self/status")


def test_mmap_bank_does_not_load_the_file_into_ram(tmp_path):
    n, dim = 400_000, 256  # a 200 MB float16 file (sparse on disk)
    before = _anonymous_rss()
    bank = TargetBank.create_mmap(tmp_path / "big.npy", n, dim, dtype="fp16")
    opt = RowAdam(bank, lr=LR, block_rows=1024)
    for step in range(3):
        rows = torch.randint(0, n, (500,), generator=torch.Generator().manual_seed(step))
        bank.gather(rows).sum().backward()
        opt.step()
        opt.zero_grad()
    grown = _anonymous_rss() - before
    # far below the 200 MB bank (or the 400 MB of a float32 copy): only the touched rows' optimizer state
    assert grown < 40e6, grown
    assert opt.nbytes <= 4 * n + 2 * 1024 * (2 * dim * 4 + 8)
    assert bank.weight.data_ptr() == bank._mmap.ctypes.data


@pytest.mark.parametrize("source", ["npy_same_dtype", "npy_float32", "safetensors"])
def test_from_file_into_a_mmap_working_copy(tmp_path, source, caplog):
    init = _init()
    if source == "npy_same_dtype":
        path = tmp_path / "init.npy"
        np.save(path, init.numpy().astype(np.float16))
    elif source == "npy_float32":
        path = tmp_path / "init.npy"
        np.save(path, init.numpy())
    else:
        path = tmp_path / "init.safetensors"
        TargetBank(init, None).save(path)
    original = path.read_bytes()
    with caplog.at_level(logging.INFO, logger="hf_qret.bank.core"):
        bank = TargetBank.from_file(path, [f"d{i}" for i in range(12)], dtype="fp16", mmap_path=tmp_path / "work.npy")
    assert "working file" in caplog.text and str(tmp_path / "work.npy") in caplog.text
    assert bank.is_mmap and bank.dtype == torch.float16 and bank.row_of("d3") == 3
    assert torch.equal(bank.weight.detach().float(), init)
    bank.write_rows(0, torch.zeros(1, 8))
    bank.flush()
    assert path.read_bytes() == original  # training updates the working copy, never the init file
    with pytest.raises(ArtifactError, match="12 rows but 3 document ids"):
        TargetBank.from_file(path, ["a", "b", "c"], mmap_path=tmp_path / "other.npy")


def test_mmap_bank_bf16_and_dtype_errors(tmp_path):
    bank = TargetBank.create_mmap(tmp_path / "bf16.npy", 12, 8, dtype="bf16")
    bank.write_rows(0, _init())
    assert bank.dtype == torch.bfloat16 and torch.equal(bank.weight.detach().float(), _init())
    bank.flush()
    assert torch.equal(TargetBank.open_mmap(tmp_path / "bf16.npy", None, "bf16").weight.detach().float(), _init())
    with pytest.raises(ArtifactError, match="uint16 bf16 bits"):
        TargetBank.open_mmap(tmp_path / "bf16.npy", None)
    with pytest.raises(ConfigError, match="memory mapped"):
        bank.to_storage("fp32")
    np.save(tmp_path / "ints.npy", np.zeros((3, 2), dtype=np.int64))
    with pytest.raises(ArtifactError, match="float32, float16"):
        TargetBank.open_mmap(tmp_path / "ints.npy", None)


def test_mmap_bank_save_streams_and_loads_back(tmp_path):
    from safetensors.torch import load_file

    bank = TargetBank.create_mmap(tmp_path / "work.npy", 12, 8, dtype="fp16")
    bank.write_rows(0, _init())
    bank.save(tmp_path / "bank.safetensors")
    saved = load_file(str(tmp_path / "bank.safetensors"))["embeddings"]
    assert saved.dtype == torch.float16 and torch.equal(saved, bank.weight.detach())
    bank.save(tmp_path / "bank.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "bank.npy"), _init().numpy())
    # loading into an existing (RAM) bank, chunk by chunk: what resuming a checkpoint does
    other = TargetBank(torch.zeros(12, 8), None, dtype="bf16")
    other.clear_changed()
    other.load_rows_from_file(tmp_path / "bank.safetensors")
    assert torch.equal(other.weight.detach().float(), _init()) and other.num_changed == 12
    with pytest.raises(ArtifactError, match=r"\(12, 8\) but this bank is \(3, 8\)"):
        TargetBank(torch.zeros(3, 8), None).load_rows_from_file(tmp_path / "bank.safetensors")


# ----------------------------------------------------------------------------- incremental refresh

DIM, N = 32, 2000


def _clustered(n: int = N, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((20, DIM))
    vectors = centres[rng.integers(0, 20, n)] + 0.5 * rng.standard_normal((n, DIM))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def _fast(index: QuantizedIndex) -> QuantizedIndex:
    top = faiss.downcast_index(index.index)
    if isinstance(top, faiss.IndexPreTransform):
        for i in range(top.chain.size()):
            transform = faiss.downcast_VectorTransform(top.chain.at(i))
            if isinstance(transform, faiss.OPQMatrix):
                transform.niter = 10
    return index


def _stored_codes(index: QuantizedIndex) -> dict[int, tuple[int, bytes]]:
    """id -> (inverted list, code) for IVF; id -> (0, code) for flat-code indexes."""
    top = faiss.downcast_index(index.index)
    inner = faiss.downcast_index(top.index) if isinstance(top, faiss.IndexPreTransform) else top
    if isinstance(inner, faiss.IndexIVF):
        lists, found = inner.invlists, {}
        for list_no in range(inner.nlist):
            size = lists.list_size(list_no)
            if size:
                ids = faiss.rev_swig_ptr(lists.get_ids(list_no), size)
                codes = faiss.rev_swig_ptr(lists.get_codes(list_no), size * lists.code_size).reshape(size, -1)
                found.update({int(i): (list_no, c.tobytes()) for i, c in zip(ids, codes)})
        return found
    codes = faiss.vector_to_array(inner.codes).reshape(inner.ntotal, -1)
    return {i: (0, c.tobytes()) for i, c in enumerate(codes)}


@pytest.mark.parametrize("factory", ["PQ8", "OPQ8,PQ8", "SQ8", "IVF16,PQ8", "OPQ8,IVF16,PQ8", "Flat"])
def test_incremental_refresh_gives_the_codes_of_a_full_reencode(factory):
    vectors = _clustered()
    bank = TargetBank(vectors, None, dtype="fp16")
    index = QuantizedIndex(DIM, factory, use_gpu=False)
    _fast(index).build(bank.float32_rows())
    full = QuantizedIndex.from_index(faiss.clone_index(index.index), factory)
    version = index.version

    rng = np.random.default_rng(1)
    rows = np.sort(rng.choice(N, 300, replace=False))
    bank.clear_changed()
    for row in rows:  # a training-like move of 300 rows
        bank.write_rows(int(row), vectors[row : row + 1] + 0.4 * rng.standard_normal((1, DIM)).astype(np.float32))
    assert np.array_equal(bank.changed_rows(), rows)

    encoded = index.refresh(bank.float32_rows(), mode="incremental", rows=bank.changed_rows())
    assert encoded == 300 and index.version > version and index.ntotal == N
    full.refresh(bank.float32_rows(), mode="reencode")
    assert _stored_codes(index) == _stored_codes(full)
    queries = bank.float32_rows()[rows[:50]]
    np.testing.assert_array_equal(index.search(queries, 10)[1], full.search(queries, 10)[1])


def test_incremental_refresh_falls_back_for_hnsw_and_handles_no_rows(caplog):
    vectors = _clustered()
    index = QuantizedIndex(DIM, "HNSW16,SQ8", use_gpu=False)
    index.build(vectors)
    with caplog.at_level(logging.INFO, logger="hf_qret.index.core"):
        assert index.refresh(vectors, mode="incremental", rows=np.array([3, 4])) == N
    assert "falls back to a full re-encode" in caplog.text and "IndexHNSW" in caplog.text
    with pytest.raises(ConfigError, match="cannot be updated in place"):
        index.update(np.array([1]), vectors[:1])
    flat = QuantizedIndex(DIM, "PQ8", use_gpu=False)
    flat.build(vectors)
    version = flat.version
    assert flat.refresh(vectors, mode="incremental", rows=np.array([], dtype=np.int64)) == 0
    assert flat.version == version
    with pytest.raises(ValueError, match="distinct rows"):
        flat.update(np.array([1, 1]), vectors[:2])


def test_refresh_callback_incremental_resets_the_changed_rows():
    vectors = _clustered()
    bank = TargetBank(vectors, None)
    index = QuantizedIndex(DIM, "PQ8", use_gpu=False)
    index.build(bank.float32_rows())
    callback = IndexRefreshCallback(bank, index, every_n_steps=1, mode="incremental")
    opt = RowAdam(bank, lr=0.05)
    bank.gather(torch.tensor([5, 9, 5, 1000])).sum().backward()
    opt.step()
    opt.zero_grad()
    assert bank.changed_rows().tolist() == [5, 9, 1000]
    callback.refresh(step=1)
    assert callback.last_refreshed_rows == 3 and bank.num_changed == 0 and not callback._stale()
    inner = faiss.downcast_index(index.index)
    codes = faiss.vector_to_array(inner.codes).reshape(N, -1)
    np.testing.assert_array_equal(codes, inner.sa_encode(bank.numpy()))
    callback.refresh(step=2)  # nothing changed since: nothing encoded
    assert callback.last_refreshed_rows == 0


# ----------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    "options, message",
    [
        ({"bank_dtype": "int8"}, "bank_dtype must be one of fp32, bf16, fp16, got 'int8'"),
        ({"bank_device": "tpu"}, "bank_device must be one of auto, cpu, cuda, got 'tpu'"),
        ({"bank_device": "cuda", "use_cpu": True}, "bank_device='cuda' needs a CUDA device"),
        ({"faiss_threads": -2}, "faiss_threads must be >= 0"),
        ({"opq_niter": 0}, "opq_niter must be at least 1"),
        ({"refresh_mode": "fast"}, "refresh_mode must be one of reencode, retrain, incremental, got 'fast'"),
    ],
)
def test_scale_config_errors(tmp_path, options, message):
    with pytest.raises(ConfigError, match=message):
        QRetTrainingArguments(output_dir=str(tmp_path), **options)


def test_scale_options_parse_from_the_command_line(tmp_path):
    model_args, _, args = parse_config(
        [
            "--output_dir",
            str(tmp_path),
            "--bank_dtype",
            "bf16",
            "--bank_device",
            "cpu",
            "--bank_mmap",
            "true",
            "--refresh_mode",
            "incremental",
            "--faiss_threads",
            "1",
            "--bank_pin_memory",
            "true",
            "--opq_niter",
            "20",
        ]  # fmt: skip
    )
    assert args.opq_niter == 20
    assert (args.bank_dtype, args.bank_device, args.refresh_mode) == ("bf16", "cpu", "incremental")
    assert args.faiss_threads == 1
    assert model_args.bank_mmap and args.bank_pin_memory
    assert not ModelArguments().bank_mmap and QRetTrainingArguments(output_dir=str(tmp_path)).bank_dtype == "fp32"


# ----------------------------------------------------------------------------- trainer and recipe


def test_trainer_fp16_bank_with_incremental_refresh(tiny_model, beir_dir, tmp_path):
    from test_trainer import make_trainer, record_candidates

    trainer, _ = make_trainer(
        tiny_model, beir_dir, tmp_path, bank_dtype="fp16", refresh_mode="incremental", refresh_steps=2,
        refresh_on_epoch_end=False, faiss_threads=1, bank_update="all", bank_optimizer="adam",  # Adam's state
        final_refresh_mode="incremental",  # the last refresh too (unset: the run's last refresh retrains)
        doc_adapter_rank=0,  # the row optimizer's own changes (the document adapter changes every row at a refresh)
    )  # fmt: skip
    assert trainer.bank.dtype == torch.float16
    seen = record_candidates(trainer)
    trainer.train()
    assert trainer.refresh_callback.refreshes == 3 and trainer.refresh_callback.mode == "incremental"
    touched = torch.unique(torch.cat(seen[-2:]))  # the candidates of the last two steps
    assert trainer.refresh_callback.last_refreshed_rows == len(touched)
    assert trainer.bank.num_changed == 0
    inner = faiss.downcast_index(trainer.index.index)
    codes = faiss.vector_to_array(inner.codes).reshape(trainer.index.ntotal, -1)
    assert np.array_equal(codes, inner.sa_encode(trainer.bank.numpy()))  # the codes of the final bank
    assert trainer.bank_optimizer.num_touched_rows == len(torch.unique(torch.cat(seen)))


def test_trainer_resume_with_incremental_refresh_is_exact(tiny_model_dir, beir_dir, tmp_path):
    from sentence_transformers import SentenceTransformer
    from test_trainer import make_trainer

    options = dict(refresh_mode="incremental", refresh_steps=2, refresh_on_epoch_end=False, bank_dtype="bf16",
                   max_steps=6, save_strategy="steps", save_steps=3)  # fmt: skip
    unbroken, _ = make_trainer(SentenceTransformer(tiny_model_dir, device="cpu"), beir_dir, tmp_path / "a", **options)
    unbroken.train()
    checkpoint = Path(unbroken.args.output_dir) / "checkpoint-3"
    from safetensors.torch import load_file

    state = load_file(str(checkpoint / "bank_optimizer.safetensors"))
    assert state["changed_rows"].numel() > 0  # step 3 changed rows after the refresh at step 2
    resumed, _ = make_trainer(SentenceTransformer(tiny_model_dir, device="cpu"), beir_dir, tmp_path / "b", **options)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert torch.equal(resumed.bank.weight.detach(), unbroken.bank.weight.detach())
    assert torch.equal(resumed.bank_optimizer.row_steps, unbroken.bank_optimizer.row_steps)
    assert _stored_codes(resumed.index) == _stored_codes(unbroken.index)


def test_recipe_fp16_mmap_incremental(tiny_model_dir, two_split_dir, tmp_path):
    from test_cli import recipe_argv

    from hf_qret.cli import train_main

    out = tmp_path / "out"
    results = train_main(recipe_argv(tiny_model_dir, two_split_dir, out, "--bank_dtype", "fp16", "--refresh_mode",
                                     "incremental", "--refresh_steps", "2", "--bank_mmap", "true",
                                     "--bank_init_file", str(tmp_path / "init.npy")))  # fmt: skip
    assert results["trained"]["trained_quantized_ndcg@10"] >= 0
    working = np.load(out / "bank_mmap.npy", mmap_mode="r")
    assert working.dtype == np.float16 and working.shape == (300, 32)
    assert np.load(tmp_path / "init.npy").dtype == np.float32  # the init file keeps the encoder's float32 rows
    from safetensors.torch import load_file

    saved = load_file(str(out / "bank.safetensors"))["embeddings"]
    assert saved.dtype == torch.float16
    np.testing.assert_array_equal(saved.numpy(), np.asarray(working))  # the artifact holds the trained mmap bank


@pytest.mark.parametrize("bank_update", ["all", "positives"])
def test_trainer_half_bank_with_drift_control_and_incremental_refresh(tiny_model, beir_dir, tmp_path, bank_update):
    from test_trainer import make_trainer

    trainer, _ = make_trainer(
        tiny_model, beir_dir, tmp_path, bank_dtype="bf16", refresh_mode="incremental", refresh_steps=2,
        refresh_on_epoch_end=False, bank_keep_norm=True, bank_learning_rate=5e-2, bank_update=bank_update,
    )  # fmt: skip
    norms = trainer.bank.row_norms().clone()
    before = trainer.bank.weight.detach().clone()
    trainer.train()
    assert trainer.refresh_callback.mode == "incremental" and trainer.refresh_callback.refreshes == 3
    moved = (trainer.bank.weight.detach() != before).any(dim=1)
    assert moved.any() and trainer.bank.dtype == torch.bfloat16
    torch.testing.assert_close(trainer.bank.row_norms()[moved], norms[moved], atol=2e-2, rtol=1e-2)
    inner = faiss.downcast_index(trainer.index.index)
    codes = faiss.vector_to_array(inner.codes).reshape(trainer.index.ntotal, -1)
    assert np.array_equal(codes, inner.sa_encode(trainer.bank.numpy()))  # the in-place codes of the final bank
