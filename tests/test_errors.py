"""Every error class hf-qret raises on purpose is importable from the package root and documented in docs/api."""

from __future__ import annotations

import inspect
from pathlib import Path

import hf_qret
from hf_qret import errors

API_ERRORS_PAGE = Path(__file__).resolve().parents[1] / "docs" / "api" / "errors.md"


def _error_classes() -> dict[str, type]:
    return {
        name: cls
        for name, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, errors.QRetError) and cls.__module__ == errors.__name__
    }


def test_every_error_is_exported_from_the_package_root():
    classes = _error_classes()
    assert "CollectiveCallError" in classes and len(classes) >= 8
    for name, cls in classes.items():
        assert name in hf_qret.__all__, name
        assert getattr(hf_qret, name) is cls


def test_every_error_is_on_the_errors_api_page():
    page = API_ERRORS_PAGE.read_text(encoding="utf-8")
    missing = [name for name in _error_classes() if f"::: hf_qret.errors.{name}\n" not in page]
    assert not missing, f"docs/api/errors.md lacks {missing}"
