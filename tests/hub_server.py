"""`StandInHub`: a minimal stdlib HTTP server on loopback that stands in for the Hugging Face Hub in tests (no internet).

It implements the calls huggingface_hub 2.4 makes to commit files (create repo, create branch, validate YAML,
preupload, commit: every file uploaded "regular", base64 in the commit payload) and to read a repo back
(`repo_info`, the tree listing, `paths-info`, and file downloads with HEAD and HTTP range requests), which is what
`snapshot_download`, `hf_hub_download` and `HfFileSystem` (datasets' streaming) need. Model and dataset repos are
kept apart, each with its branches; every request's method, path and Authorization header is recorded.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import datasets.config
import huggingface_hub.constants
import yaml

REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_API = re.compile(
    r"/api/(models|datasets|spaces)/([^/]+/[^/]+)(?:/(preupload|commit|branch|revision|tree|paths-info)(/.*)?)?"
)
_RESOLVE = re.compile(r"/(?:(datasets|spaces)/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)")


def use_hub(monkeypatch, endpoint=None, cache=None, offline=False):
    """Point huggingface_hub (and transformers, which reads its constants) and datasets (its own copies: streaming
    reads through `HfFileSystem` at `datasets.config.HF_ENDPOINT`) at `endpoint`, `cache`, offline or not.

    The constants are read from the environment at import, so the module attributes are what must change.
    """
    if endpoint is not None:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
        monkeypatch.setattr(
            huggingface_hub.constants,
            "HUGGINGFACE_CO_URL_TEMPLATE",
            endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        )
        monkeypatch.setattr(datasets.config, "HF_ENDPOINT", endpoint)
        monkeypatch.setattr(
            datasets.config, "HUB_DATASETS_URL", endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}"
        )
    if cache is not None:
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    for module, name in ((huggingface_hub.constants, "HF_HUB_OFFLINE"), (datasets.config, "HF_HUB_OFFLINE")):
        monkeypatch.setattr(module, name, offline)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", offline)


@contextmanager
def serving(monkeypatch) -> Iterator[StandInHub]:
    """A running `StandInHub` with huggingface_hub pointed at it (online), shut down on exit."""
    hub = StandInHub()
    use_hub(monkeypatch, endpoint=hub.url)
    try:
        yield hub
    finally:
        hub.close()


class StandInHub:
    """Stands in for the Hub on loopback: writes (create repo / branch, validate YAML, preupload, commit) and reads
    (repo info, tree, paths-info, file downloads with ranges) of model and dataset repos.

    Attributes:
        branches: `(repo_type, repo_id)` -> branch -> `{"sha": commit id, "files": {path: bytes}}` (the latest commit).
        created: `(repo_type, repo_id)` -> the create-repo request that made it (`visibility`, ...).
        requests: `(method, path, Authorization header)` of every request, in order.
        ranges: the `Range` header of every file download that had one, in order.
    """

    def __init__(self):
        self.branches: dict[tuple[str, str], dict[str, dict]] = {}
        self.created: dict[tuple[str, str], dict] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        self.ranges: list[str] = []
        self._lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                self.answer("GET", b"")

            def do_HEAD(self):
                self.answer("HEAD", b"")

            def do_POST(self):
                self.answer("POST", self.rfile.read(int(self.headers.get("Content-Length", 0))))

            def answer(self, method, body):
                hub.requests.append((method, self.path, self.headers.get("Authorization")))
                url = urlsplit(self.path)
                with hub._lock:
                    status, payload, headers = hub.handle(method, unquote(url.path), parse_qs(url.query), body, self)
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(name, value)
                if "Content-Length" not in headers:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if method != "HEAD":
                    self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    # ------------------------------------------------------------------------------------------ test side
    def files(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> dict[str, bytes]:
        """The files of `repo_id` at the head of branch `revision`."""
        return self.branches[repo_type, repo_id][revision]["files"]

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    # ------------------------------------------------------------------------------------------ server side
    def handle(self, method, path, query, body, request) -> tuple[int, dict | list | bytes, dict]:
        if path == "/api/repos/create":
            return self._create_repo(json.loads(body))
        if path == "/api/validate-yaml":
            content = json.loads(body)["content"]
            header = yaml.safe_load(content.split("---\n")[1]) if content.startswith("---\n") else None
            errors = [] if isinstance(header, dict) else [{"message": "README.md has no YAML metadata block"}]
            return (400 if errors else 200), {"errors": errors, "warnings": []}, {}
        api, resolve = _API.fullmatch(path), _RESOLVE.fullmatch(path)
        if api is not None:
            key = (REPO_TYPES[api.group(1)], api.group(2))
            if key not in self.branches:
                return 404, {"error": f"Repository Not Found: {key[0]} {key[1]}"}, {"X-Error-Code": "RepoNotFound"}
            call, rest = api.group(3) or "revision", (api.group(4) or "/main")[1:]  # repo_info without revision: main
            return getattr(self, f"_{call.replace('-', '_')}")(key, rest, query, body)
        if resolve is not None and method in ("GET", "HEAD"):
            key = (REPO_TYPES[resolve.group(1) or "models"], resolve.group(2))
            return self._resolve(key, resolve.group(3), resolve.group(4), request.headers.get("Range"))
        return 404, {"error": f"the stand-in Hub has no route {method} {path}"}, {}

    def _create_repo(self, request: dict):
        key = (request.get("type") or "model", "/".join(p for p in (request.get("organization"), request["name"]) if p))
        url = f"{self.url}/{'' if key[0] == 'model' else key[0] + 's/'}{key[1]}"
        if key in self.branches:
            return 409, {"error": f"You already created this {key[0]} repo", "url": url}, {}
        self.branches[key] = {"main": {"sha": hashlib.sha1(repr(key).encode()).hexdigest(), "files": {}}}
        self.created[key] = request
        return 200, {"url": url}, {}

    def _branch(self, key, rest, query, body):
        if rest in self.branches[key]:
            return 409, {"error": f"Reference already exists: {rest}"}, {}
        start = (json.loads(body) if body else {}).get("startingPoint") or "main"
        head = self._head(key, start)
        self.branches[key][rest] = {"sha": head["sha"], "files": dict(head["files"])}
        return 200, {}, {}

    def _preupload(self, key, rest, query, body):
        files = json.loads(body)["files"]
        return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}, {}

    def _commit(self, key, rest, query, body):
        head = self._head(key, rest)
        if head is None:
            return 404, {"error": f"Invalid rev id: {rest}"}, {"X-Error-Code": "RevisionNotFound"}
        files = dict(head["files"])
        for line in body.decode().splitlines():
            item = json.loads(line)
            if item["key"] == "file":
                files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            elif item["key"] == "deletedFile":
                del files[item["value"]["path"]]
        sha = hashlib.sha1(head["sha"].encode() + body).hexdigest()
        self.branches[key][rest] = {"sha": sha, "files": files}
        url = f"{self.url}/{'' if key[0] == 'model' else key[0] + 's/'}{key[1]}/commit/{sha}"
        return 200, {"commitUrl": url, "commitOid": sha, "pullRequestUrl": None}, {}

    def _revision(self, key, rest, query, body):
        head = self._head(key, rest)
        if head is None:
            return 404, {"error": f"Invalid rev id: {rest}"}, {"X-Error-Code": "RevisionNotFound"}
        siblings = [{"rfilename": path, "size": len(data)} for path, data in sorted(head["files"].items())]
        return 200, {"id": key[1], "sha": head["sha"], "private": False, "siblings": siblings}, {}

    def _tree(self, key, rest, query, body):
        revision, _, folder = rest.partition("/")
        head = self._head(key, revision)
        if head is None:
            return 404, {"error": f"Invalid rev id: {revision}"}, {"X-Error-Code": "RevisionNotFound"}
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        prefix = f"{folder.rstrip('/')}/" if folder else ""
        entries = {}
        for path in sorted(head["files"]):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            for depth in range(1, len(parts) if recursive else 1):  # the folders on the way
                entries.setdefault(prefix + "/".join(parts[:depth]), None)
            if recursive or len(parts) == 1:
                entries[path] = path
            else:
                entries.setdefault(prefix + parts[0], None)
        if folder and not entries and folder not in head["files"]:
            return 404, {"error": f"{folder} does not exist"}, {"X-Error-Code": "EntryNotFound"}
        return 200, [self._entry(head, path, is_file) for path, is_file in entries.items()], {}

    def _paths_info(self, key, rest, query, body):
        head = self._head(key, rest)
        if head is None:
            return 404, {"error": f"Invalid rev id: {rest}"}, {"X-Error-Code": "RevisionNotFound"}
        asked = parse_qs(body.decode()).get("paths", [])
        found = []
        for path in asked:
            path = path.strip("/")
            if path in head["files"]:
                found.append(self._entry(head, path, path))
            elif any(name.startswith(path + "/") for name in head["files"]):
                found.append(self._entry(head, path, None))
        return 200, found, {}

    def _resolve(self, key, revision, path, byte_range):
        head = self._head(key, revision) if key in self.branches else None
        if head is None or path not in head["files"]:
            code = "RepoNotFound" if key not in self.branches else "EntryNotFound"
            return 404, {"error": f"{path} not found"}, {"X-Error-Code": code}
        data = head["files"][path]
        headers = {
            "Content-Type": "application/octet-stream",
            "X-Repo-Commit": head["sha"],
            "ETag": f'"{_blob_id(data)}"',
            "Accept-Ranges": "bytes",
        }
        if byte_range is None:
            return 200, data, headers
        self.ranges.append(byte_range)
        start, _, stop = byte_range.removeprefix("bytes=").partition("-")
        first = int(start) if start else max(0, len(data) - int(stop))
        last = min(int(stop), len(data) - 1) if start and stop else len(data) - 1
        if first >= len(data):
            return 416, b"", {"Content-Range": f"bytes */{len(data)}"}
        headers["Content-Range"] = f"bytes {first}-{last}/{len(data)}"
        return 206, data[first : last + 1], headers

    def _head(self, key, revision) -> dict | None:
        """The branch `revision` (a branch name or the commit id of a branch head) of repo `key`, or None."""
        branches = self.branches[key]
        if revision in branches:
            return branches[revision]
        return next((branch for branch in branches.values() if branch["sha"] == revision), None)

    @staticmethod
    def _entry(head, path, is_file) -> dict:
        if is_file:
            data = head["files"][path]
            return {"type": "file", "path": path, "size": len(data), "oid": _blob_id(data)}
        return {"type": "directory", "path": path, "oid": hashlib.sha1(path.encode()).hexdigest(), "size": 0}


def _blob_id(data: bytes) -> str:
    """The git blob id of `data` (what the Hub reports as a file's oid / ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
