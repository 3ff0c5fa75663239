"""A griffe extension for the API reference: reads hf-qret's docstrings as Google style without editing them.

* ``Example:`` (singular, how hf-qret titles its doctests) becomes ``Examples:``, so griffe renders the ``>>>`` lines
  as code instead of Markdown (where ``[[1, 2]]`` outputs would read as reference links).
* Sphinx roles (``:class:`~pkg.mod.Name```, ``:func:`pkg.f```, ...) become code spans: the short name with ``~``,
  the full path without.

Loaded by ``mkdocs.yml`` (``plugins.mkdocstrings.handlers.python.options.extensions``); not part of the site.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)
_ROLE = re.compile(r":(?:py:)?[a-z]+:`(~?)([^`<]+?)(?:\s*<([^`>]+)>)?`")


def _role(match: re.Match[str]) -> str:
    tilde, text, target = match.group(1), match.group(2).strip(), match.group(3)
    if target:  # :class:`title <target>`
        return f"`{text}`"
    if tilde:
        text = text.rsplit(".", 1)[-1]
    return f"`{text}`"


class DocstringStyle(griffe.Extension):
    """Rewrites each docstring's ``Example:`` titles and Sphinx roles as it is loaded."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:  # noqa: D102
        if obj.docstring is None:
            return
        value = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
        obj.docstring.value = _ROLE.sub(_role, value)
