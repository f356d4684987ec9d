"""A small fake Hugging Face Hub for tests: loopback only, standard library only, state in memory.

It implements what ``huggingface_hub`` 2.4 calls for ``create_repo``, ``create_branch``/``create_tag``,
``upload_folder``/``create_commit`` (regular uploads: the preupload answer is always ``"regular"``, so
no LFS or Xet traffic), ``repo_info``/``list_repo_refs`` and ``hf_hub_download``, and answers errors the
way the real Hub does (404 with ``X-Error-Code`` ``RepoNotFound`` / ``RevisionNotFound`` /
``EntryNotFound``; a commit to a branch that does not exist is refused with ``RevisionNotFound``, as
on huggingface.co, so client code must create the branch first).

Test switches: ``hub.refuse_writes = True`` answers 403 to every write; ``FakeHub(token="...")``
requires that bearer token on writes and on private repos. ``hub.requests`` logs every request.

Use the ``fake_hub`` fixture (import it into a test module, or list this module in ``pytest_plugins``):
it starts a server, points ``huggingface_hub`` at it (endpoint, a temporary ``HF_HOME`` cache, no
token, online) and stops it afterwards.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

# What huggingface.co puts in a fresh repo's first commit.
INITIAL_GITATTRIBUTES = (
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
)

_REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_ACTIONS = ("revision", "preupload", "commit", "branch", "tag", "refs", "tree")


def git_blob_oid(data: bytes) -> str:
    """The git blob sha1: the ETag the Hub gives a regular file, and the oid the client compares."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    parent: str | None
    files: dict[str, bytes]
    title: str


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit oid
    tags: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> str | None:
        """Branch, then tag, then full commit oid -> commit oid (None when unknown)."""
        if revision in self.branches:
            return self.branches[revision]
        if revision in self.tags:
            return self.tags[revision]
        if revision in self.commits:
            return revision
        return None


@dataclass
class RequestRecord:
    method: str
    path: str  # path and query as received
    status: int
    authorization: str | None


Answer = tuple[int, dict, bytes]  # status, headers, body


class HubError(Exception):
    """Raised inside a handler; turned into an HTTP error answer shaped like the Hub's."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


class FakeHub:
    """In-memory Hub on 127.0.0.1 at an ephemeral port. ``with FakeHub() as hub: hub.endpoint``."""

    def __init__(self, *, token: str | None = None):
        self.token = token
        self.refuse_writes = False
        self.requests: list[RequestRecord] = []
        self.validated_yaml: list[str] = []
        self._repos: dict[tuple[str, str], Repo] = {}
        self._lock = threading.RLock()
        self._counter = 0
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._endpoint: str | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "FakeHub":
        handler = type("Handler", (_Handler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        host, port = self._httpd.server_address[:2]
        self._endpoint = f"http://{host}:{port}"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, args=(0.05,), name="fake-hub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening: later requests get 'connection refused' (one connection per request, so
        nothing stays open)."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)
            self._httpd = None

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:<port>``; kept after :meth:`stop` (the port then refuses connections)."""
        if self._endpoint is None:
            raise RuntimeError("the fake Hub was never started")
        return self._endpoint

    # ------------------------------------------------------------------ inspection / seeding
    def repo(self, repo_id: str, repo_type: str = "model") -> Repo | None:
        with self._lock:
            return self._repos.get((repo_type, repo_id))

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """The files of ``repo_id`` at ``revision`` (a copy); KeyError for an unknown repo or revision."""
        with self._lock:
            repo = self._repos[(repo_type, repo_id)]
            oid = repo.resolve(revision)
            if oid is None:
                raise KeyError(revision)
            return dict(repo.commits[oid].files)

    def write_requests(self) -> list[RequestRecord]:
        """Logged requests that try to change a repo."""
        return [r for r in self.requests if r.method == "POST" and "validate-yaml" not in r.path]

    def create_repo(self, repo_id: str, *, repo_type: str = "model", private: bool = False) -> Repo:
        with self._lock:
            key = (repo_type, repo_id)
            if key in self._repos:
                return self._repos[key]
            repo = Repo(repo_id=repo_id, repo_type=repo_type, private=private)
            first = self._new_commit(repo, None, {".gitattributes": INITIAL_GITATTRIBUTES}, "initial commit")
            repo.branches["main"] = first.oid
            self._repos[key] = repo
            return repo

    def _new_commit(self, repo: Repo, parent: str | None, files: dict[str, bytes], title: str) -> Commit:
        self._counter += 1
        seed = json.dumps([repo.repo_id, parent, title, self._counter, sorted(files)]).encode()
        blobs = b"".join(git_blob_oid(files[p]).encode() for p in sorted(files))
        oid = hashlib.sha1(seed + blobs).hexdigest()
        commit = Commit(oid=oid, parent=parent, files=dict(files), title=title)
        repo.commits[oid] = commit
        return commit


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.0"  # one request per connection: a stopped hub really refuses

    def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
        pass

    # ------------------------------------------------------------------ plumbing
    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _json_body(self) -> dict:
        body = self._read_body()
        try:
            return json.loads(body or b"{}")
        except json.JSONDecodeError as err:
            raise HubError(400, f"body is not JSON: {err}") from err

    def _dispatch(self, method: str) -> None:
        status = 500
        try:
            status, headers, body = self._route(method)
        except HubError as err:
            status = err.status
            headers = {"X-Error-Message": err.message, **err.headers}
            if err.code:
                headers["X-Error-Code"] = err.code
            body = json.dumps({"error": err.message}).encode()
        except Exception as err:  # a bug in the fake: answer 400 (500 would make the client retry for long)
            status, headers, body = 400, {"X-Error-Message": f"fake hub bug: {err!r}"}, b"{}"
        with self.hub._lock:
            self.hub.requests.append(
                RequestRecord(method, self.path, status, self.headers.get("Authorization"))
            )
        self.send_response(status)
        headers.setdefault("Content-Type", "application/json")
        headers.setdefault("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(body)

    @staticmethod
    def _json(status: int, payload: Any) -> Answer:
        return status, {}, json.dumps(payload).encode()

    # ------------------------------------------------------------------ auth helpers
    def _bearer(self) -> str | None:
        value = self.headers.get("Authorization") or ""
        return value[7:] if value.lower().startswith("bearer ") else None

    def _check_write(self, what: str) -> None:
        hub = self.hub
        if hub.token is not None and self._bearer() != hub.token:
            raise HubError(401, "Invalid credentials in Authorization header")
        if hub.refuse_writes:
            raise HubError(403, f"You don't have the rights to {what}")

    def _get_repo(self, repo_type: str, repo_id: str) -> Repo:
        repo = self.hub.repo(repo_id, repo_type)
        token = self.hub.token
        hidden = repo is not None and repo.private and token is not None and self._bearer() != token
        if repo is None or hidden:
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _resolve(self, repo: Repo, revision: str) -> str:
        oid = repo.resolve(revision)
        if oid is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return oid

    # ------------------------------------------------------------------ routing
    def _route(self, method: str) -> Answer:
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.split("/") if p != ""]
        query = parse_qs(url.query)
        if parts[:1] == ["api"]:
            if method == "POST" and parts[1:] == ["repos", "create"]:
                return self._create_repo(self._json_body())
            if method == "POST" and parts[1:] == ["validate-yaml"]:
                return self._validate_yaml(self._json_body())
            if len(parts) >= 3 and parts[1] in _REPO_TYPES:
                return self._repo_api(method, _REPO_TYPES[parts[1]], parts[2:], query)
        elif "resolve" in parts and method in ("GET", "HEAD"):
            i = parts.index("resolve")
            repo_type, id_parts = "model", parts[:i]
            if id_parts and id_parts[0] in ("datasets", "spaces"):
                repo_type, id_parts = _REPO_TYPES[id_parts[0]], id_parts[1:]
            if 1 <= len(id_parts) <= 2 and len(parts) > i + 2:
                return self._resolve_file(method, repo_type, "/".join(id_parts), parts[i + 1], parts[i + 2 :])
        raise HubError(404, f"fake hub: no route for {method} {url.path}")

    def _repo_api(self, method: str, repo_type: str, rest: list[str], query: dict) -> Answer:
        # rest = <id parts...> [<action> <args...>]; the id has one or two parts.
        cut = next((i for i, p in enumerate(rest) if p in _ACTIONS and i in (1, 2)), len(rest))
        repo_id, args = "/".join(rest[:cut]), rest[cut + 1 :]
        action = rest[cut] if cut < len(rest) else None
        if not 1 <= cut <= 2:
            raise HubError(404, "bad repo id")
        if method == "GET" and action is None:
            return self._repo_info(repo_type, repo_id, "main")
        if method == "GET" and action == "revision" and len(args) == 1:
            return self._repo_info(repo_type, repo_id, args[0])
        if method == "GET" and action == "refs":
            return self._refs(repo_type, repo_id)
        if method == "GET" and action == "tree" and args:
            return self._tree(repo_type, repo_id, args[0], "/".join(args[1:]))
        if method == "POST" and action == "preupload" and len(args) == 1:
            return self._preupload(repo_type, repo_id, args[0], self._json_body())
        if method == "POST" and action == "commit" and len(args) == 1:
            return self._commit(repo_type, repo_id, args[0], self._read_body(), query)
        if method == "POST" and action == "branch" and len(args) == 1:
            return self._create_branch(repo_type, repo_id, args[0], self._json_body())
        if method == "POST" and action == "tag" and len(args) == 1:
            return self._create_tag(repo_type, repo_id, args[0], self._json_body())
        raise HubError(404, f"fake hub: no route for {method} {self.path}")

    # ------------------------------------------------------------------ endpoints
    def _create_repo(self, payload: dict) -> Answer:
        name, org = payload.get("name"), payload.get("organization")
        if not name:
            raise HubError(400, "missing repo name")
        repo_id = f"{org}/{name}" if org else name
        repo_type = payload.get("type") or "model"
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        url = f"{self.hub.endpoint}/{prefix}{repo_id}"
        self._check_write(f"create a {repo_type} under the namespace {org!r}")
        with self.hub._lock:
            if self.hub.repo(repo_id, repo_type) is not None:
                said = "You already created this model repo"
                return 409, {"X-Error-Message": said}, json.dumps({"error": said, "url": url}).encode()
            private = payload.get("private") or payload.get("visibility") == "private"
            self.hub.create_repo(repo_id, repo_type=repo_type, private=bool(private))
        return self._json(200, {"url": url, "name": repo_id})

    def _validate_yaml(self, payload: dict) -> Answer:
        content = payload.get("content", "")
        self.hub.validated_yaml.append(content)
        if content.startswith("---") and "\n---" not in content[3:]:
            return self._json(400, {"errors": [{"message": "metadata block is not closed by '---'"}]})
        return self._json(200, {"errors": [], "warnings": []})

    def _repo_info(self, repo_type: str, repo_id: str, revision: str) -> Answer:
        with self.hub._lock:
            repo = self._get_repo(repo_type, repo_id)
            oid = self._resolve(repo, revision)
            files = repo.commits[oid].files
            info = {
                "id": repo_id,
                "sha": oid,
                "private": repo.private,
                "siblings": [{"rfilename": p, "size": len(b)} for p, b in sorted(files.items())],
                "tags": [],
            }
        return self._json(200, info)

    def _refs(self, repo_type: str, repo_id: str) -> Answer:
        with self.hub._lock:
            repo = self._get_repo(repo_type, repo_id)
            refs = {
                kind: [{"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": o} for n, o in table.items()]
                for kind, table in (("heads", repo.branches), ("tags", repo.tags))
            }
        return self._json(200, {"branches": refs["heads"], "tags": refs["tags"], "converts": []})

    def _tree(self, repo_type: str, repo_id: str, revision: str, prefix: str) -> Answer:
        with self.hub._lock:
            repo = self._get_repo(repo_type, repo_id)
            files = repo.commits[self._resolve(repo, revision)].files
            prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
            entries = [
                {"type": "file", "oid": git_blob_oid(b), "size": len(b), "path": p}
                for p, b in sorted(files.items())
                if p.startswith(prefix)
            ]
        return self._json(200, entries)

    def _preupload(self, repo_type: str, repo_id: str, revision: str, payload: dict) -> Answer:
        with self.hub._lock:
            repo = self._get_repo(repo_type, repo_id)
            self._check_write(f"write to {repo_id}")
            files = repo.commits[self._resolve(repo, revision)].files
            answer = [
                {
                    "path": f["path"],
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": git_blob_oid(files[f["path"]]) if f["path"] in files else None,
                }
                for f in payload.get("files", [])
            ]
        return self._json(200, {"files": answer})

    def _commit(self, repo_type: str, repo_id: str, revision: str, body: bytes, query: dict) -> Answer:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "the first NDJSON line must be the commit header")
        header = lines[0]["value"]
        with self.hub._lock:
            repo = self._get_repo(repo_type, repo_id)
            self._check_write(f"write to {repo_id}")
            if query.get("create_pr"):
                raise HubError(400, "the fake hub does not implement pull requests")
            if revision not in repo.branches:
                if repo.resolve(revision) is not None:
                    raise HubError(400, f"Can only commit to a branch, {revision!r} is not one")
                raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            head = repo.branches[revision]
            parent_commit = header.get("parentCommit")
            if parent_commit is not None and parent_commit != head:
                raise HubError(412, f"parentCommit {parent_commit} is not the head of {revision} ({head})")
            files = dict(repo.commits[head].files)
            for line in lines[1:]:
                key, value = line.get("key"), line.get("value", {})
                if key == "file":
                    if value.get("encoding") != "base64":
                        raise HubError(400, f"unsupported encoding {value.get('encoding')!r}")
                    files[value["path"]] = base64.b64decode(value["content"])
                elif key == "deletedFile":
                    if value["path"] not in files:
                        raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                    del files[value["path"]]
                elif key == "deletedFolder":
                    folder = value["path"].rstrip("/") + "/"
                    files = {p: b for p, b in files.items() if not p.startswith(folder)}
                else:
                    raise HubError(400, f"the fake hub only takes regular files, got a {key!r} line")
            commit = self.hub._new_commit(repo, head, files, header.get("summary") or "")
            repo.branches[revision] = commit.oid
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        url = f"{self.hub.endpoint}/{prefix}{repo_id}/commit/{commit.oid}"
        return self._json(200, {"success": True, "commitOid": commit.oid, "commitUrl": url, "hookOutput": ""})

    def _create_branch(self, repo_type: str, repo_id: str, branch: str, payload: dict) -> Answer:
        with self.hub._lock:
            repo = self._get_repo(repo_type, repo_id)
            self._check_write(f"create a branch in {repo_id}")
            if branch in repo.branches:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            start = self._resolve(repo, payload.get("startingPoint") or "main")
            repo.branches[branch] = start
        return self._json(200, {})

    def _create_tag(self, repo_type: str, repo_id: str, revision: str, payload: dict) -> Answer:
        with self.hub._lock:
            repo = self._get_repo(repo_type, repo_id)
            self._check_write(f"create a tag in {repo_id}")
            tag = payload.get("tag")
            if not tag:
                raise HubError(400, "missing tag name")
            if tag in repo.tags:
                raise HubError(409, f"Reference already exists: refs/tags/{tag}")
            repo.tags[tag] = self._resolve(repo, revision)
        return self._json(200, {})

    def _resolve_file(
        self, method: str, repo_type: str, repo_id: str, revision: str, path_parts: list[str]
    ) -> Answer:
        filename = "/".join(path_parts)
        with self.hub._lock:
            repo = self._get_repo(repo_type, repo_id)
            oid = self._resolve(repo, revision)
            files = repo.commits[oid].files
            if filename not in files:
                raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": oid})
            data = files[filename]
        headers = {
            "X-Repo-Commit": oid,
            "ETag": f'"{git_blob_oid(data)}"',
            "Content-Type": "application/octet-stream",
            "Content-Length": str(len(data)),
        }
        return 200, headers, data


try:  # the fixture needs pytest; the server itself does not
    import pytest
except ImportError:  # pragma: no cover
    pytest = None

if pytest is not None:

    @pytest.fixture
    def fake_hub(tmp_path_factory, monkeypatch):
        """A running :class:`FakeHub` with ``huggingface_hub`` pointed at it: ``HF_ENDPOINT`` and the
        client's endpoint constants, a fresh ``HF_HOME``/hub cache (outside the test's ``tmp_path``),
        no token (neither env nor file), online mode. Yields the hub; stops it afterwards."""
        from huggingface_hub import constants

        hub = FakeHub().start()
        home = tmp_path_factory.mktemp("hf_home")
        cache = home / "hub"
        cache.mkdir(parents=True)
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.setenv("HF_HOME", str(home))
        monkeypatch.setenv("HF_HUB_CACHE", str(cache))
        monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            monkeypatch.delenv(var, raising=False)
        # huggingface_hub reads these once at import: patch the module constants too.
        monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
        template = hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
        monkeypatch.setattr(constants, "HF_URL_HOSTS", constants.HF_URL_HOSTS | {"127.0.0.1"})
        monkeypatch.setattr(constants, "HF_HOME", str(home))
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
        monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
        try:
            yield hub
        finally:
            hub.stop()
