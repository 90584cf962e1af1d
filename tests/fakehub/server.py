"""A small, real HTTP server speaking the part of the Hub API that `huggingface_hub` 2.4 uses.

Repo types model and space (`create_repo(repo_type="space", space_sdk=...)`; a Space's URLs carry
the Hub's `spaces/` prefix: `/api/spaces/<id>/...`, `/spaces/<id>/resolve/...`, `/spaces/<id>.git/...`).
A repo is keyed by that prefix too: `hub.files("tester/tiny")` is the model, `hub.files("spaces/tester/tiny")`
the Space of the same name.
It serves exactly what the real client sends for `create_repo`, `create_branch`,
`upload_folder` / `create_commit` (README validation, preupload, inline base64 files, the LFS
batch API with a basic PUT and a verify step), `repo_info`, `list_repo_files`, `list_repo_refs`,
`whoami` and `hf_hub_download` (HEAD + GET on `/{repo}/resolve/{rev}/{path}`).

Files live under a temp dir: `<root>/repos/[spaces/]<ns>/<name>/<branch>/<path>`, LFS blobs under
`<root>/lfs/<sha256>`. Every request but the LFS PUT (which the real client sends to a
pre-signed storage URL, without credentials) must carry `authorization: Bearer <token>`.
`fail_next_commits(n)` makes the next n commit calls answer HTTP 500, to exercise retries.
Xet is not spoken: point the client here with `HF_HUB_DISABLE_XET` set (or
`huggingface_hub.constants.HF_HUB_DISABLE_XET = True`) so large files take the LFS path.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
SPACE_SDKS = ("gradio", "streamlit", "docker", "static")  # what the Hub accepts as a Space's sdk
URL_PREFIXES = {"models": "", "spaces": "spaces/"}  # the /api/<type>/ segment -> the repo key's prefix


class HubError(Exception):
    """An HTTP error answer: status, message and the Hub's `X-Error-Code`."""

    def __init__(self, status: int, message: str, code: str | None = None, extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra or {}


@dataclass
class Repo:
    private: bool
    sdk: str | None = None  # Spaces only
    branches: dict[str, str] = field(default_factory=lambda: {"main": new_commit_oid()})  # branch -> head oid
    commits: list[dict] = field(default_factory=list)  # newest last: {"oid", "branch", "message"}


def new_commit_oid() -> str:
    return hashlib.sha1(uuid.uuid4().bytes).hexdigest()


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """State of the fake Hub; the HTTP handler below only parses and dispatches."""

    def __init__(self, root: Path, token: str, user: str = "tester", lfs_threshold: int = 10_000):
        self.root, self.token, self.user, self.lfs_threshold = Path(root), token, user, lfs_threshold
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, for assertions
        self.commit_failures_left = 0
        self.lock = threading.Lock()
        self.url = ""  # set by serve()

    # --- test controls -------------------------------------------------------------------------
    def fail_next_commits(self, n: int) -> None:
        self.commit_failures_left = n

    def branch_dir(self, repo_id: str, branch: str = "main") -> Path:
        return self.root / "repos" / repo_id / branch

    def files(self, repo_id: str, branch: str = "main") -> dict[str, bytes]:
        """Every file of a branch, path -> content (LFS pointers resolved)."""
        base = self.branch_dir(repo_id, branch)
        return {p.relative_to(base).as_posix(): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()}

    # --- helpers -------------------------------------------------------------------------------
    def check_auth(self, header: str | None, repo_id: str | None = None, write: bool = True) -> None:
        needs = write or (repo_id in self.repos and self.repos[repo_id].private)
        if not needs:
            return
        if not header or not header.startswith("Bearer "):
            raise HubError(401, "Authorization header is required")
        sent = header[len("Bearer "):]
        if sent != self.token:
            # The real Hub does not echo tokens; this one does, so tests can check redaction.
            raise HubError(401, f"Invalid credentials: {sent}")

    def repo(self, repo_id: str) -> Repo:
        if repo_id not in self.repos:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return self.repos[repo_id]

    def branch(self, repo_id: str, rev: str) -> str:
        repo = self.repo(repo_id)
        if rev in repo.branches:
            return rev
        for name, oid in repo.branches.items():  # a commit oid names its branch head
            if oid == rev:
                return name
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def tree(self, repo_id: str, rev: str) -> list[dict]:
        branch = self.branch(repo_id, rev)
        entries = []
        for path, data in self.files(repo_id, branch).items():
            entry = {"type": "file", "path": path, "size": len(data), "oid": git_blob_sha1(data)}
            if path.endswith(LFS_SUFFIXES) or len(data) >= self.lfs_threshold:
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 130}
            entries.append(entry)
        return entries

    # --- endpoints -----------------------------------------------------------------------------
    def create_repo(self, body: dict) -> tuple[int, dict]:
        repo_type = body.get("type") or "model"
        if repo_type not in ("model", "space"):
            raise HubError(400, f"Unsupported repo type {repo_type!r} in this fake Hub")
        name = f"{body.get('organization') or self.user}/{body['name']}"
        key = f"spaces/{name}" if repo_type == "space" else name
        if repo_type == "space" and body.get("sdk") not in SPACE_SDKS:
            raise HubError(400, f"Invalid sdk {body.get('sdk')!r} for a Space; use one of {', '.join(SPACE_SDKS)}")
        if key in self.repos:
            # The real Hub answers the repo URL with its 409; the client reads it when exist_ok=True.
            raise HubError(409, f"You already created this {repo_type} repo", extra={"url": f"{self.url}/{key}"})
        private = body.get("visibility") == "private" or bool(body.get("private"))
        self.repos[key] = Repo(private=private, sdk=body.get("sdk"))
        self.branch_dir(key).mkdir(parents=True)
        return 200, {"url": f"{self.url}/{key}", "name": name}

    def create_branch(self, repo_id: str, branch: str, body: dict) -> tuple[int, dict]:
        repo = self.repo(repo_id)
        if branch in repo.branches:
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        start = self.branch(repo_id, body.get("startingPoint") or "main")
        shutil.copytree(self.branch_dir(repo_id, start), self.branch_dir(repo_id, branch))
        repo.branches[branch] = repo.branches[start]
        return 200, {}

    def preupload(self, repo_id: str, rev: str, body: dict) -> tuple[int, dict]:
        self.branch(repo_id, rev)
        files = []
        for f in body["files"]:
            lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] >= self.lfs_threshold
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False})
        return 200, {"files": files}

    def lfs_batch(self, repo_id: str, body: dict) -> tuple[int, dict]:
        self.repo(repo_id)
        objects = []
        for obj in body["objects"]:
            oid, size = obj["oid"], obj["size"]
            entry = {"oid": oid, "size": size, "authenticated": True}
            if not (self.root / "lfs" / oid).exists():
                entry["actions"] = {
                    "upload": {"href": f"{self.url}/_lfs/{oid}"},
                    "verify": {"href": f"{self.url}/_lfs/{oid}/verify"},
                }
            objects.append(entry)
        return 200, {"transfer": "basic", "objects": objects}

    def lfs_put(self, oid: str, data: bytes) -> tuple[int, dict]:
        if hashlib.sha256(data).hexdigest() != oid:
            raise HubError(400, "LFS content does not match its oid")
        (self.root / "lfs").mkdir(exist_ok=True)
        (self.root / "lfs" / oid).write_bytes(data)
        return 200, {}

    def lfs_verify(self, oid: str, body: dict) -> tuple[int, dict]:
        blob = self.root / "lfs" / oid
        if not blob.exists() or blob.stat().st_size != body["size"]:
            raise HubError(422, f"LFS object {oid} was not uploaded")
        return 200, {}

    def commit(self, repo_id: str, rev: str, ndjson: bytes) -> tuple[int, dict]:
        if self.commit_failures_left > 0:
            self.commit_failures_left -= 1
            raise HubError(500, "Internal Error - injected commit failure")
        branch = self.branch(repo_id, rev)
        lines = [json.loads(line) for line in ndjson.splitlines() if line.strip()]
        header = next(item["value"] for item in lines if item["key"] == "header")
        writes: dict[str, bytes] = {}
        for item in lines:
            key, value = item["key"], item["value"]
            if key == "file":
                writes[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                blob = self.root / "lfs" / value["oid"]
                if not blob.exists():
                    raise HubError(422, f"LFS file {value['path']} was not uploaded before the commit")
                writes[value["path"]] = blob.read_bytes()
            elif key in ("deletedFile", "deletedFolder"):
                target = self.branch_dir(repo_id, branch) / value["path"]
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
            elif key != "header":
                raise HubError(400, f"Unsupported commit operation {key}")
        for path, data in writes.items():
            target = self.branch_dir(repo_id, branch) / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        oid = new_commit_oid()
        repo = self.repos[repo_id]
        repo.branches[branch] = oid
        repo.commits.append({"oid": oid, "branch": branch, "message": header["summary"]})
        return 200, {"commitUrl": f"{self.url}/{repo_id}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}

    def info(self, repo_id: str, rev: str) -> tuple[int, dict]:
        branch = self.branch(repo_id, rev)
        repo = self.repos[repo_id]
        siblings = [{"rfilename": e["path"]} for e in self.tree(repo_id, branch)]
        info = {"id": repo_id.removeprefix("spaces/"), "sha": repo.branches[branch], "private": repo.private,
                "siblings": siblings}
        return 200, info | ({"sdk": repo.sdk} if repo.sdk else {})

    def refs(self, repo_id: str) -> tuple[int, dict]:
        branches = [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": o} for n, o in self.repo(repo_id).branches.items()]
        return 200, {"branches": branches, "tags": [], "converts": []}


def validate_card(content: str, repo_type: str = "model") -> tuple[int, dict]:
    """What the Hub checks in a README.md: YAML front matter that parses to a mapping, and Hub ids;
    a Space's card must name a valid sdk and its models by Hub id."""
    import yaml

    match = re.match(r"^---\n(.*?)\n---\n", content, re.DOTALL)
    try:
        meta = yaml.safe_load(match.group(1)) if match else {}
    except yaml.YAMLError as err:
        return 400, {"errors": [{"message": f"Invalid YAML: {err}"}]}
    if not isinstance(meta, dict):
        return 400, {"errors": [{"message": "Metadata must be a mapping"}]}
    ids = [meta.get("base_model")] if isinstance(meta.get("base_model"), str) else meta.get("base_model") or []
    if repo_type == "space" and meta.get("sdk") not in SPACE_SDKS:
        return 400, {"errors": [{"message": f"\"sdk\" must be one of {', '.join(SPACE_SDKS)}"}]}
    if repo_type == "space" and not isinstance(meta.get("models") or [], list):
        return 400, {"errors": [{"message": "\"models\" must be a list of model ids"}]}
    if repo_type == "space":
        ids = ids + (meta.get("models") or [])
    bad = [i for i in ids + (meta.get("datasets") or []) if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", str(i))]
    if bad:
        return 400, {"errors": [{"message": f"Not a Hub id: {bad[0]}"}]}
    return 200, {"errors": [], "warnings": []}


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub  # set on the subclass made by serve()
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        hub = self.hub
        with hub.lock:
            hub.requests.append((method, url.path))
            try:
                result = self._route(method, parts, body, parse_qs(url.query))
            except HubError as err:
                headers = {"X-Error-Code": err.code} if err.code else {}
                headers["X-Error-Message"] = err.message
                return self._send(err.status, json.dumps({"error": err.message, **err.extra}).encode(), headers)
        if isinstance(result, tuple) and len(result) == 2:
            return self._send(result[0], json.dumps(result[1]).encode(), {"Content-Type": "application/json"})
        return self._send(*result)

    def _route(self, method: str, parts: list[str], body: bytes, query: dict):
        hub, auth = self.hub, self.headers.get("Authorization")
        if parts[0] == "_lfs":  # storage URLs: no Hub credentials, like S3 pre-signed URLs
            if method == "PUT":
                return hub.lfs_put(parts[1], body)
            hub.check_auth(auth)
            return hub.lfs_verify(parts[1], json.loads(body))
        if parts[:2] == ["api", "whoami-v2"]:
            hub.check_auth(auth)
            return 200, {"type": "user", "name": hub.user, "orgs": [], "auth": {"type": "access_token"}}
        if parts[:3] == ["api", "repos", "create"]:
            hub.check_auth(auth)
            return hub.create_repo(json.loads(body))
        if parts[:2] == ["api", "validate-yaml"]:
            hub.check_auth(auth)
            request = json.loads(body)
            return validate_card(request["content"], request.get("repoType") or "model")
        if parts[0] == "api" and len(parts) >= 4 and parts[1] in URL_PREFIXES:
            return self._route_repo_api(method, URL_PREFIXES[parts[1]] + "/".join(parts[2:4]), parts[4:], body, auth)
        prefix, parts = ("spaces/", parts[1:]) if parts[0] == "spaces" else ("", parts)
        if len(parts) == 6 and parts[1].endswith(".git") and parts[2:] == ["info", "lfs", "objects", "batch"]:
            repo_id = f"{prefix}{parts[0]}/{parts[1][: -len('.git')]}"
            hub.check_auth(auth, repo_id)
            return hub.lfs_batch(repo_id, json.loads(body))
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve(method, f"{prefix}{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]), auth)
        raise HubError(404, f"No fake Hub route for {method} /{'/'.join(parts)}")

    def _route_repo_api(self, method: str, repo_id: str, rest: list[str], body: bytes, auth: str | None):
        hub = self.hub
        writes = method == "POST"
        hub.check_auth(auth, repo_id, write=writes)
        hub.repo(repo_id)
        if not rest or rest[0] == "revision":
            return hub.info(repo_id, rest[1] if rest else "main")
        if rest[0] == "preupload":
            return hub.preupload(repo_id, rest[1], json.loads(body))
        if rest[0] == "commit":
            return hub.commit(repo_id, rest[1], body)
        if rest[0] == "branch":
            return hub.create_branch(repo_id, rest[1], json.loads(body or b"{}"))
        if rest[0] == "refs":
            return hub.refs(repo_id)
        if rest[0] == "tree":
            prefix = "/".join(rest[2:])
            entries = [e for e in hub.tree(repo_id, rest[1]) if e["path"].startswith(prefix)]
            return 200, entries
        raise HubError(404, f"No fake Hub route for /api/.../{repo_id}/{'/'.join(rest)}")

    def _resolve(self, method: str, repo_id: str, rev: str, path: str, auth: str | None):
        hub = self.hub
        hub.check_auth(auth, repo_id, write=False)
        branch = hub.branch(repo_id, rev)
        target = hub.branch_dir(repo_id, branch) / path
        if not target.is_file():
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        data = target.read_bytes()
        headers = {
            "X-Repo-Commit": hub.repos[repo_id].branches[branch],
            "ETag": f'"{git_blob_sha1(data)}"',
            "Content-Type": "application/octet-stream",
        }
        return 200, data if method == "GET" else b"", headers, len(data)

    def _send(self, status: int, data: bytes, headers: dict, length: int | None = None) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data) if length is None else length))
        self.end_headers()
        if data:
            self.wfile.write(data)


def serve(root: Path, token: str) -> tuple[FakeHub, ThreadingHTTPServer]:
    """Start a FakeHub on 127.0.0.1 with a random port in a daemon thread."""
    hub = FakeHub(root, token)
    handler = type("FakeHubHandler", (_Handler,), {"hub": hub})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, name="fakehub", daemon=True).start()
    return hub, server
