"""Every Hub failure a user can cause ends ``hf-qret push`` with one clear line and exit status 1, and leaves the
artifact folder as it was (no Hub is contacted: the real huggingface_hub exception classes are raised by fakes)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from test_hub import artifact, hub  # noqa: F401  (fixtures)

from hf_qret.cli import main


def _http_error(status: int):
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, Response

    request = sys.modules[Response.__module__].Request("POST", "https://huggingface.co/api/repos/create")
    cls = RepositoryNotFoundError if status == 404 else HfHubHTTPError
    return cls(f"{status} Client Error", response=Response(status, request=request))


def _connect_error():
    from huggingface_hub.errors import HTTPError

    transport = sys.modules[HTTPError.__module__]  # the httpx huggingface_hub uses (httpx, or httpx2)
    return transport.ConnectError("[Errno -2] Name or service not known")


def _failures():
    from huggingface_hub.errors import HFValidationError, LocalTokenNotFoundError, OfflineModeIsEnabled

    return {
        "offline": (OfflineModeIsEnabled("offline mode is enabled"), "HF_HUB_OFFLINE is set"),
        "no network": (_connect_error(), "cannot be reached (ConnectError"),
        "no token": (LocalTokenNotFoundError("Token is required"), "no Hub token"),
        "wrong token": (_http_error(401), "does not accept the token"),
        "no write access": (_http_error(403), "no write access to me/tiny-qret"),
        "name taken": (_http_error(409), "the name me/tiny-qret is taken"),
        "not found": (_http_error(404), "was not found"),
        "bad id": (HFValidationError("Repo id must be in the form 'repo_name'"), "not a valid repository id"),
    }


def _state(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("failure", list(_failures()))
@pytest.mark.parametrize("at", ["create_repo", "upload_folder"])
def test_push_failures_are_one_line_exit_1_and_leave_the_folder_as_it_was(
    artifact,  # noqa: F811
    hub,  # noqa: F811
    tmp_path,
    monkeypatch,
    capsys,
    failure,
    at,
):
    from huggingface_hub import HfApi

    error, message = _failures()[failure]

    def fail(api, *args, **kwargs):
        raise error

    monkeypatch.setattr(HfApi, at, fail)
    folder = tmp_path / "copy"
    shutil.copytree(artifact, folder)
    (folder / "README.md").write_text("# a card of another library: push re-renders hf-qret's\n")
    before = _state(folder)
    status = main(["push", str(folder), "--repo-id", "me/tiny-qret"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1
    assert err[-1].startswith("error: cannot ") and message in err[-1] and "Traceback" not in "\n".join(err)
    assert hub.uploads == []
    if at == "create_repo":  # nothing is written before the Hub has accepted the repository
        assert _state(folder) == before
    assert {p.name for p in folder.rglob("*.tmp")} == {
        "index.faiss.tmp"
    }  # the fixture's stray one: nothing half-written


def test_push_with_hf_hub_offline_set_is_one_line_exit_1(artifact, tmp_path, monkeypatch, capsys):  # noqa: F811
    """The real huggingface_hub (no fake): with HF_HUB_OFFLINE=1 (the tests' environment) it refuses to connect."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    before = _state(artifact)
    assert main(["push", str(artifact), "--repo-id", "me/tiny-qret"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len([line for line in err if line.startswith("error:")]) == 1 and "HF_HUB_OFFLINE is set" in err[-1]
    assert _state(artifact) == before
