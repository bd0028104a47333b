"""A stand-in for the Hugging Face Hub's HTTP endpoints, on 127.0.0.1, for offline push -> load tests.

It answers what huggingface_hub 2.4 / transformers 5.23 send for `create_repo` + `upload_folder` (plain HTTP and LFS,
with `HF_HUB_DISABLE_XET=1`; the Xet transfer path is NOT covered) and for `from_pretrained(repo_id)` /
`hf_hub_download` (model info, HEAD/GET resolve, tree listing). See ../shared/hub-notes.md.

Its own protocol surprises are answered with 400 and recorded in `hub.errors` (5xx answers would be retried for ~23 s
by the client); tests assert the list is empty. `HTTP/1.0` keeps every connection single-use, so stopping leaves no
keep-alive socket behind.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


LFS_SUFFIXES = (".safetensors", ".bin", ".gguf")
REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    files: dict[str, bytes] = field(default_factory=dict)
    lfs: set[str] = field(default_factory=set)
    commits: list[tuple[str, str]] = field(default_factory=list)  # (sha, message)
    private: bool = False

    @property
    def sha(self) -> str:
        return self.commits[-1][0] if self.commits else "0" * 40


class FakeHub:
    """`with FakeHub(port, token) as hub:` serves until the block ends; see `hub.repos`, `hub.errors`."""

    def __init__(self, port: int = 0, token: str = "hf_test"):
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.lfs_store: dict[str, bytes] = {}
        self.errors: list[str] = []
        self.requests: list[tuple[str, str]] = []
        self.fail_commits = False  # answer commits with 403, as a Hub refusing the write would
        self._server = ThreadingHTTPServer(("127.0.0.1", port), self._handler_class())
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    # --- routing --------------------------------------------------------------------------------------------
    def _handler_class(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args):  # keep test output quiet
                pass

            def _dispatch(self, method: str) -> None:
                path = urlsplit(self.path).path
                hub.requests.append((method, path))
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                try:
                    hub._route(self, method, path, body)
                except Exception as error:  # a bug of the stand-in: answer 400 (not retried) and record it
                    hub.errors.append(f"{method} {path}: {error!r}")
                    hub._json(self, 400, {"error": f"fake hub: {error!r}"})

            def do_GET(self):
                self._dispatch("GET")

            def do_HEAD(self):
                self._dispatch("HEAD")

            def do_POST(self):
                self._dispatch("POST")

            def do_PUT(self):
                self._dispatch("PUT")

        return Handler

    def _route(self, h, method: str, path: str, body: bytes) -> None:
        routes = [
            ("POST", r"/api/repos/create", self._create_repo),
            ("POST", r"/api/validate-yaml", lambda h, m, b: self._json(h, 200, {"errors": [], "warnings": []})),
            ("POST", rf"/api/models/{REPO}/preupload/(?P<rev>[^/]+)", self._preupload),
            ("POST", rf"/{REPO}\.git/info/lfs/objects/batch", self._lfs_batch),
            ("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})", self._lfs_put),
            ("POST", rf"/api/models/{REPO}/commit/(?P<rev>[^/]+)", self._commit),
            ("GET", rf"/api/models/{REPO}(?:/revision/(?P<rev>[^/]+))?", self._model_info),
            ("GET", rf"/api/models/{REPO}/tree/(?P<rev>[^/]+)(?P<sub>/.*)?", self._tree),
            ("HEAD", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self._resolve),
            ("GET", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self._resolve),
        ]
        for route_method, pattern, handler in routes:
            match = re.fullmatch(pattern, path)
            if match and route_method == method:
                return handler(h, match, body)
        raise ValueError("no such endpoint in the stand-in")

    # --- helpers ----------------------------------------------------------------------------------------------
    @staticmethod
    def _json(h, status: int, payload, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            h.send_header(key, value)
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)

    def _authorized(self, h) -> bool:
        if h.headers.get("Authorization") == f"Bearer {self.token}":
            return True
        self._json(h, 401, {"error": "Invalid username or password."})
        return False

    def _repo_or_404(self, h, repo_id: str) -> Repo | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            self._json(h, 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        return repo

    # --- write side -------------------------------------------------------------------------------------------
    def _create_repo(self, h, match, body) -> None:
        if not self._authorized(h):
            return
        payload = json.loads(body)
        repo_id = f"{payload['organization']}/{payload['name']}"
        answer = {"url": f"{self.endpoint}/{repo_id}", "name": repo_id}
        if repo_id in self.repos:
            return self._json(h, 409, {**answer, "error": "You already created this model repo"})
        self.repos[repo_id] = Repo(private=payload.get("visibility") == "private")
        self._json(h, 200, answer)

    def _preupload(self, h, match, body) -> None:
        if not self._authorized(h) or (repo := self._repo_or_404(h, match["repo"])) is None:
            return
        files = []
        for f in json.loads(body)["files"]:
            lfs = f["path"].endswith(LFS_SUFFIXES)
            existing = repo.files.get(f["path"])
            oid = None if existing is None or lfs else git_blob_sha1(existing)
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": oid})  # fmt: skip
        self._json(h, 200, {"files": files})

    def _lfs_batch(self, h, match, body) -> None:
        if not self._authorized(h):
            return
        objects = []
        for obj in json.loads(body)["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.lfs_store:
                entry["actions"] = {"upload": {"href": f"{self.endpoint}/lfs-upload/{obj['oid']}"}}
            objects.append(entry)
        self._json(h, 200, {"transfer": "basic", "objects": objects})

    def _lfs_put(self, h, match, body) -> None:
        if hashlib.sha256(body).hexdigest() != match["oid"]:
            raise ValueError("uploaded LFS bytes do not match their oid")
        self.lfs_store[match["oid"]] = body
        self._json(h, 200, {})

    def _commit(self, h, match, body) -> None:
        if not self._authorized(h) or (repo := self._repo_or_404(h, match["repo"])) is None:
            return
        if self.fail_commits:
            return self._json(h, 403, {"error": "You don't have the rights to commit to this repository."})
        message = ""
        for line in body.decode().splitlines():
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "header":
                message = value["summary"]
            elif item["key"] == "file":
                repo.files[value["path"]] = base64.b64decode(value["content"])
                repo.lfs.discard(value["path"])
            elif item["key"] == "lfsFile":
                repo.files[value["path"]] = self.lfs_store[value["oid"]]
                repo.lfs.add(value["path"])
            elif item["key"] == "deletedFile":
                repo.files.pop(value["path"], None)
            else:
                raise ValueError(f"unexpected commit item {item['key']!r}")
        sha = hashlib.sha1(uuid.uuid4().bytes).hexdigest()
        repo.commits.append((sha, message))
        self._json(h, 200, {"commitOid": sha, "commitUrl": f"{self.endpoint}/{match['repo']}/commit/{sha}",
                            "hookOutput": ""})  # fmt: skip

    # --- read side --------------------------------------------------------------------------------------------
    def _model_info(self, h, match, body) -> None:
        if (repo := self._repo_or_404(h, match["repo"])) is None:
            return
        self._json(h, 200, {"id": match["repo"], "modelId": match["repo"], "sha": repo.sha, "private": repo.private,
                            "siblings": [{"rfilename": p} for p in sorted(repo.files)]})  # fmt: skip

    def _tree(self, h, match, body) -> None:
        if (repo := self._repo_or_404(h, match["repo"])) is None:
            return
        if match["sub"] not in (None, "", "/"):
            return self._json(h, 404, {"error": "not found"}, {"X-Error-Code": "EntryNotFound"})
        entries = []
        for path, data in sorted(repo.files.items()):
            entry = {"type": "file", "path": path, "size": len(data), "oid": git_blob_sha1(data)}
            if path in repo.lfs:
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        self._json(h, 200, entries)

    def _resolve(self, h, match, body) -> None:
        if (repo := self._repo_or_404(h, match["repo"])) is None:
            return
        data = repo.files.get(match["file"])
        if data is None:
            return self._json(h, 404, {"error": "Entry not found"},
                              {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": repo.sha})  # fmt: skip
        lfs = match["file"] in repo.lfs
        etag = hashlib.sha256(data).hexdigest() if lfs else git_blob_sha1(data)
        h.send_response(200)
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Content-Length", str(len(data)))
        h.send_header("X-Repo-Commit", repo.sha)
        h.send_header("ETag", f'"{etag}"')
        if lfs:
            h.send_header("X-Linked-Etag", f'"{etag}"')
            h.send_header("X-Linked-Size", str(len(data)))
        h.end_headers()
        if h.command == "GET":
            h.wfile.write(data)
