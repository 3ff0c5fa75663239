"""The shipped recipe by name (``hf-qret train scifact``): one YAML file (``recipes/scifact.yaml``), which the wheel
ships as the package data ``hf_qret.recipes``; its data folder is in a source checkout only."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import REPO_ROOT

from hf_qret.config import parse_config, recipe_path
from hf_qret.errors import ConfigError


def test_a_recipe_name_is_the_recipes_yaml_of_the_checkout():
    assert recipe_path("scifact") == REPO_ROOT / "recipes" / "scifact.yaml"
    by_name = parse_config(["scifact", "--output_dir", "o"])
    by_path = parse_config([str(REPO_ROOT / "recipes" / "scifact.yaml"), "--output_dir", "o"])
    assert by_name[1].data_dir == by_path[1].data_dir == str(REPO_ROOT / "recipes" / "data" / "scifact")
    assert by_name[2].num_train_epochs == by_path[2].num_train_epochs == 4
    with pytest.raises(ConfigError, match=r"'nfcorpus' is neither a YAML config file .* \(scifact\)"):
        parse_config(["nfcorpus"])
    with pytest.raises(ConfigError, match="no such config file; the recipes shipped with hf-qret are run by name"):
        parse_config(["recipes-elsewhere/scifact.yaml"])


def test_the_recipe_as_installed_from_a_wheel_needs_data_dir(tmp_path, monkeypatch):
    """As in a wheel: the YAML sits in the package (hf_qret/recipes/), its data folder is not there."""
    import hf_qret.shipped_recipes as config

    installed = tmp_path / "site-packages" / "hf_qret" / "recipes"
    installed.mkdir(parents=True)
    shutil.copyfile(REPO_ROOT / "recipes" / "scifact.yaml", installed / "scifact.yaml")
    monkeypatch.setattr(config, "RECIPES_DIR", installed)
    with pytest.raises(ConfigError, match="the wheel ships the recipe's settings, not its data. Pass --data_dir DIR"):
        parse_config(["scifact", "--output_dir", str(tmp_path / "o")])
    data = tmp_path / "scifact"
    data.mkdir()
    _, data_args, training_args = parse_config(["scifact", "--data_dir", str(data), "--output_dir", "o"])
    assert data_args.data_dir == str(data) and training_args.per_device_train_batch_size == 32


def test_the_wheel_ships_the_recipes_yaml_from_the_recipes_folder():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    setuptools = pyproject["tool"]["setuptools"]
    assert "hf_qret.recipes" in setuptools["packages"]
    assert setuptools["package-dir"]["hf_qret.recipes"] == "recipes"  # the one file, not a copy
    assert setuptools["package-data"]["hf_qret.recipes"] == ["*.yaml"]
    assert Path(REPO_ROOT / "recipes" / "scifact.yaml").is_file()


def _saves_at(args, steps: int) -> list[int]:
    """The steps of a ``steps``-step run at which the Trainer's own flow (``DefaultFlowCallback``) saves a checkpoint."""
    from transformers.trainer_callback import DefaultFlowCallback, TrainerControl, TrainerState

    flow, state = DefaultFlowCallback(), TrainerState(max_steps=steps)
    state.compute_steps(args, steps)
    saved = []
    for step in range(1, steps + 1):
        state.global_step, control = step, TrainerControl()
        flow.on_step_end(args, state, control)
        flow.on_epoch_end(args, state, control)
        if control.should_save:
            saved.append(step)
    return saved


def test_the_shipped_recipe_writes_checkpoints_only_when_asked(tmp_path):
    # the YAML says no checkpoints: none at all, not even checkpoint-<last step> with optimizer.pt at the end
    _, _, args = parse_config(["scifact", "--output_dir", str(tmp_path)])
    assert _saves_at(args, 96) == []
    # what the YAML's comment tells users to pass for resumable checkpoints
    _, _, asked = parse_config(
        ["scifact", "--output_dir", str(tmp_path), "--save_strategy", "steps", "--save_steps", "40"]
    )
    assert _saves_at(asked, 96) == [40, 80, 96]
