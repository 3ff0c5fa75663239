"""benchmarks/ablation.py: per-seed runs, means over seeds, another corpus (no training: the recipe is faked)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from _helpers import load_benchmark


@pytest.fixture()
def ablation():
    return load_benchmark("ablation")


def _results(stage: str, value: float, unseen: float | None) -> dict:
    key = f"{stage}_quantized_ndcg@10"
    metrics = {key: value, f"{key}_seen": value + 0.1, f"{stage}_flat_ndcg@10": value + 0.05}
    if unseen is not None:
        metrics[f"{key}_unseen"] = unseen
    return metrics


def test_cells_are_means_over_seeds_and_each_seed_trains_once(ablation, tmp_path, monkeypatch):
    commands: list[list[str]] = []

    def fake_recipe(command, **kwargs):
        commands.append(command)
        folder = Path(command[command.index("--output_dir") + 1])
        seed = int(command[command.index("--seed") + 1])
        folder.mkdir(parents=True, exist_ok=True)
        results = {
            "untrained": _results("untrained", 0.30, None),
            "trained": _results("trained", 0.30 + seed / 1000, None),
        }
        (folder / "eval_results.json").write_text(json.dumps(results))
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(ablation.subprocess, "run", fake_recipe)
    argv = ["--out", str(tmp_path), "--factories", "RQ16x8", "--variants", "untrained", "default",
            "--seeds", "1", "2", "6", "--data_dir", str(tmp_path / "corpus"), "--max_steps", "600",
            "--markdown", str(tmp_path / "table.md")]  # fmt: skip
    table = ablation.main(argv)

    assert len(commands) == 3  # the untrained row reads the default runs' before-training evaluation
    for command, seed in zip(commands, ("1", "2", "6")):
        assert command[command.index("--seed") + 1] == seed
        assert command[command.index("--max_steps") + 1] == "600"
        assert command[command.index("--data_dir") + 1] == str((tmp_path / "corpus").resolve())
        assert command[command.index("--index_factory") + 1] == "RQ16x8"
        assert command[command.index("--keep_untrained_if_better") + 1] == "false"
    default = table["RQ16x8"]["default"]
    assert default["all"] == pytest.approx(0.303)  # mean of 0.301, 0.302, 0.306
    assert default["seen"] == pytest.approx(0.403)
    assert default["unseen"] is None  # no unseen query in any run: an empty cell, not a number
    assert [r["all"] for r in default["per_seed"]] == [0.301, 0.302, 0.306]
    assert table["RQ16x8"]["untrained"]["all"] == pytest.approx(0.30)
    lines = (tmp_path / "table.md").read_text().splitlines()
    assert lines[2].startswith("| untrained") and lines[3] == (
        "| default (the recipe as shipped (recipes/scifact.yaml)) | 3 | 0.303 | 0.403 | – |"
    )

    ablation.main(argv)  # cached: nothing is trained again
    assert len(commands) == 3
