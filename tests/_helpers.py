"""Helpers shared by the test modules: multi-process runs under ``torch.distributed.run`` (torchrun), a Hub API
stand-in for the ``Trainer``'s pushes, and a recorder of the index refresh modes a training run uses."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from unittest import mock

REPO = Path(__file__).resolve().parents[1]
DIST_WORKERS = REPO / "tests" / "dist_workers.py"


def load_benchmark(name: str) -> Any:
    """``benchmarks/<name>.py`` imported as a module (the benchmarks are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    """A TCP port free on this machine now (for a process group's rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(
    script: Path,
    *args: str,
    nproc: int = 2,
    timeout: int = 300,
    pythonpath: Sequence[Path] = (REPO / "tests", REPO),
    unset_env: Sequence[str] = (),
) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc_per_node NPROC --master_port PORT script args...`` on a free port,
    with ``PYTHONPATH`` set to ``pythonpath`` (the repository's ``tests/`` and root by default) and the variables of
    ``unset_env`` removed; asserts it exits with status 0 (its stderr's end in the message) and returns it."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(path) for path in pythonpath)}
    for name in unset_env:
        env.pop(name, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(free_port()), str(script), *args]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def dist_workers(*args: str, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """:func:`torchrun` of ``tests/dist_workers.py`` with ``args``."""
    return torchrun(DIST_WORKERS, *args, nproc=nproc, timeout=timeout)


class FakeTrainerHubApi:
    """Stands in for the ``HfApi`` of ``transformers.trainer.hf_api`` (patch it with :meth:`patch`): ``create_repo``
    answers ``repo_id``; every ``upload_folder`` call is recorded in :attr:`uploads` with the files the folder held at
    that moment (relative POSIX paths, ``None`` when there was no folder) and returns a finished future."""

    def __init__(self, repo_id: str = "user/model") -> None:
        self.repo_id = repo_id
        #: One dict per upload: ``folder_path``, ``path_in_repo``, ``ignore_patterns``, ``files``.
        self.uploads: list[dict[str, Any]] = []

    def upload_folder(self, *, folder_path: str, path_in_repo: str | None = None, ignore_patterns: Any = (),
                      **kwargs: Any) -> Any:  # fmt: skip
        root = Path(folder_path)
        files = (
            sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) if root.is_dir() else None
        )
        self.uploads.append(
            {"folder_path": folder_path, "path_in_repo": path_in_repo, "ignore_patterns": list(ignore_patterns or ()),
             "files": files}
        )  # fmt: skip
        future = mock.Mock()
        future.done.return_value = True
        return future

    def create_repo(self, *args: Any, **kwargs: Any) -> Any:
        return mock.Mock(repo_id=self.repo_id)

    def patch(self) -> Any:
        """``mock.patch`` of ``transformers.trainer.hf_api`` returning this stand-in."""
        return mock.patch("transformers.trainer.hf_api", return_value=self)


def record_refresh_modes(trainer: Any) -> list[str]:
    """Wraps ``trainer.index.refresh`` so that every refresh's mode is appended to the returned list (the refresh
    itself still runs)."""
    modes: list[str] = []
    original = trainer.index.refresh

    def refresh(vectors: Any, mode: str = "reencode", rows: Any = None, **kwargs: Any) -> Any:
        modes.append(mode)
        return original(vectors, mode=mode, rows=rows, **kwargs)

    trainer.index.refresh = refresh
    return modes
