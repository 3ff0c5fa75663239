#!/usr/bin/env python3
"""Codemod: regroup the flat ``hf_qret/`` modules into layered sub-packages.

Run from the repository root on a clean checkout::

    python tools/restructure.py            # restructure, format, lint, self-check
    python tools/restructure.py --dry-run  # print the mapping and stop

What it does, in order:

1. Works out where each ``hf_qret/<module>.py`` goes (``PLACEMENT`` below). ``encoder`` and ``peft_utils`` default
   to ``training`` but are placed in ``serving`` when a serving, bank or index module (or ``config``, ``data``,
   ``errors``) imports them -- serving must never import training. ``optim`` (the row optimizers) goes to
   ``training``: it imports the distributed row-gradient helpers and only the trainer and checkpoints use it.
   A module it does not know is printed and the run stops before changing anything.
2. ``git mv`` each module (``hf_qret/bank.py`` -> ``hf_qret/bank/core.py`` ...), writes the sub-packages'
   ``__init__.py`` (a docstring only: they stay light, so ``from hf_qret import QuantizedRetriever`` loads no
   training module) and splits ``hub.py`` into ``hub/push.py`` (the Hub upload, used by serving),
   ``hub/callback.py`` (``PushToHubCallback``, a ``TrainerCallback``) and ``hub/cli.py`` (``hf-qret push`` /
   ``hf-qret card``).
3. Rewrites imports: relative imports in ``hf_qret/`` (module level and inside functions) by ``ast``, resolved
   against the module's old place and re-emitted relative to its new one; ``_EXPORTS`` in ``hf_qret/__init__.py``;
   every dotted ``hf_qret.<old>...`` reference (absolute imports, ``mock.patch`` / logger / doctest strings,
   docstrings, Markdown) and ``hf_qret/<old>.py`` path in ``hf_qret/``, ``tests/``, ``benchmarks/``,
   ``examples/``, ``recipes/``, ``.ci/``, ``model_cards/``, ``docs/``, ``README.md``; the ``__file__``-relative
   template path of the model card (one folder deeper now) and the test that loads ``distributed.py`` by path.
4. ``pyproject.toml``: the package list, ``[tool.ruff]``, ``[tool.ruff.format]``, ``[tool.importlinter]`` (the
   layering contracts) and the lint tools in the ``test`` extra; ``.pre-commit-config.yaml``; the lint steps in
   ``.ci/run``.
5. ``ruff format`` + ``ruff check --fix``, then the self-check: every module imports, every ``_EXPORTS`` name
   resolves, the serving import loads no training stack, ``lint-imports`` passes, ``ruff`` is clean.

Idempotent: on an already restructured tree it says so and changes nothing (exit 0). Deterministic: the same
tree gives the same result. It does not commit.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "hf_qret"

# --------------------------------------------------------------------------------------------- the mapping
#: old module (``hf_qret/<name>.py`` or the package ``hf_qret/<name>/``) -> new dotted path under ``hf_qret``.
#: ``None``: stays top level. Modules in ``OPTIONAL`` may be absent.
PLACEMENT: dict[str, str | None] = {
    # top level
    "config": None,
    "data": None,
    "errors": None,
    "recipe": None,
    "cli": None,
    # bank: the trainable target bank and how it is stored
    "bank": "bank.core",
    "storage": "bank.storage",
    "initial_rows": "bank.initial_rows",
    # index: the FAISS index, its factory, shortlist, codebooks, mining
    "index": "index.core",
    "faiss_ops": "index.faiss_ops",
    "factory": "index.factory",
    "shortlist": "index.shortlist",
    "codebook": "index.codebook",
    "distill": "index.distill",
    "mining": "index.mining",
    # training
    "trainer": "training.trainer",
    "callbacks": "training.callbacks",
    "checkpoint": "training.checkpoint",
    "loss": "training.loss",
    "collator": "training.collator",
    "distributed": "training.distributed",
    "dropin": "training.dropin",
    "corpus": "training.corpus",
    "st_evaluation": "training.st_evaluation",
    "optim": "training.optim",
    "safety_net": "training.safety_net",
    "encoder": "training.encoder",  # PULLABLE: serving when a lower layer imports it
    "peft_utils": "training.peft_utils",  # PULLABLE
    # serving
    "retriever": "serving.retriever",
    "artifact": "serving.artifact",
    "sentence_encoder": "serving.sentence_encoder",
    "embedding": "serving.embedding",
    # hub
    "hub": "hub",  # split, see SPLITS
    "model_card": "hub.model_card",
    "card_data": "hub.card_data",
    # evaluation
    "metrics": "evaluation.metrics",
    "evaluation": "evaluation.evaluator",
    "ir_metric": "evaluation.ir_metric",
    "evaluate_metric": "evaluation.evaluate_metric",  # a package: moved whole
}
OPTIONAL = {"initial_rows", "codebook", "distill", "safety_net", "embedding", "hub"}
#: Default to training; pulled into serving when a module of a lower layer imports them (fixed point).
PULLABLE = {"encoder": "serving.encoder", "peft_utils": "serving.peft_utils"}
LOW_LAYERS = {"serving", "bank", "index"}
LOW_TOP = {"config", "data", "errors"}

#: Modules split into parts: old -> {part module: names}; unlisted names go to the first part unless they use
#: names of another part (then they join it).
SPLITS: dict[str, dict[str, list[str]]] = {
    "hub": {
        "hub.push": [],
        "hub.callback": ["PushToHubCallback"],
        "hub.cli": ["_card_arguments", "_card_kwargs", "write_corpus", "push_main", "card_main"],
    },
}
SPLIT_DOCS = {
    "hub.callback": '''"""``PushToHubCallback``: pushes the artifact to a Hub repository during and at the end of training.

The training-side half of :mod:`hf_qret.hub` (a ``transformers.TrainerCallback``); the upload itself is
:func:`hf_qret.hub.push_artifact`, which serving uses too.
"""''',
    "hub.cli": '''"""The ``hf-qret push`` and ``hf-qret card`` commands (see :mod:`hf_qret.cli`)."""''',
}

#: A split module's first part keeps its docstring with this first paragraph.
SPLIT_FIRST_PARAGRAPH = {
    "hub.push": "Pushing artifacts to the Hugging Face Hub: :func:`push_artifact` (used by serving, by the training\n"
    "callback in :mod:`hf_qret.hub.callback` and by the commands in :mod:`hf_qret.hub.cli`).",
}

SUBPACKAGE_DOCS = {
    "bank": "The target bank: the trainable document rows (``TargetBank``), how they are stored (fp32/bf16/fp16,\n"
    "memory-mapped files, chunked I/O) and their pretrained values (``InitialRows``).\n\n"
    "Bottom layer with :mod:`hf_qret.index`: imports neither training, hub nor evaluation.",
    "index": "The quantized FAISS index: ``QuantizedIndex``, its factory strings, FAISS helpers, the mining shortlist,\n"
    "trainable codebooks, quantizer distillation and the index miner.\n\n"
    "Bottom layer with :mod:`hf_qret.bank`: imports neither training, hub nor evaluation.",
    "training": "Training: ``QRetTrainer`` and what it is built from (losses, collator, callbacks, checkpoints, row\n"
    "optimizers, distributed helpers, the sentence-transformers drop-in, corpus encoding).\n\n"
    "Nothing in serving, bank or index imports this layer.",
    "serving": "Serving: ``QuantizedRetriever``, the artifact on disk, encoding (pooling, similarity) and the\n"
    "sentence-transformers-style encoder.\n\n"
    "Never imports :mod:`hf_qret.training` (enforced by import-linter): ``from hf_qret import QuantizedRetriever``\n"
    "must not load the training stack. Keep this ``__init__`` free of imports.",
    "hub": "The Hugging Face Hub: pushing artifacts (:mod:`.push`, also used by serving), the training callback\n"
    "(:mod:`.callback`), the ``hf-qret push`` / ``card`` commands (:mod:`.cli`) and the model card.",
    "evaluation": "Evaluation: IR metrics (pytrec_eval), ``RetrievalEvaluator`` and the Hugging Face ``evaluate`` metric\n"
    "shipped in the package.",
}

TEXT_DIRS = ["hf_qret", "tests", "benchmarks", "examples", "recipes", ".ci", "model_cards", "docs"]
TEXT_FILES = ["README.md", "pyproject.toml"]
TEXT_SUFFIXES = {".py", ".md", ".rst", ".txt", ".toml", ".yaml", ".yml", ".cfg", ".sh", ".diff", ".ini", ""}
SKIP_DIRS = {"__pycache__", ".git", ".venv", "data", "outputs", "runs"}
LINT_PATHS = ["hf_qret", "tests", "benchmarks", "examples", "recipes", "tools"]


def log(message: str) -> None:
    print(f"restructure: {message}", flush=True)


def fail(message: str) -> None:
    print(f"restructure: ERROR: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def run(*cmd: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True, **kwargs)
    if check and result.returncode != 0:
        fail(f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def tool(name: str) -> str:
    """A console script next to this interpreter (the project's venv), else on PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


# ---------------------------------------------------------------------------------------------- discovery
def old_modules() -> dict[str, Path]:
    """The flat tree's modules: name -> path (a .py file, or a package folder)."""
    found = {}
    for path in sorted(PKG.iterdir()):
        if path.name.startswith((".", "__")):
            continue
        if path.suffix == ".py":
            found[path.stem] = path
        elif path.is_dir() and (path / "__init__.py").exists():
            found[path.name] = path
    return found


def already_restructured() -> bool:
    return (PKG / "training" / "__init__.py").exists() and not (PKG / "trainer.py").exists()


def module_imports(path: Path, old_name: str, is_pkg: bool) -> set[str]:
    """Old top-level module names a module imports (module level, in functions, absolute or relative)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    own = ["hf_qret"] if not is_pkg else ["hf_qret", old_name]
    found = set()
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.ImportFrom):
            base = resolve(node.level, node.module, own)
            if base == "hf_qret":
                targets = [f"hf_qret.{a.name}" for a in node.names]
            else:
                targets = [base]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        for target in targets:
            parts = target.split(".")
            if parts[0] == "hf_qret" and len(parts) > 1:
                found.add(parts[1])
    return found


def resolve(level: int, module: str | None, package_parts: list[str]) -> str:
    if level == 0:
        return module or ""
    base = package_parts[: len(package_parts) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def compute_mapping(found: dict[str, Path]) -> dict[str, str | None]:
    unknown = sorted(set(found) - set(PLACEMENT))
    if unknown:
        fail(
            "modules with no place in the new layout: "
            + ", ".join(f"hf_qret/{n}" for n in unknown)
            + ". Add them to PLACEMENT in tools/restructure.py."
        )
    missing = sorted(set(PLACEMENT) - set(found) - OPTIONAL)
    if missing:
        log(f"note: expected modules not present (skipped): {', '.join(missing)}")
    mapping = {name: PLACEMENT[name] for name in found}
    imports = {name: module_imports(_source_file(path), name, path.is_dir()) for name, path in found.items()}
    changed = True
    while changed:  # pull PULLABLE modules into serving while a lower layer imports them
        changed = False
        for name, target in PULLABLE.items():
            if name not in mapping or mapping[name] == target:
                continue
            importers = sorted(
                m for m, deps in imports.items() if name in deps and (_layer(mapping[m]) in LOW_LAYERS or m in LOW_TOP)
            )
            if importers:
                log(f"{name} -> {target} (not training): imported by {', '.join(importers)}")
                mapping[name] = target
                changed = True
    return mapping


def _source_file(path: Path) -> Path:
    return path / "__init__.py" if path.is_dir() else path


def _layer(new: str | None) -> str | None:
    return None if new is None else new.split(".")[0]


# -------------------------------------------------------------------------------------------- name mapping
class Mapper:
    def __init__(self, mapping: dict[str, str | None], split_parts: dict[str, dict[str, str]]):
        self.mapping = mapping  # old -> new dotted (relative to hf_qret) or None
        self.split_parts = split_parts  # old -> {symbol: part module}
        self.moved = {old for old, new in mapping.items() if new is not None}

    def split_default(self, old: str) -> str:
        return next(iter(SPLITS[old]))

    def new_dotted(self, dotted: str) -> str:
        """``hf_qret.<old>.<attr>...`` -> its new dotted name (unchanged when not a moved module)."""
        parts = dotted.split(".")
        if parts[0] != "hf_qret" or len(parts) < 2 or parts[1] not in self.moved:
            return dotted
        old, rest = parts[1], parts[2:]
        if old in SPLITS:
            if not rest or rest[0] in {part.rsplit(".", 1)[-1] for part in SPLITS[old]}:
                return dotted  # the package, or already one of its parts
            part = self.split_parts[old].get(rest[0], self.split_default(old))
            return ".".join(["hf_qret", part, *rest])
        return ".".join(["hf_qret", self.mapping[old], *rest])

    def import_groups(self, target: str, aliases: list[ast.alias]) -> list[tuple[str, list[tuple[str, str | None]]]]:
        """``from <target> import <aliases>`` -> [(new target, [(name, asname)])], in first-seen order."""
        groups: dict[str, list[tuple[str, str | None]]] = {}
        parts = target.split(".")
        for alias in aliases:
            name, asname = alias.name, alias.asname
            if parts == ["hf_qret"] and name in self.moved and name not in SPLITS:
                new = "hf_qret." + self.mapping[name]
                parent, leaf = new.rsplit(".", 1)
                groups.setdefault(parent, []).append((leaf, asname or (name if leaf != name else None)))
            elif len(parts) == 2 and parts[1] in SPLITS and parts[1] in self.moved:
                part = self.split_parts[parts[1]].get(name, self.split_default(parts[1]))
                groups.setdefault("hf_qret." + part, []).append((name, asname))
            else:
                groups.setdefault(self.new_dotted(target), []).append((name, asname))
        return list(groups.items())


# ------------------------------------------------------------------------------------------ text editing
def line_offsets(text: str) -> list[int]:
    offsets, total = [0], 0
    for line in text.splitlines(keepends=True):
        total += len(line)
        offsets.append(total)
    return offsets


def node_span(node: ast.AST, offsets: list[int], text: str) -> tuple[int, int]:
    # ast columns are UTF-8 byte offsets
    def to_index(lineno: int, col: int) -> int:
        start = offsets[lineno - 1]
        line = text[start : offsets[lineno] if lineno < len(offsets) else len(text)]
        return start + len(line.encode("utf-8")[:col].decode("utf-8"))

    return to_index(node.lineno, node.col_offset), to_index(node.end_lineno, node.end_col_offset)


def relative_spec(target: str, new_module: str, new_is_pkg: bool) -> str:
    here = new_module.split(".") if new_is_pkg else new_module.split(".")[:-1]
    there = target.split(".")
    common = 0
    while common < min(len(here), len(there)) and here[common] == there[common]:
        common += 1
    return "." * (len(here) - common + 1) + ".".join(there[common:])


def render_import(spec: str, names: list[tuple[str, str | None]], indent: str) -> str:
    body = ", ".join(n if a is None else f"{n} as {a}" for n, a in names)
    line = f"from {spec} import {body}"
    if len(indent) + len(line) <= 120:
        return line
    inner = "".join(f"{indent}    {n if a is None else f'{n} as {a}'},\n" for n, a in names)
    return f"from {spec} import (\n{inner}{indent})"


def rewrite_imports(
    text: str, old_module: str, old_is_pkg: bool, new_module: str, new_is_pkg: bool, mapper: Mapper
) -> str:
    """Rewrites relative imports (resolved against the old place) and imports of split modules."""
    tree = ast.parse(text)
    offsets = line_offsets(text)
    old_package = old_module.split(".") if old_is_pkg else old_module.split(".")[:-1]
    edits = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        target = resolve(node.level, node.module, old_package)
        if not target.startswith("hf_qret"):
            continue
        parts = target.split(".")
        is_split = len(parts) == 2 and parts[1] in SPLITS and parts[1] in mapper.moved
        if node.level == 0 and not is_split and not (parts == ["hf_qret"]):
            continue  # an absolute dotted name: the text pass maps it
        groups = mapper.import_groups(target, node.names)
        original = [(a.name, a.asname) for a in node.names]
        start, end = node_span(node, offsets, text)
        segment = text[start:end]

        def spec_of(new_target: str) -> str:
            return relative_spec(new_target, new_module, new_is_pkg) if node.level else new_target

        if len(groups) == 1 and groups[0][1] == original:
            new_spec = spec_of(groups[0][0])
            replaced = re.sub(r"^(from\s+)([.\w]+)", lambda m: m.group(1) + new_spec, segment, count=1)
        else:
            indent = " " * node.col_offset
            replaced = ("\n" + indent).join(render_import(spec_of(t), names, indent) for t, names in groups)
        if replaced != segment:
            edits.append((start, end, replaced))
    for start, end, replaced in sorted(edits, reverse=True):
        text = text[:start] + replaced + text[end:]
    return text


DOTTED = re.compile(r"(?<![\w.])hf_qret((?:\.\w+)+)")
PATHREF = re.compile(r"(?<![\w/])hf_qret/(\w+)(\.py\b|/)")
BY_PATH = re.compile(r"""os\.path\.join\(package, (["'])(\w+)\.py\1\)""")


def rewrite_text(text: str, mapper: Mapper) -> str:
    text = DOTTED.sub(lambda m: mapper.new_dotted("hf_qret" + m.group(1)), text)

    def path(m: re.Match) -> str:
        old, tail = m.group(1), m.group(2)
        if old not in mapper.moved:
            return m.group(0)
        new = mapper.mapping[old].replace(".", "/")
        if old in SPLITS:
            return f"hf_qret/{new}/"
        if tail == "/":  # a package folder
            return f"hf_qret/{new}/"
        return f"hf_qret/{new}.py"

    text = PATHREF.sub(path, text)

    def by_path(m: re.Match) -> str:
        old = m.group(2)
        if old not in mapper.moved or old in SPLITS:
            return m.group(0)
        q, *folders, leaf = m.group(1), *mapper.mapping[old].split(".")
        return "os.path.join(package, " + "".join(f"{q}{f}{q}, " for f in folders) + f"{q}{leaf}.py{q})"

    return BY_PATH.sub(by_path, text)


def deeper_file_paths(text: str, depth: int) -> str:
    """``Path(__file__).resolve().parent.parent`` in a module moved ``depth`` folders deeper."""
    if depth <= 0:
        return text

    def parents(m: re.Match) -> str:
        count = m.group(1).count(".parent") if m.group(1) else int(m.group(2)) + 1
        return f"Path(__file__).resolve().parents[{count - 1 + depth}]"

    return re.sub(r"Path\(__file__\)\.resolve\(\)(?:((?:\.parent)+)(?!s)|\.parents\[(\d+)\])", parents, text)


# -------------------------------------------------------------------------------------------------- split
def split_module(text: str, old: str, parts_spec: dict[str, list[str]]) -> tuple[dict[str, str], dict[str, str]]:
    """Splits a module's top-level definitions into parts. Returns ({part: source}, {symbol: part}).

    Each part gets the module's imports it uses, the shared assignments it uses (``logger``), its own
    ``__all__`` names and imports of the other parts' names it uses; imports stay in the old (flat) form, to be
    rewritten with the rest.
    """
    tree = ast.parse(text)
    lines = text.splitlines(keepends=True)
    doc = ast.get_docstring(tree, clean=False)
    body = list(tree.body)
    if doc is not None:
        body = body[1:]
    header, defs, shared = [], [], {}
    all_names: list[str] | None = None
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            header.append(node)
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            all_names = [e.value for e in node.value.elts]
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defs.append(node)
        elif isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) for t in node.targets):
            if node.targets[0].id.startswith("_") or node.targets[0].id == "logger":
                shared[node.targets[0].id] = node
            else:
                defs.append(node)
        else:
            fail(f"hf_qret/{old}.py: cannot split a top-level {type(node).__name__} (line {node.lineno})")

    def defined(node: ast.AST) -> str:
        return node.name if not isinstance(node, ast.Assign) else node.targets[0].id

    def used(node: ast.AST) -> set[str]:
        return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}

    order = list(parts_spec)
    symbol_part = {name: part for part, names in parts_spec.items() for name in names}
    def_names = {defined(d) for d in defs}
    for name in sorted(set(n for names in parts_spec.values() for n in names) - def_names):
        log(f"note: hf_qret/{old}.py has no {name} (listed in SPLITS)")
    changed = True
    while changed:  # unlisted names join the part whose names they use
        changed = False
        for d in defs:
            name = defined(d)
            if name in symbol_part:
                continue
            for other in used(d):
                if other in symbol_part and symbol_part[other] != order[0]:
                    symbol_part[name] = symbol_part[other]
                    changed = True
                    break
    for d in defs:
        symbol_part.setdefault(defined(d), order[0])
    for d in defs:  # a part may use names of parts listed after it, never before (no import cycles)
        mine = order.index(symbol_part[defined(d)])
        for other in used(d) & def_names:
            if order.index(symbol_part[other]) > mine:
                fail(f"hf_qret/{old}.py: {defined(d)} ({symbol_part[defined(d)]}) uses {other} ({symbol_part[other]})")

    def segment(node: ast.AST, start_line: int) -> str:
        return "".join(lines[start_line - 1 : node.end_lineno])

    # each definition owns the comment lines and blank lines above it
    chunks: dict[str, list[str]] = {part: [] for part in order}
    prev_end = max([n.end_lineno for n in header + list(shared.values())] + [0])
    for node in body:
        if node in defs:
            start = prev_end + 1
            first = min([node.lineno] + [dec.lineno for dec in getattr(node, "decorator_list", [])])
            chunks[symbol_part[defined(node)]].append(segment(node, min(start, first)).strip("\n") + "\n")
        prev_end = max(prev_end, node.end_lineno)

    sources = {}
    for part in order:
        part_defs = [d for d in defs if symbol_part[defined(d)] == part]
        if not part_defs:
            continue
        names_used = set().union(*(used(d) for d in part_defs))
        part_all = [n for n in (all_names or []) if symbol_part.get(n) == part]
        if part == order[0]:  # re-exports in __all__ (imported names) stay with the first part
            part_all = [n for n in (all_names or []) if n not in symbol_part or symbol_part[n] == part]
        names_used |= set(part_all)
        needed_shared = [s for s in shared if s in names_used]
        for s in needed_shared:
            names_used |= used(shared[s])
        out = []
        if part == order[0] and doc is not None:
            docstring = ast.get_source_segment(text, tree.body[0])
            if part in SPLIT_FIRST_PARAGRAPH:
                quote = docstring[:3]
                rest = docstring[3:].split("\n\n", 1)
                docstring = quote + SPLIT_FIRST_PARAGRAPH[part] + ("\n\n" + rest[1] if len(rest) > 1 else quote)
            out.append(docstring + "\n")
        else:
            out.append(SPLIT_DOCS.get(part, f'"""Part of the former hf_qret.{old} module."""') + "\n")
        imports = []
        for node in header:
            if isinstance(node, ast.ImportFrom) and node.module == "__future__":
                imports.append(ast.get_source_segment(text, node))
                continue
            keep = [a for a in node.names if (a.asname or a.name).split(".")[0] in names_used]
            if not keep:
                continue
            if len(keep) == len(node.names):
                imports.append(ast.get_source_segment(text, node))
            else:
                clone = (
                    ast.ImportFrom(module=node.module, names=keep, level=node.level)
                    if isinstance(node, ast.ImportFrom)
                    else ast.Import(names=keep)
                )
                imports.append(ast.unparse(clone))
        cross: dict[str, list[str]] = {}
        for name in sorted(names_used & def_names):
            if symbol_part[name] != part:
                cross.setdefault(symbol_part[name], []).append(name)
        for names in cross.values():  # old flat form: hf_qret.<old> -> rewritten by symbol
            imports.append(f"from .{old} import {', '.join(names)}")
        out.append("\n".join(imports) + "\n")
        if part_all:
            out.append("__all__ = [\n" + "".join(f'    "{n}",\n' for n in part_all) + "]\n")
        for s in needed_shared:
            out.append(ast.get_source_segment(text, shared[s]) + "\n")
        out.extend("\n" + c for c in chunks[part])
        sources[part] = "\n".join(out)
    return sources, symbol_part


# --------------------------------------------------------------------------------------------- config files
RUFF_CONFIG = """
[tool.ruff]
line-length = 120
target-version = "py310"
# the two examples are laid out by hand so that their diff (examples/convert_sentence_transformers.diff, checked by
# a test) shows the conversion only
extend-exclude = [
  "recipes/data",
  "examples/train_sentence_transformers.py",
  "examples/convert_sentence_transformers.py",
]

[tool.ruff.lint]
# pycodestyle errors and warnings, pyflakes, isort, pyupgrade, bugbear.
select = ["E", "F", "W", "I", "UP", "B"]
ignore = [
  "E501",   # long lines: the formatter wraps code; the rest are URLs, tables and messages kept on one line
  "E731",   # small lambdas bound to names read better than nested defs in the tests and benchmarks
  "B905",   # zip() without strict=: the code zips sequences of equal length by construction
  "B028",   # warnings.warn without stacklevel: the warnings name the caller in their text
  "B023",   # closures defined in a loop are called within the same iteration here (the rule cannot see that)
]

[tool.ruff.lint.per-file-ignores]
# the package's TYPE_CHECKING imports are for type checkers; the public names are __all__, built from _EXPORTS
"hf_qret/__init__.py" = ["F401"]
# tests, benchmarks and examples import after sys.path / environment set-up; tests loop for repetitions only
"tests/**" = ["E402", "B007", "B011", "B017"]
"benchmarks/**" = ["E402"]
"examples/**" = ["E402"]
"recipes/**" = ["E402"]

[tool.ruff.lint.isort]
known-first-party = ["hf_qret"]

[tool.ruff.format]
quote-style = "double"
docstring-code-format = false
"""

IMPORTLINTER_CONFIG = """
[tool.importlinter]
root_package = "hf_qret"
# hf_qret/__init__.py imports every public name under TYPE_CHECKING only (for type checkers); at run time it is
# lazy, so those imports are not dependencies.
exclude_type_checking_imports = true

[[tool.importlinter.contracts]]
name = "serving never imports training (from hf_qret import QuantizedRetriever stays light)"
type = "forbidden"
source_modules = ["hf_qret.serving"]
forbidden_modules = [
  "hf_qret.training",
  "hf_qret.evaluation",
  "hf_qret.recipe",
  "hf_qret.cli",
  "hf_qret.hub.callback",
  "hf_qret.hub.cli",
]

[[tool.importlinter.contracts]]
name = "bank and index never import training, hub or evaluation"
type = "forbidden"
source_modules = ["hf_qret.bank", "hf_qret.index"]
forbidden_modules = ["hf_qret.training", "hf_qret.hub", "hf_qret.evaluation", "hf_qret.recipe", "hf_qret.cli"]

[[tool.importlinter.contracts]]
name = "the loss never imports the trainer"
type = "forbidden"
source_modules = ["hf_qret.training.loss"]
forbidden_modules = ["hf_qret.training.trainer"]

[[tool.importlinter.contracts]]
name = "entry points above training above hub and evaluation"
type = "layers"
layers = [
  "hf_qret.cli",
  "hf_qret.recipe",
  "hf_qret.training",
  "hf_qret.hub | hf_qret.evaluation",
]
"""

PRE_COMMIT = """# pre-commit install   (then: pre-commit run --all-files)
# Local hooks: they run the ruff and import-linter of the environment (the `test` extra installs both), so the
# hooks and CI check with the same versions and work offline.
repos:
  - repo: local
    hooks:
      - id: ruff-check
        name: ruff check --fix
        entry: ruff check --fix --force-exclude
        language: system
        types_or: [python, pyi]
        files: ^(hf_qret|tests|benchmarks|examples|recipes|tools)/
      - id: ruff-format
        name: ruff format
        entry: ruff format --force-exclude
        language: system
        types_or: [python, pyi]
        files: ^(hf_qret|tests|benchmarks|examples|recipes|tools)/
      - id: lint-imports
        name: import-linter (layering contracts in pyproject.toml)
        entry: lint-imports
        language: system
        pass_filenames: false
        files: ^(hf_qret/.*\\.py|pyproject\\.toml)$
"""

CI_LINT = """
# Lint: the formatter, the linter and the layering contracts (pyproject.toml's [tool.ruff] / [tool.importlinter]).
ruff check {paths}
ruff format --check {paths}
lint-imports
"""

LINT_TOOLS = ['"ruff>=0.8"', '"import-linter>=2.1"', '"pre-commit>=3.5"']


def packages_list() -> list[str]:
    found = []
    for init in sorted(PKG.rglob("__init__.py")):
        if "__pycache__" in init.parts:
            continue
        found.append(".".join(init.parent.relative_to(ROOT).parts))
    return sorted(found) + ["hf_qret.model_cards"]


def update_pyproject() -> None:
    path = ROOT / "pyproject.toml"
    text = path.read_text(encoding="utf-8")
    packages = "packages = [\n" + "".join(f'  "{p}",\n' for p in packages_list()) + "]"
    text, count = re.subn(r"(?ms)^packages = \[.*?\]", lambda m: packages, text, count=1)
    if not count:
        fail("pyproject.toml: no `packages = [...]` under [tool.setuptools]")
    match = re.search(r"(?m)^test = \[(.*)\]$", text)
    if not match:
        fail("pyproject.toml: no one-line `test = [...]` extra")
    items = match.group(1)
    for dep in LINT_TOOLS:
        if dep.split(">")[0].strip('"') not in items:
            items += ", " + dep
    text = text[: match.start()] + f"test = [{items}]" + text[match.end() :]
    if "[tool.ruff]" not in text:
        text = text.rstrip("\n") + "\n" + RUFF_CONFIG
    if "[tool.importlinter]" not in text:
        text = text.rstrip("\n") + "\n" + IMPORTLINTER_CONFIG
    path.write_text(text, encoding="utf-8")


def update_ci() -> None:
    path = ROOT / ".ci" / "run"
    if not path.exists():
        log("note: no .ci/run")
        return
    text = path.read_text(encoding="utf-8")
    if "lint-imports" in text:
        return
    anchor = "# The README's test command."
    if anchor not in text:
        fail(".ci/run: no line '# The README's test command.' to put the lint steps before")
    block = CI_LINT.format(paths=" ".join(LINT_PATHS)).lstrip("\n") + "\n"
    path.write_text(text.replace(anchor, block + anchor, 1), encoding="utf-8")


def write_pre_commit() -> None:
    path = ROOT / ".pre-commit-config.yaml"
    if path.exists():
        return
    path.write_text(PRE_COMMIT, encoding="utf-8")


# ------------------------------------------------------------------------------------------------ the move
def text_files() -> list[Path]:
    files = []
    for name in TEXT_DIRS:
        base = ROOT / name
        if not base.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
            for filename in sorted(filenames):
                path = Path(dirpath) / filename
                if path.suffix in TEXT_SUFFIXES and "__pycache__" not in path.parts:
                    files.append(path)
    files += [ROOT / f for f in TEXT_FILES if (ROOT / f).exists()]
    return files


def regenerate_derived_files() -> None:
    """Files generated from others that the rewrite and the formatter changed (tests check they are current)."""
    import difflib

    examples = ROOT / "examples"
    target = examples / "convert_sentence_transformers.diff"
    names = ("train_sentence_transformers.py", "convert_sentence_transformers.py")
    if target.exists() and all((examples / n).exists() for n in names):
        before, after = ((examples / n).read_text().splitlines(keepends=True) for n in names)
        target.write_text("".join(difflib.unified_diff(before, after, *names)))


def restructure(mapping: dict[str, str | None], found: dict[str, Path]) -> None:
    sources = {name: _source_file(path).read_text(encoding="utf-8") for name, path in found.items()}
    # 1. the split modules' parts, from the old text
    split_sources, split_parts = {}, {}
    for old, spec in SPLITS.items():
        if old in found:
            split_sources[old], split_parts[old] = split_module(sources[old], old, spec)
    mapper = Mapper(mapping, split_parts)

    # 2. git mv, sub-packages
    for layer in sorted({_layer(new) for new in mapping.values() if new}):
        folder = PKG / layer
        folder.mkdir(exist_ok=True)
        init = folder / "__init__.py"
        if not init.exists():
            doc = SUBPACKAGE_DOCS.get(layer, f"The {layer} layer of hf-qret.")
            init.write_text(f'"""{doc}\n"""\n', encoding="utf-8")
    # files: (current path, old dotted, old is pkg, new dotted, new is pkg)
    files: list[tuple[Path, str, bool, str, bool]] = []
    for old, path in sorted(found.items()):
        new = mapping[old]
        if new is None:
            files.append((path, f"hf_qret.{old}", False, f"hf_qret.{old}", False))
            continue
        if old in SPLITS:
            parts = split_sources[old]
            first = next(iter(parts))
            dest = PKG / (first.replace(".", "/") + ".py")
            run("git", "mv", str(path.relative_to(ROOT)), str(dest.relative_to(ROOT)))
            for part, source in parts.items():
                target = PKG / (part.replace(".", "/") + ".py")
                target.write_text(source, encoding="utf-8")
                files.append((target, f"hf_qret.{old}", False, f"hf_qret.{part}", False))
            run("git", "add", *[str((PKG / (p.replace(".", "/") + ".py")).relative_to(ROOT)) for p in parts])
            continue
        dest = PKG / new.replace(".", "/")
        if path.is_dir():
            run("git", "mv", str(path.relative_to(ROOT)), str(dest.relative_to(ROOT)))
            for sub in sorted(dest.rglob("*.py")):
                rel = sub.relative_to(dest).with_suffix("").parts
                is_pkg = rel[-1] == "__init__"
                rel = rel[:-1] if is_pkg else rel
                old_dotted = ".".join(("hf_qret", old, *rel))
                new_dotted = ".".join(("hf_qret", *new.split("."), *rel))
                files.append((sub, old_dotted, is_pkg, new_dotted, is_pkg))
        else:
            dest = dest.with_suffix(".py")
            run("git", "mv", str(path.relative_to(ROOT)), str(dest.relative_to(ROOT)))
            files.append((dest, f"hf_qret.{old}", False, f"hf_qret.{new}", False))
            sources_depth = new.count(".")
            text = dest.read_text(encoding="utf-8")
            if "__file__" in text:
                fixed = deeper_file_paths(text, sources_depth)
                if fixed == text:
                    log(f"CHECK BY HAND: hf_qret/{old}.py uses __file__ and moved {sources_depth} folder(s) deeper")
                else:
                    log(f"hf_qret/{new.replace('.', '/')}.py: __file__-relative paths one folder deeper")
                dest.write_text(fixed, encoding="utf-8")
    files.append((PKG / "__init__.py", "hf_qret", True, "hf_qret", True))

    # 3. dotted names (hf_qret.<old>.<name>) and paths everywhere; a bare hf_qret.<split module> stays
    for path in text_files():
        text = path.read_text(encoding="utf-8", errors="surrogateescape")
        new = rewrite_text(text, mapper)
        if new != text:
            path.write_text(new, encoding="utf-8", errors="surrogateescape")

    # 4. import statements: relative ones in hf_qret/ (against the old place), `from hf_qret.<split> import ...`
    #    everywhere (by name), then _EXPORTS
    in_package = {path.resolve() for path, *_ in files}
    for path, old_dotted, old_pkg, new_dotted, new_pkg in files:
        text = path.read_text(encoding="utf-8")
        text = rewrite_imports(text, old_dotted, old_pkg, new_dotted, new_pkg, mapper)
        path.write_text(text, encoding="utf-8")
    for path in text_files():
        if path.suffix != ".py" or path.resolve() in in_package:
            continue
        text = path.read_text(encoding="utf-8")
        new = rewrite_imports(text, "__outside__.module", False, "__outside__.module", False, mapper)
        if new != text:
            path.write_text(new, encoding="utf-8")
    rewrite_exports(PKG / "__init__.py", mapper)


def rewrite_exports(init: Path, mapper: Mapper) -> None:
    text = init.read_text(encoding="utf-8")
    tree = ast.parse(text)
    offsets = line_offsets(text)
    edits = []
    for node in tree.body:
        target = (
            node.target
            if isinstance(node, ast.AnnAssign)
            else (node.targets[0] if isinstance(node, ast.Assign) else None)
        )
        if not (isinstance(target, ast.Name) and target.id == "_EXPORTS" and isinstance(node.value, ast.Dict)):
            continue
        for key, value in zip(node.value.keys, node.value.values):
            old = value.value
            new = mapper.new_dotted(f"hf_qret.{old}.{key.value}")
            new = new[len("hf_qret.") : -len(key.value) - 1]
            if new != old:
                start, end = node_span(value, offsets, text)
                edits.append((start, end, f'"{new}"'))
    for start, end, replaced in sorted(edits, reverse=True):
        text = text[:start] + replaced + text[end:]
    init.write_text(text, encoding="utf-8")


# -------------------------------------------------------------------------------------------- self-check
def stale_references() -> list[tuple[str, str]]:
    """Dotted ``hf_qret.a.b`` references whose ``a`` (or ``a.b`` in a sub-package) is no module, package or public
    name of the restructured tree (e.g. a module name the rewrite did not know). ``hf_qret.nope``: the test that a
    missing name raises AttributeError."""
    exports = set(re.findall(r'^\s+"(\w+)": "[\w.]+",$', (PKG / "__init__.py").read_text(encoding="utf-8"), re.M))
    found = []
    for path in text_files():
        text = path.read_text(encoding="utf-8", errors="surrogateescape")
        for match in DOTTED.finditer(text):
            parts = match.group(1)[1:].split(".")
            first = PKG / parts[0]
            if parts[0].startswith("_") or parts[0] in exports or parts[0] in ("model_cards", "nope"):
                continue
            if first.with_suffix(".py").exists():
                continue
            if first.is_dir() and (
                len(parts) == 1 or (first / f"{parts[1]}.py").exists() or (first / parts[1]).is_dir()
            ):
                continue
            line = text.count("\n", 0, match.start()) + 1
            found.append((f"{path.relative_to(ROOT)}:{line}", match.group(0)))
    return found


def self_check() -> bool:
    ok = True
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    modules = []
    for path in sorted(PKG.rglob("*.py")):
        if "__pycache__" in path.parts or path.parent.name == "ir_retrieval" and path.stem == "ir_retrieval":
            continue  # the evaluate metric script is loaded by `evaluate`, not imported
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    script = (
        "import importlib, os, sys\n"
        # an editable install's finder would serve a module missing here from the installed checkout: drop it
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
        f"for m in {modules!r}:\n"
        "    importlib.import_module(m)\n"
        "import hf_qret\n"
        "for name in hf_qret._EXPORTS:\n"
        "    getattr(hf_qret, name)\n"
        f"root = {str(PKG)!r} + os.sep\n"
        "stray = [n for n, m in list(sys.modules.items()) if n.startswith('hf_qret.') and getattr(m, '__file__', None)"
        " and not m.__file__.startswith(root)]\n"
        "assert not stray, f'imported from outside this tree: {stray}'\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, text=True, capture_output=True, env=env)
    if result.returncode:
        log(f"SELF-CHECK FAILED: importing the modules:\n{result.stderr[-3000:]}")
        ok = False
    else:
        log(f"self-check: {len(modules)} modules import; every _EXPORTS name resolves")
    stale = stale_references()
    if stale:
        log("CHECK BY HAND: hf_qret.<name> references that name no module or public name of the new tree:")
        for where, ref in stale:
            log(f"    {where}: {ref}")
    stack = [
        "transformers.trainer",
        "peft",
        "datasets",
        "evaluate",
        "accelerate",
        "matplotlib",
        "sentence_transformers",
    ]
    light = subprocess.run(
        [sys.executable, "-c", f"import sys\nfrom hf_qret import QuantizedRetriever\nprint([m for m in {stack!r} if m in sys.modules])"],
        cwd=ROOT, text=True, capture_output=True, env=env,
    )  # fmt: skip
    if light.returncode or light.stdout.strip() != "[]":
        log(f"SELF-CHECK FAILED: the serving import loads {light.stdout.strip()} {light.stderr[-2000:]}")
        ok = False
    else:
        log("self-check: `from hf_qret import QuantizedRetriever` loads none of the training stack")
    contracts = subprocess.run([tool("lint-imports")], cwd=ROOT, text=True, capture_output=True, env=env)
    log("lint-imports:\n" + textwrap.indent((contracts.stdout + contracts.stderr).strip()[-4000:], "    "))
    ok &= contracts.returncode == 0
    for cmd in ([tool("ruff"), "check", *LINT_PATHS], [tool("ruff"), "format", "--check", *LINT_PATHS]):
        lint = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True)
        if lint.returncode:
            log(f"SELF-CHECK FAILED: {' '.join(cmd[1:3])}:\n{(lint.stdout + lint.stderr)[-4000:]}")
            ok = False
        else:
            log(f"self-check: ruff {cmd[1]} clean")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="print the mapping and stop")
    parser.add_argument("--allow-dirty", action="store_true", help="run on a work tree with uncommitted changes")
    args = parser.parse_args()
    os.chdir(ROOT)
    if already_restructured():
        log("hf_qret/ is already restructured (hf_qret/training/ exists, hf_qret/trainer.py does not): nothing to do.")
        return
    if (PKG / "training").exists():
        fail("hf_qret/training/ exists next to the flat modules: a half-restructured tree; reset it first.")
    if not args.allow_dirty and not args.dry_run and run("git", "status", "--porcelain").stdout.strip():
        fail("the work tree has uncommitted changes; commit or stash them (or pass --allow-dirty).")
    found = old_modules()
    mapping = compute_mapping(found)
    for old in sorted(found):
        new = mapping[old]
        kind = "/" if found[old].is_dir() else ".py"
        if old in SPLITS:
            target = " + ".join(f"hf_qret/{p.replace('.', '/')}.py" for p in SPLITS[old])
        else:
            target = "(stays)" if new is None else f"hf_qret/{new.replace('.', '/')}{kind}"
        log(f"  hf_qret/{old}{kind:<4} -> {target}")
    if args.dry_run:
        return
    restructure(mapping, found)
    update_pyproject()
    write_pre_commit()
    update_ci()
    ruff = tool("ruff")
    run(ruff, "check", "--fix", "--select", "I,F401", *LINT_PATHS, check=False)  # imports sorted before format
    run(ruff, "format", *LINT_PATHS)
    fixed = run(ruff, "check", "--fix", *LINT_PATHS, check=False)
    run(ruff, "format", *LINT_PATHS)
    if fixed.returncode:
        log("ruff check --fix left findings (see the self-check)")
    regenerate_derived_files()
    run("git", "add", "-A", "hf_qret", "tests", "benchmarks", "examples", "recipes", "pyproject.toml", "README.md",
        ".pre-commit-config.yaml", *[p for p in (".ci", "docs", "model_cards") if (ROOT / p).exists()])  # fmt: skip
    if not self_check():
        fail("the tree is restructured but the self-check failed: fix the findings above (or the mapping) and commit.")
    log("done: review `git diff --cached --stat -M` and commit.")


if __name__ == "__main__":
    main()
