"""House rule: every public class and function documents itself, with an example; every public method has a docstring.

One test per module under ``hf_qret/``, so a failure names its module; the assertion message lists every offender as
``module.Name`` (no docstring, or a docstring without an ``Example:``/``Examples:`` section) or ``module.Class.method`` (no
docstring).

What is checked, per module:

* public (no leading ``_``) module-level functions and classes *defined in that module* (``obj.__module__`` is the
  module; re-exports are checked where they are defined): a docstring containing ``Example:`` or ``Examples:``;
* public methods, static and class methods and property getters in each such class's own ``__dict__`` (inherited
  ones are checked on their own class): a docstring. Property setters and deleters are not checked; neither are the
  ``transformers`` overrides of :func:`_inherits_contract` (``TrainerCallback`` events, :data:`TRAINER_OVERRIDES`),
  which keep the contract of the method they override.

Every module is imported plainly, the ``evaluate`` loading script
``hf_qret/evaluation/evaluate_metric/ir_retrieval/ir_retrieval.py`` included (it is a package module too).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import pkgutil
import re

import pytest

import hf_qret

#: ``transformers`` hooks and methods whose overrides inherit their contract (and docstring) from the base class:
#: ``TrainerCallback`` events (``on_*``, e.g. ``on_step_end``) and these ``Trainer`` methods.
TRAINER_OVERRIDES = frozenset(
    {
        "add_callback",
        "compute_loss",
        "create_model_card",
        "create_scheduler",
        "evaluate",
        "evaluation_loop",
        "log",
        "prediction_step",
        "push_to_hub",
        "train",
    }
)

_EXAMPLE = re.compile(r"^\s*Examples?:\s*$", re.MULTILINE)


def _modules() -> list[str]:
    names = [hf_qret.__name__]
    names += [info.name for info in pkgutil.walk_packages(hf_qret.__path__, prefix=f"{hf_qret.__name__}.")]
    return sorted(names)


def _inherits_contract(cls: type, name: str) -> bool:
    """Whether ``cls.name`` overrides a ``transformers`` ``TrainerCallback`` hook or a listed ``Trainer`` method."""
    bases = {f"{base.__module__}.{base.__qualname__}" for base in cls.__mro__[1:]}
    if name.startswith("on_") and "transformers.trainer_callback.TrainerCallback" in bases:
        return True
    return name in TRAINER_OVERRIDES and any(base.startswith("transformers.trainer.") for base in bases)


def _method_offenders(cls: type, where: str) -> list[str]:
    offenders = []
    for name, member in vars(cls).items():
        if name.startswith("_") or _inherits_contract(cls, name):
            continue
        if isinstance(member, (staticmethod, classmethod)):
            member = member.__func__
        elif isinstance(member, property):
            member = member.fget
        elif isinstance(member, functools.cached_property):
            member = member.func
        if not inspect.isfunction(member):
            continue  # class attributes, dataclass fields, nested classes (checked where they are defined)
        if not (member.__doc__ or "").strip():
            offenders.append(f"{where}.{name}: no docstring")
    return offenders


def offenders(module_name: str) -> list[str]:
    """Every house-rule offender in one module, as ``'module.Name: reason'`` lines."""
    module = importlib.import_module(module_name)
    found = []
    for name, obj in vars(module).items():
        if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
            continue
        if getattr(obj, "__module__", None) != module.__name__:
            continue  # imported from elsewhere: checked in its own module
        where = f"{module_name}.{name}"
        doc = obj.__doc__ or ""
        if inspect.isclass(obj) and doc == (obj.__base__.__doc__ if obj.__base__ else None):
            doc = ""  # a class without a docstring of its own shows its base's (enum, NamedTuple, ...)
        if not doc.strip():
            found.append(f"{where}: no docstring")
        elif not _EXAMPLE.search(doc):
            found.append(f"{where}: docstring has no Example: section")
        if inspect.isclass(obj):
            found += _method_offenders(obj, where)
    return found


@pytest.mark.parametrize("module_name", _modules())
def test_public_api_is_documented(module_name: str) -> None:
    found = offenders(module_name)
    if found:
        print(f"\n{module_name}: {len(found)} offender(s)")
        print("\n".join(f"  {line}" for line in found))
    assert not found, f"{module_name}: {len(found)} undocumented public name(s):\n" + "\n".join(found)


def test_checker_reports_each_kind_of_offender(monkeypatch: pytest.MonkeyPatch) -> None:
    """The checker itself: what it reports, what it leaves to the class or module that defines it."""
    import sys
    import types

    from transformers import TrainerCallback

    module = types.ModuleType("fake_documented")
    source = '''
import os
from os.path import join


def bare():
    pass


def documented():
    """Does nothing.

    Example:
        >>> documented()
    """


class Hooks(TrainerCallback):
    """Callback.

    Examples:
        >>> Hooks()
    """

    def on_step_end(self, args, state, control, **kwargs):
        pass

    def public(self):
        pass

    @property
    def value(self):
        return 1

    @value.setter
    def value(self, new):
        pass

    def _private(self):
        pass
'''
    module.TrainerCallback = TrainerCallback  # imported: not checked here
    exec(compile(source, "fake_documented.py", "exec"), module.__dict__)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    assert offenders(module.__name__) == [
        "fake_documented.bare: no docstring",
        "fake_documented.Hooks.public: no docstring",
        "fake_documented.Hooks.value: no docstring",
    ]
