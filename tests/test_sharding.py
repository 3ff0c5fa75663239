"""bank_sharding='rows': the bank and the index split across processes (shard bounds, merged top-k, the assembled
artifact, checkpoints of another number of processes) and the gloo equivalence with the replicated run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _helpers import dist_workers

from hf_qret import QRetTrainingArguments, TargetBank
from hf_qret.bank.collectives import ShardLayout, shard_bounds
from hf_qret.bank.sharding import ShardedTargetBank
from hf_qret.errors import ConfigError
from hf_qret.index.core import QuantizedIndex
from hf_qret.index.faiss_ops import train_sample
from hf_qret.index.sharding import ShardedIndex, merge_shard_indexes, merge_topk, sample_rows
from hf_qret.serving.artifact import is_artifact_file, load_retrieval_files
from hf_qret.training.sharded import check_shard_checkpoint, shard_file


def test_shard_bounds_cover_the_rows_in_rank_order():
    for count, world in ((10, 3), (5, 2), (7, 7), (200_000, 4)):
        bounds = [shard_bounds(count, world, r) for r in range(world)]
        assert bounds[0][0] == 0 and bounds[-1][1] == count
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        assert max(e - s for s, e in bounds) - min(e - s for s, e in bounds) <= 1
    layout = ShardLayout(count=10, world=3, rank=2)
    assert (layout.start, layout.end, layout.local_count) == (7, 10, 3)
    assert layout.owners(np.arange(10)).tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_merge_topk_is_the_whole_index_top_k():
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((50, 8)).astype("float32")
    queries = rng.standard_normal((4, 8)).astype("float32")
    whole = QuantizedIndex(8, "Flat")
    whole.add(vectors)
    expected_scores, expected_rows = whole.search(queries, 10)
    parts_scores, parts_rows = [], []
    for rank in range(3):  # three shards, each searched alone, with global row numbers
        start, end = shard_bounds(50, 3, rank)
        part = QuantizedIndex(8, "Flat")
        part.add(vectors[start:end])
        scores, rows = part.search(queries, 10)
        parts_scores.append(scores)
        parts_rows.append(rows + start)
    scores, rows = merge_topk(np.hstack(parts_scores), np.hstack(parts_rows), 10)
    assert np.array_equal(rows, expected_rows) and np.array_equal(scores, expected_scores)


def test_merge_topk_breaks_ties_by_row_and_puts_missing_results_last():
    scores = np.array([[0.5, -np.inf, 0.5, 0.9, 0.5]], dtype="float32")
    rows = np.array([[7, -1, 2, 4, 3]])
    merged_scores, merged_rows = merge_topk(scores, rows, 5)
    assert merged_rows.tolist() == [[4, 2, 3, 7, -1]]
    assert merged_scores[0, :4].tolist() == [pytest.approx(0.9), 0.5, 0.5, 0.5]


def test_the_sharded_index_trains_on_the_replicated_sample():
    vectors = np.arange(40, dtype=np.float32).reshape(20, 2)
    for max_rows in (None, 5, 20):
        assert np.array_equal(vectors[sample_rows(20, max_rows)], train_sample(vectors, max_rows))


def test_a_single_shard_is_the_whole_index_and_assembles_to_it():
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((300, 16)).astype("float32")
    whole = QuantizedIndex(16, "PQ4")
    whole.build(vectors)
    sharded = ShardedIndex(16, "PQ4", ShardLayout(count=300, world=1, rank=0))
    sharded.build(vectors)
    queries = vectors[:5]
    assert np.array_equal(sharded.search(queries, 7)[1], whole.search(queries, 7)[1])
    assert sharded.global_ntotal == 300
    assembled = sharded.assemble()
    assert np.array_equal(assembled.reconstruct_all(), whole.reconstruct_all())
    served = sharded.synced_copy(vectors, np.array([3]))
    assert isinstance(served, ShardedIndex) and served.shard is sharded.shard


def test_ivf_shards_with_rows_reencoded_in_place_merge_into_the_whole_index():
    """An IVF shard (the default factory from 45,000 rows) whose rows were re-encoded in place (an incremental
    refresh, or a checkpoint's served copy) carries a direct map, which FAISS's merge_from refuses: the shards of a
    sharded run at a million rows could not be assembled at the first checkpoint. They merge into the whole index."""
    import faiss

    rng = np.random.default_rng(2)
    vectors = rng.standard_normal((600, 16)).astype("float32")
    moved = vectors.copy()
    moved[[3, 400]] = rng.standard_normal((2, 16)).astype("float32")
    factory = "OPQ4,IVF8,PQ4"
    whole = QuantizedIndex(16, factory)
    whole.build(vectors)
    bounds = [(0, 300), (300, 600)]
    shards = []
    for start, end in bounds:  # each shard: the whole index's codebooks, its own rows, one of them moved in place
        local = faiss.clone_index(whole.index)
        local.reset()
        shard = QuantizedIndex.from_index(local, factory)
        shard.add(vectors[start:end])
        changed = np.array([row - start for row in (3, 400) if start <= row < end])
        assert shard.refresh(moved[start:end], mode="incremental", rows=changed) == 1
        shards.append(shard.index)
    assert whole.refresh(moved, mode="incremental", rows=np.array([3, 400])) == 2
    assert faiss.extract_index_ivf(shards[0]).direct_map.type != faiss.DirectMap.NoMap
    merged = merge_shard_indexes(shards, [start for start, _ in bounds], factory)
    assert merged.ntotal == 600
    assert faiss.extract_index_ivf(merged).direct_map.type == faiss.extract_index_ivf(whole.index).direct_map.type
    assert np.array_equal(merged.reconstruct_n(0, 600), whole.index.reconstruct_n(0, 600))
    queries = moved[[3, 400, 10]]
    assert np.array_equal(merged.search(queries, 20)[1], whole.index.search(queries, 20)[1])


def test_a_sharded_bank_writes_the_whole_bank_and_reads_its_slice(tmp_path):
    rows = torch.randn(7, 4)
    ids = [f"d{i}" for i in range(7)]
    whole = ShardedTargetBank(rows, ids, ShardLayout(count=7, world=1, rank=0))
    assembled = whole.assemble_file(tmp_path / "bank.safetensors")
    assembled.save(tmp_path / "bank.safetensors")
    assert torch.equal(TargetBank.from_file(tmp_path / "bank.safetensors", ids).weight.detach(), rows)
    # process 1 of 2 reads rows 4..6 of the whole file; its doc ids and row numbers stay global
    layout = ShardLayout(count=7, world=2, rank=1)
    shard = ShardedTargetBank(torch.zeros(3, 4), ids, layout)
    shard.load_rows_from_file(tmp_path / "bank.safetensors")
    assert torch.equal(shard.local_weight.detach(), rows[4:])
    assert len(shard) == 7 and shard.local_rows == 3 and shard.row_of("d5") == 5
    assert shard.local_changed_rows().tolist() == [0, 1, 2]
    with pytest.raises(ConfigError, match="assemble_file"):
        shard.save(tmp_path / "x.safetensors")
    with pytest.raises(Exception, match="owns 3 of 7 rows"):
        ShardedTargetBank(torch.zeros(4, 4), ids, layout)


def test_sharded_bank_gradients_go_to_the_owner_rows():
    bank = ShardedTargetBank(torch.zeros(3, 2), ["a", "b", "c"], ShardLayout(count=3, world=1, rank=0))
    (bank.gather(torch.tensor([2, 0])) * torch.tensor([[1.0], [3.0]])).sum().backward()
    assert bank.local_weight.grad is None  # kept aside until the bank's step
    assert bank.exchange_gradients() == 2
    assert bank.local_weight.grad.to_dense().tolist() == [[3.0, 3.0], [0.0, 0.0], [1.0, 1.0]]
    assert bank.exchange_gradients() == 0 and bank.local_weight.grad is None


def test_a_shard_whose_rows_did_not_move_still_sees_the_bank_changed(monkeypatch):
    """Only positives move (bank_update='positives'): in a corpus plus precomputed rows, the shard holding only
    precomputed rows gets no gradient. Its version must move with the others', or its index refresh callback finds
    nothing stale and skips the refresh (a collective) the other process runs: a million-row sharded run hung at its
    epoch-end refresh."""
    from hf_qret.bank import sharding
    from hf_qret.training.callbacks import IndexRefreshCallback

    layout = ShardLayout(count=7, world=2, rank=1)  # rows 4..6; process 0's row 1 has the step's only gradient
    bank = ShardedTargetBank(torch.zeros(3, 2), None, layout)
    others = (torch.tensor([1]), torch.ones(1, 2))
    monkeypatch.setattr(sharding, "all_gather_uneven", lambda *args: (others, None))
    callback = IndexRefreshCallback(bank, index=None, on_epoch_end=True)
    assert not callback._stale()
    assert bank.exchange_gradients() == 0 and bank.local_weight.grad is None
    assert callback._stale()
    version = bank.version
    monkeypatch.setattr(
        sharding, "all_gather_uneven", lambda *args: ((torch.zeros(0, dtype=torch.long), torch.zeros(0, 2)), None)
    )
    assert bank.exchange_gradients() == 0 and bank.version == version  # no row moved anywhere: nothing changed


def test_a_sharded_bank_and_index_name_their_local_parts_and_refuse_the_whole_bank_names():
    # process 1 of 2 holds rows 4..6 of 7: len() is global, what it holds is local_*; the whole-bank names would
    # silently mean this shard only, so they raise and name the replacement
    layout = ShardLayout(count=7, world=2, rank=1)
    rows = torch.tensor([[3.0, 4.0], [0.0, 2.0], [1.0, 0.0]])
    bank = ShardedTargetBank(rows, None, layout)
    assert len(bank) == 7 and tuple(bank.local_weight.shape) == (3, 2)
    assert bank.local_row_norms().tolist() == [5.0, 2.0, 1.0]
    # the row copies and their size are this shard's too: 3 rows of 2 float32s
    assert bank.local_numpy().shape == (3, 2) and len(bank.local_float32_rows()) == 3
    assert bank.local_nbytes == 3 * 2 * 4
    bank.write_rows(1, torch.ones(1, 2))
    assert bank.local_changed_rows().tolist() == [1]
    for name, replacement in (
        ("weight", "local_weight"),
        ("changed_rows", "local_changed_rows"),
        ("row_norms", "local_row_norms"),
        ("numpy", "local_numpy"),
        ("float32_rows", "local_float32_rows"),
        ("iter_float32", "local_float32_rows"),
        ("nbytes", "local_nbytes"),
    ):
        assert not hasattr(bank, name)
        with pytest.raises(AttributeError, match=rf"has no \.{name}:.*\.{replacement}"):
            getattr(bank, name)
    assert [name for name, _ in bank.named_parameters()] == ["weight"]  # the checkpoint key is unchanged
    # an unsharded bank holds every row: its whole-bank names are its local ones
    whole = TargetBank(rows, None)
    assert whole.nbytes == whole.local_nbytes == 3 * 2 * 4 and len(whole.float32_rows()) == 3
    np.testing.assert_array_equal(whole.numpy(), whole.local_numpy())

    index = ShardedIndex(2, "Flat", layout)
    assert not hasattr(index, "ntotal")
    with pytest.raises(AttributeError, match=r"has no \.ntotal:.*\.local_ntotal.*\.global_ntotal"):
        _ = index.ntotal
    index.add(rows.numpy())
    assert (index.local_ntotal, index.global_ntotal) == (3, 7)
    assert index.reconstruct_all().shape == (3, 2)
    # a refresh of this shard's rows (numbered from 0) runs on the shard: the incremental path, not a rebuild
    assert index.refresh(bank.local_float32_rows(), mode="incremental", rows=bank.local_changed_rows()) == 1
    assert index.reconstruct_all()[1].tolist() == [1.0, 1.0] and index.local_ntotal == 3


def test_resuming_with_another_number_of_processes_says_so(tmp_path):
    folder = tmp_path / "checkpoint-10"
    folder.mkdir()
    for rank in range(2):
        (folder / shard_file("bank", ShardLayout(count=10, world=2, rank=rank))).write_bytes(b"")
    check_shard_checkpoint(folder, ShardLayout(count=10, world=2, rank=1))  # the same world: fine
    with pytest.raises(ConfigError, match="written by 2 processes .* this run has 4.*--nproc_per_node 2"):
        check_shard_checkpoint(folder, ShardLayout(count=10, world=4, rank=0))
    with pytest.raises(ConfigError, match="--bank_sharding rows on 2 processes"):
        check_shard_checkpoint(folder, None)
    plain = tmp_path / "checkpoint-20"
    plain.mkdir()
    check_shard_checkpoint(plain, None)
    with pytest.raises(ConfigError, match="without bank_sharding='rows'"):
        check_shard_checkpoint(plain, ShardLayout(count=10, world=2, rank=0))
    assert not is_artifact_file("bank-shard-0-of-2.safetensors") and not is_artifact_file(
        "mining_index-shard-1-of-2.faiss"
    )


def test_bank_sharding_options_are_checked():
    assert QRetTrainingArguments("out", report_to="none").bank_sharding == "none"
    with pytest.raises(ConfigError, match="bank_sharding must be one of none, rows"):
        QRetTrainingArguments("out", report_to="none", bank_sharding="cols")
    with pytest.raises(ConfigError, match="cannot merge HNSW"):
        QRetTrainingArguments("out", report_to="none", bank_sharding="rows", index_factory="HNSW32,PQ16")
    with pytest.raises(ConfigError, match="mining_nlist"):
        QRetTrainingArguments("out", report_to="none", bank_sharding="rows", index_factory="PQ16", mining_nlist=8)


@pytest.mark.integration
def test_sharded_run_equals_the_replicated_run_step_by_step(tiny_model_dir, beir_dir, tmp_path):
    """Two gloo processes, 4 steps (an index refresh with retrained codebooks at step 2): the sharded bank gives the
    same candidates, losses and bank rows as the replicated bank at every step; its checkpoint resumes to the same
    bank; its artifact is the replicated run's (one bank, one index)."""
    dist_workers("--sharded", tiny_model_dir, str(beir_dir), str(tmp_path), timeout=300)
    ranks = [torch.load(tmp_path / f"sharded_rank{rank}.pt") for rank in range(2)]
    for record in ranks:
        replicated, sharded = record["replicated"], record["sharded"]
        assert len(replicated["candidates"]) == len(sharded["candidates"]) == 4
        assert all(torch.equal(a, b) for a, b in zip(replicated["candidates"], sharded["candidates"]))
        assert replicated["losses"] == sharded["losses"]
        assert record["resumed"]["losses"] == sharded["losses"][2:]
    assert ranks[1]["sharded"]["start"] == ranks[0]["sharded"]["banks"][0].shape[0] == 150
    for kind in ("sharded", "resumed"):
        shards = [record[kind]["banks"] for record in ranks]
        whole = [torch.cat(parts) for parts in zip(*shards)]
        assert all(torch.equal(a, b) for a, b in zip(ranks[0]["replicated"]["banks"][-len(whole) :], whole))
    restored = torch.cat([record["resumed"]["restored"] for record in ranks])  # restore_snapshot(checkpoint-2)
    assert torch.equal(restored, ranks[0]["replicated"]["banks"][1])
    assert [record["resumed"]["restored_index_rows"] for record in ranks] == [150, 150]
    steps = torch.cat([record["sharded"]["row_steps"] for record in ranks])
    assert torch.equal(steps, ranks[0]["replicated"]["row_steps"]) and int(steps.gt(0).sum()) > 8
    replicated, sharded = (load_retrieval_files(tmp_path / kind, load_bank=True) for kind in ("replicated", "sharded"))
    assert torch.equal(replicated.bank.weight, sharded.bank.weight)
    assert replicated.doc_ids == sharded.doc_ids
    assert np.array_equal(replicated.index.reconstruct_all(), sharded.index.reconstruct_all())
    assert sharded.config["bank_sharding"] == {"processes": 2}
    checkpoint = tmp_path / "sharded" / "checkpoint-2"
    assert {p.name for p in checkpoint.glob("*-shard-*")} == {
        f"{name}-shard-{r}-of-2.{ext}"
        for r in range(2)
        for name, ext in (
            ("bank", "safetensors"),
            ("bank_optimizer", "safetensors"),
            ("bank_anchors", "safetensors"),
            ("mining_index", "faiss"),
        )  # fmt: skip
    }


@pytest.mark.integration
def test_three_uneven_shards_equal_the_replicated_run_up_to_float_rounding(tiny_model_dir, tmp_path):
    """Three gloo processes, 301 rows (shards of 101, 100, 100), the method's defaults (RQ16x8, row-wise SGD), 4
    steps with a refresh at step 2: the sharded run mines the same candidates as the replicated run, and its losses
    and bank rows equal the replicated run's up to float rounding (the sums of three partial gradients are added in
    another order than the replicated run's one sum)."""
    from conftest import synthetic_beir, write_beir

    beir = write_beir(tmp_path / "beir", *synthetic_beir(num_docs=301))
    dist_workers("--sharded", tiny_model_dir, str(beir), str(tmp_path), "--defaults", nproc=3, timeout=400)
    ranks = [torch.load(tmp_path / f"sharded_rank{rank}.pt") for rank in range(3)]
    assert [record["sharded"]["banks"][0].shape[0] for record in ranks] == [101, 100, 100]
    assert [record["sharded"]["start"] for record in ranks] == [0, 101, 201]
    for record in ranks:
        replicated, sharded = record["replicated"], record["sharded"]
        assert len(replicated["candidates"]) == len(sharded["candidates"]) == 4
        assert all(torch.equal(a, b) for a, b in zip(replicated["candidates"], sharded["candidates"]))
        assert sharded["losses"] == pytest.approx(replicated["losses"], rel=0, abs=1e-6)
    whole = [torch.cat(parts) for parts in zip(*(record["sharded"]["banks"] for record in ranks))]
    replicated = ranks[0]["replicated"]["banks"]
    assert len(whole) == len(replicated) == 4
    assert not torch.equal(replicated[-1], replicated[0])  # the bank moved
    for a, b in zip(replicated, whole):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    files = {kind: load_retrieval_files(tmp_path / kind, load_bank=True) for kind in ("replicated", "sharded")}
    torch.testing.assert_close(files["sharded"].bank.weight, files["replicated"].bank.weight, rtol=0, atol=1e-6)
    assert files["sharded"].config["bank_sharding"] == {"processes": 3}


@pytest.mark.integration
def test_evaluate_or_save_model_on_one_process_says_so(tiny_model_dir, beir_dir, tmp_path):
    """Two gloo processes with a sharded bank: evaluate() on process 0 only, save_model() on process 1 only. Each
    raises CollectiveCallError naming the call (after args.ddp_timeout) instead of hanging in the collectives."""
    dist_workers("--one-sided", tiny_model_dir, str(beir_dir), str(tmp_path), timeout=240)
    ranks = [torch.load(tmp_path / f"one_sided_rank{rank}.pt") for rank in range(2)]
    assert all("eval_loss" in record["together"] for record in ranks)
    assert "call evaluate() on every process" in ranks[0]["evaluate"] and "evaluate" not in ranks[1]
    assert "call save_model() on every process" in ranks[1]["save_model"] and "save_model" not in ranks[0]
    assert not (tmp_path / "alone").exists() or not any((tmp_path / "alone").iterdir())


@pytest.mark.integration
def test_recipe_under_torchrun_trains_a_sharded_bank_into_one_artifact(tiny_model_dir, two_split_dir, tmp_path):
    """`torchrun --nproc_per_node 2 recipes/train.py ... --bank_sharding rows`: each process encodes and keeps half
    of the corpus; the safety net evaluates through the shards; the artifact is one index that serving loads."""
    from test_dropin import recipe_under_torchrun

    from hf_qret import QuantizedRetriever

    out = tmp_path / "out"
    result = recipe_under_torchrun(tiny_model_dir, two_split_dir, out, "--bank_sharding", "rows", "--max_steps", "4",
                                   "--save_strategy", "steps", "--save_steps", "2", "--keep_untrained_if_better", "false",
                                   timeout=300)  # fmt: skip
    assert "process 1 of 2 holds rows 150-300 of 300" in result.stderr
    assert (out / "eval_results.json").is_file()
    assert {p.name for p in (out / "checkpoint-4").glob("bank-shard-*")} == {
        "bank-shard-0-of-2.safetensors",
        "bank-shard-1-of-2.safetensors",
    }
    files = load_retrieval_files(out, load_bank=True)
    assert files.index.ntotal == len(files.bank) == 300
    retriever = QuantizedRetriever.from_pretrained(str(out))
    assert len(retriever.search(["a query"], k=5)[0]) == 5
