"""The recipes shipped with hf-qret, by name (``hf-qret train scifact``): ``recipes/NAME.yaml`` of a source checkout,
which a wheel installs as the package data ``hf_qret.recipes`` (pyproject.toml maps ``recipes/`` there: one file)."""

from __future__ import annotations

from pathlib import Path

from .errors import ConfigError

__all__ = ["RECIPES_DIR", "shipped_recipes", "recipe_path", "check_recipe_data"]

#: The recipes shipped with hf-qret, by name (``hf-qret train scifact``): ``recipes/NAME.yaml`` of a source checkout,
#: which a wheel ships as the package data ``hf_qret.recipes`` (the same files: one source).
RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"


def shipped_recipes() -> dict[str, Path]:
    """The shipped recipes' YAML files by name: the checkout's ``recipes/*.yaml``, else the installed package data.

    Example:
        >>> sorted(shipped_recipes())
        ['scifact']
    """
    if RECIPES_DIR.is_dir():
        return {path.stem: path for path in sorted(RECIPES_DIR.glob("*.yaml"))}
    from importlib.resources import files

    try:
        folder = files("hf_qret.recipes")
    except ModuleNotFoundError:
        return {}
    # a wheel is installed unzipped: these are the files themselves
    return {Path(entry.name).stem: Path(str(entry)) for entry in folder.iterdir() if entry.name.endswith(".yaml")}


def recipe_path(name: str) -> Path:
    """The YAML file of a recipe shipped with hf-qret, by name (``"scifact"``).

    Raises:
        ConfigError: No recipe has that name.

    Example:
        >>> recipe_path("scifact").name
        'scifact.yaml'
    """
    recipes = shipped_recipes()
    if name not in recipes:
        raise ConfigError(
            f"{name!r} is neither a YAML config file (.yaml) nor a recipe shipped with hf-qret "
            f"({', '.join(recipes) or 'none installed'}); pass one of those names or a path to a .yaml file."
        )
    return recipes[name]


def check_recipe_data(name: str, data_dir: str | None) -> None:
    """Refuses a shipped recipe's own data folder when it is absent: it is in a source checkout only
    (``recipes/data``), never in the wheel, whose users pass ``--data_dir``.

    Raises:
        ConfigError: ``data_dir`` does not exist; the message says what to pass.

    Example:
        >>> check_recipe_data("scifact", "recipes/data/scifact")  # a checkout: there  # doctest: +SKIP
    """
    if data_dir and Path(data_dir).is_dir():
        return
    raise ConfigError(
        f"the recipe {name!r} trains on the BEIR folder {data_dir}, which does not exist: the wheel ships the recipe's "
        "settings, not its data. Pass --data_dir DIR, a BEIR folder (corpus.jsonl[.gz], queries.jsonl[.gz], "
        "qrels/train.tsv and qrels/dev.tsv): recipes/data/scifact of a source checkout, or one made from BEIR's "
        "SciFact with `python -m hf_qret.recipes.prepare_data SCIFACT_BEIR_FOLDER DIR`."
    )
