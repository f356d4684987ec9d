"""Push artifact folders to the Hugging Face Hub and pull single files back, with errors that say why.

Two functions carry every Hub transfer of the library: :func:`upload_artifact_folder` (a mask artifact,
a drift report, any folder) and :func:`download_artifact_file` (one file, through the shared
``huggingface_hub`` cache, so a later offline load finds it). :func:`card_text` renders a model card
whose YAML metadata a Hub indexes (``base_model``, ``tags``, ``library_name``).

Failures surface as :class:`HubError` (an ``OSError``, like the client's own errors) naming the repo,
the revision, the HTTP status and the server's message; a missing repo, revision or file, or a file
missing from the cache while offline, is a :class:`HubNotFoundError`, which is also a
:class:`~safety_peft.errors.MaskFileError`. The original ``huggingface_hub`` error is chained
(``err.__cause__``). Nothing here writes to the folder being pushed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from huggingface_hub import HfApi, ModelCardData, constants, hf_hub_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HfUriError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from .errors import MaskFileError, SafetyPeftError

__all__ = [
    "HubError",
    "HubNotFoundError",
    "card_text",
    "download_artifact_file",
    "is_offline",
    "looks_like_repo_id",
    "upload_artifact_folder",
]

LIBRARY_NAME = "safety-peft"
_COMMIT_HASH = re.compile(r"[0-9a-f]{40}")


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level errors of whichever HTTP library this huggingface_hub uses (httpx2 or httpx)."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module in ("httpx2", "httpx"):
        try:
            errors.append(__import__(module).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


_TRANSPORT_ERRORS = _transport_errors()


class HubError(SafetyPeftError, OSError):
    """A Hub transfer failed. Attributes: ``repo_id``, ``revision``, ``filename``, ``status`` (HTTP status
    or ``None`` when no answer came) and ``server_message`` (what the server said, if anything)."""

    def __init__(
        self,
        message: str,
        *,
        repo_id: str,
        revision: str | None = None,
        filename: str | None = None,
        status: int | None = None,
        server_message: str | None = None,
    ):
        super().__init__(message)
        self.repo_id = repo_id
        self.revision = revision
        self.filename = filename
        self.status = status
        self.server_message = server_message

    def __str__(self) -> str:  # OSError would format a 1-tuple of args oddly otherwise
        return self.args[0]


class HubNotFoundError(HubError, MaskFileError):
    """The repo, revision or file does not exist on the Hub, or is not in the cache while offline.
    ``kind`` is ``"repo"``, ``"revision"``, ``"file"`` or ``"cache"``."""

    def __init__(self, message: str, *, kind: str, **kwargs):
        super().__init__(message, **kwargs)
        self.kind = kind


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]{0,95}(/[A-Za-z0-9][\w.\-]{0,95})?$")


def looks_like_repo_id(value: str) -> bool:
    """``name`` or ``namespace/name`` in the Hub's spelling, and not an existing local path."""
    return (
        isinstance(value, str)
        and bool(_REPO_ID.match(value))
        and ".." not in value
        and "--" not in value
        and not value.endswith(".")
        and not os.path.exists(value)
    )


def is_offline() -> bool:
    """True when ``huggingface_hub`` is in offline mode, or ``HF_HUB_OFFLINE`` is set now (the client only
    reads the variable when it is imported; we also honour it when set later)."""
    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.is_offline_mode() or env.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _http_status(err: HfHubHTTPError) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


def _server_words(err: BaseException) -> str | None:
    message = getattr(err, "server_message", None)
    return message.strip() or None if isinstance(message, str) else None


def _where(repo_id: str, revision: str | None) -> str:
    return f"'{repo_id}'" + (f" (revision '{revision}')" if revision else "")


def upload_artifact_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | bool | None = None,
    endpoint: str | None = None,
) -> str:
    """Push every file of ``folder`` to the model repo ``repo_id`` in one commit; return the commit URL.

    The repo is created if needed (``private`` applies only then). A ``revision`` that is not ``main``
    names a branch: it is created from ``main`` if it does not exist (the Hub refuses commits to a
    missing branch). The local folder is only read: a refused or failed push leaves it as it was, and
    raises :class:`HubError` saying which repo, which HTTP status and what the server answered.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Cannot push {str(folder)!r} to the Hub: it is not a folder.")
    if not any(p.is_file() for p in folder.rglob("*")):
        raise FileNotFoundError(f"Cannot push {str(folder)!r} to the Hub: the folder holds no file.")
    if revision is not None and _COMMIT_HASH.fullmatch(revision):
        raise ValueError(f"Cannot push to revision {revision!r}: it is a commit hash; pass a branch name.")

    api = HfApi(endpoint=endpoint, token=token)
    where = _where(repo_id, revision)
    try:
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
        except HfUriError:
            # huggingface_hub found the repo after a 401/403 on create (no right to create, but it
            # exists) and then failed to format its URL for a non-default endpoint: the repo exists.
            pass
        if revision not in (None, constants.DEFAULT_REVISION) and not revision.startswith("refs/pr/"):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            revision=revision,
            commit_message=commit_message or f"Upload {folder.name} with {LIBRARY_NAME}",
        )
    except OfflineModeIsEnabled as err:
        raise HubError(
            f"Cannot push {str(folder)!r} to {where}: offline mode is on (HF_HUB_OFFLINE). "
            "The local folder was not changed.",
            repo_id=repo_id,
            revision=revision,
        ) from err
    except HfHubHTTPError as err:
        status = _http_status(err)
        said = _server_words(err)
        hint = {
            401: " Check your token (HF_TOKEN or `hf auth login`).",
            403: " Check that your token has write access to this repo or namespace.",
            404: " The repo or branch could not be found or created with this token.",
        }.get(status or 0, "")
        raise HubError(
            f"Cannot push {str(folder)!r} to {where}: the Hub answered HTTP {status}"
            + (f" ({said})" if said else "")
            + f".{hint} The local folder was not changed.",
            repo_id=repo_id,
            revision=revision,
            status=status,
            server_message=said,
        ) from err
    except _TRANSPORT_ERRORS as err:
        raise HubError(
            f"Cannot push {str(folder)!r} to {where}: could not reach the Hub at {api.endpoint} ({err}). "
            "The local folder was not changed.",
            repo_id=repo_id,
            revision=revision,
        ) from err
    return str(info.commit_url)


def download_artifact_file(
    repo_id: str,
    filename: str,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    endpoint: str | None = None,
) -> str:
    """Return the local path of ``filename`` from ``repo_id`` at ``revision`` (branch, tag or commit),
    downloading it into the Hugging Face cache if needed.

    Offline (``local_files_only=True``, or ``HF_HUB_OFFLINE=1``) it answers from the cache alone: a
    branch or tag resolves to the commit it pointed to when the file was last downloaded. A missing
    repo, revision or file, or a file that is not cached while offline, raises
    :class:`HubNotFoundError`; other failures raise :class:`HubError`.
    """
    offline = local_files_only or is_offline()
    where = _where(repo_id, revision)
    common = dict(repo_id=repo_id, revision=revision, filename=filename)
    try:
        return hf_hub_download(
            repo_id,
            filename,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            local_files_only=offline,
            endpoint=endpoint,
        )
    except RevisionNotFoundError as err:
        raise HubNotFoundError(
            f"The Hub repo '{repo_id}' has no revision '{revision}' (no branch, tag or commit of that name).",
            kind="revision",
            status=_http_status(err),
            server_message=_server_words(err),
            **common,
        ) from err
    except RemoteEntryNotFoundError as err:
        raise HubNotFoundError(
            f"The Hub repo {where} has no file '{filename}'.",
            kind="file",
            status=_http_status(err),
            server_message=_server_words(err),
            **common,
        ) from err
    except RepositoryNotFoundError as err:
        raise HubNotFoundError(
            f"The Hub has no repo '{repo_id}', or it is private or gated and this token cannot see it.",
            kind="repo",
            status=_http_status(err),
            server_message=_server_words(err),
            **common,
        ) from err
    except LocalEntryNotFoundError as err:
        cache = cache_dir or constants.HF_HUB_CACHE
        if offline:
            raise HubNotFoundError(
                f"'{filename}' of {where} is not in the Hugging Face cache ({cache}) and offline mode is on "
                "(local_files_only=True or HF_HUB_OFFLINE=1). Download it once while online.",
                kind="cache",
                **common,
            ) from err
        raise HubError(
            f"Cannot download '{filename}' of {where}: the Hub could not be reached and the file is not in "
            f"the cache ({cache}).",
            **common,
        ) from err
    except (GatedRepoError, HfHubHTTPError) as err:
        status = _http_status(err)
        said = _server_words(err)
        raise HubError(
            f"Cannot download '{filename}' of {where}: the Hub answered HTTP {status}"
            + (f" ({said})" if said else "")
            + ".",
            status=status,
            server_message=said,
            **common,
        ) from err
    except _TRANSPORT_ERRORS as err:
        raise HubError(f"Cannot download '{filename}' of {where}: {err}", **common) from err


def card_text(
    body: str,
    *,
    base_model: str | None = None,
    tags: Iterable[str] = (),
    library_name: str = LIBRARY_NAME,
    **metadata,
) -> str:
    """A model card (README.md text): YAML metadata the Hub indexes, then ``body`` (Markdown).

    ``tags`` always include ``safety-peft``. ``base_model`` is written only when it looks like a Hub repo
    id and is not a local path (the Hub rejects other values). Other keyword arguments become metadata
    fields as given.
    """
    all_tags = [LIBRARY_NAME] + [t for t in tags if t != LIBRARY_NAME]
    if base_model is not None and not looks_like_repo_id(base_model):
        base_model = None
    data = ModelCardData(base_model=base_model, library_name=library_name, tags=all_tags, **metadata)
    return f"---\n{data.to_yaml()}\n---\n\n{body.strip()}\n"
