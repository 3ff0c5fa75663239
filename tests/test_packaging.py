"""The wheel ships every sub-package of hf_qret (pyproject.toml lists them one by one)."""

from __future__ import annotations

from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed_for_the_wheel():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]["packages"])
    found = {".".join(path.parent.relative_to(REPO).parts) for path in (REPO / "hf_qret").rglob("__init__.py")}
    assert "hf_qret.config" in found and found <= listed, sorted(found - listed)
