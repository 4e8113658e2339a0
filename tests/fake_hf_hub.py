"""A loopback stand-in for the Hugging Face hub: the few endpoints huggingface_hub's
snapshot_download and model_info(files_metadata=True) call, serving the repos of a local HF cache
(the tiny models). Point HF_ENDPOINT at `FakeHub.url`.

    GET  /api/models/{repo}[/revision/{rev}]   repo info; with ?blobs=..., each file's blob id, size, LFS hash
    GET  /api/models/{repo}/tree/{rev}[/path]  the file listing of a commit
    HEAD /{repo}/resolve/{rev}/{path}          X-Repo-Commit, ETag (the LFS sha256 or the git blob id), size
    GET  /{repo}/resolve/{rev}/{path}          the bytes, with Range

Every request is recorded (`requests`). Faults, by path in the repo: `fail` answers that file's
GET with a 500; `cut_once` sends that many bytes of it on the first GET and closes the
connection; `slow` pauses halfway through the body for that many seconds.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LOOPBACK = "127.0.0.1"
LFS_SUFFIXES = (".safetensors", ".bin")


@dataclass(frozen=True)
class RepoFile:
    path: str
    content: bytes

    @property
    def lfs(self) -> bool:
        return self.path.endswith(LFS_SUFFIXES)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    @property
    def pointer(self) -> bytes:
        lines = ("version https://git-lfs.github.com/spec/v1", f"oid sha256:{self.sha256}", f"size {len(self.content)}")
        return ("\n".join(lines) + "\n").encode()

    @property
    def blob_id(self) -> str:
        """The git blob id of what git stores: the LFS pointer for LFS files, else the content."""
        stored = self.pointer if self.lfs else self.content
        return hashlib.sha1(b"blob %d\0" % len(stored) + stored).hexdigest()

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.blob_id

    def sibling(self) -> dict:
        entry = {"rfilename": self.path, "size": len(self.content), "blobId": self.blob_id}
        if self.lfs:
            entry["lfs"] = {"size": len(self.content), "sha256": self.sha256, "pointerSize": len(self.pointer)}
        return entry

    def tree_entry(self) -> dict:
        entry = {"type": "file", "oid": self.blob_id, "size": len(self.content), "path": self.path}
        if self.lfs:
            entry["lfs"] = {"oid": self.sha256, "size": len(self.content), "pointerSize": len(self.pointer)}
        return entry


@dataclass
class Repo:
    repo_id: str
    commit: str
    files: dict[str, RepoFile]


def repos_from_cache(hf_home: Path) -> dict[str, Repo]:
    """Each repo of an HF cache's hub/ folder at its refs/main snapshot."""
    repos = {}
    for folder in sorted((hf_home / "hub").glob("models--*")):
        commit = (folder / "refs" / "main").read_text().strip()
        snapshot = folder / "snapshots" / commit
        repo_id = folder.name.removeprefix("models--").replace("--", "/")
        paths = {path.relative_to(snapshot).as_posix(): path for path in sorted(snapshot.rglob("*")) if path.is_file()}
        files = {name: RepoFile(name, path.read_bytes()) for name, path in paths.items()}
        repos[repo_id] = Repo(repo_id, commit, files)
    return repos


@dataclass
class FakeHub:
    repos: dict[str, Repo]
    fail: set[str] = field(default_factory=set)
    cut_once: dict[str, int] = field(default_factory=dict)
    slow: dict[str, float] = field(default_factory=dict)
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # (method, path, Range)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.server.server_address[1]}"

    def file_gets(self, since: int = 0) -> list[tuple[str, str, str | None]]:
        """(repo id, path in the repo, Range) of each file download (GET .../resolve/...) from index `since`."""
        gets = []
        for method, path, byte_range in self.requests[since:]:
            if method == "GET" and "/resolve/" in path:
                repo_id, rest = unquote(path).lstrip("/").split("/resolve/", 1)
                gets.append((repo_id, rest.split("/", 1)[1], byte_range))
        return gets

    def start(self) -> "FakeHub":
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                hub.requests.append(("HEAD", urlsplit(self.path).path, self.headers.get("Range")))
                hub.resolve(self, body=False)

            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                hub.requests.append(("GET", parts.path, self.headers.get("Range")))
                if parts.path.startswith("/api/models/"):
                    hub.api(self, unquote(parts.path.removeprefix("/api/models/")), parse_qs(parts.query))
                else:
                    hub.resolve(self, body=True)

        self.server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- endpoints --------------------------------------------------------------------------

    def api(self, handler: BaseHTTPRequestHandler, rest: str, query: dict) -> None:
        repo, tail = self.split_repo(rest)
        if repo is None:
            return self.error(handler, 404, "RepoNotFound", f"Repository not found: {rest}")
        if tail.startswith("tree/"):
            revision = tail.removeprefix("tree/").split("/", 1)[0]
            if revision not in ("main", repo.commit):
                return self.error(handler, 404, "RevisionNotFound", f"Invalid rev id: {revision}", repo.commit)
            prefix = tail.removeprefix(f"tree/{revision}").strip("/")
            listing = [f.tree_entry() for f in repo.files.values() if not prefix or f.path.startswith(prefix + "/")]
            return self.json(handler, listing, repo.commit)
        if tail and not tail.startswith("revision/"):
            return self.error(handler, 404, "EntryNotFound", f"not served: {tail}")
        blobs = "blobs" in query
        siblings = [f.sibling() if blobs else {"rfilename": f.path} for f in repo.files.values()]
        self.json(handler, {"id": repo.repo_id, "modelId": repo.repo_id, "sha": repo.commit, "private": False,
                            "siblings": siblings}, repo.commit)

    def resolve(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlsplit(handler.path).path).lstrip("/")
        if "/resolve/" not in path:
            return self.error(handler, 404, "EntryNotFound", f"not served: {path}")
        repo_part, rest = path.split("/resolve/", 1)
        repo = self.repos.get(repo_part)
        if repo is None:
            return self.error(handler, 404, "RepoNotFound", f"Repository not found: {repo_part}")
        revision, file_path = rest.split("/", 1)
        if revision not in ("main", repo.commit):
            return self.error(handler, 404, "RevisionNotFound", f"Invalid rev id: {revision}", repo.commit)
        repo_file = repo.files.get(file_path)
        if repo_file is None:
            return self.error(handler, 404, "EntryNotFound", f"Entry not found: {file_path}", repo.commit)
        if body and file_path in self.fail:
            return self.error(handler, 500, None, "injected failure", repo.commit)
        content = repo_file.content
        start = 0
        range_header = handler.headers.get("Range")
        if body and range_header and range_header.startswith("bytes="):
            start = int(range_header.removeprefix("bytes=").split("-", 1)[0])
        handler.send_response(206 if start else 200)
        handler.send_header("X-Repo-Commit", repo.commit)
        handler.send_header("ETag", f'"{repo_file.etag}"')
        handler.send_header("Content-Length", str(len(content) - start))
        if start:
            handler.send_header("Content-Range", f"bytes {start}-{len(content) - 1}/{len(content)}")
        handler.send_header("Accept-Ranges", "bytes")
        handler.end_headers()
        if not body:
            return
        remaining = content[start:]
        half = len(remaining) // 2
        if file_path in self.cut_once:
            handler.wfile.write(remaining[:self.cut_once.pop(file_path)])
            handler.wfile.flush()
            handler.close_connection = True
            return
        if file_path in self.slow:
            handler.wfile.write(remaining[:half])
            handler.wfile.flush()
            time.sleep(self.slow[file_path])
            remaining = remaining[half:]
        handler.wfile.write(remaining)

    # -- helpers ----------------------------------------------------------------------------

    def split_repo(self, rest: str) -> tuple[Repo | None, str]:
        parts = rest.split("/")
        repo = self.repos.get("/".join(parts[:2]))
        return repo, "/".join(parts[2:])

    @staticmethod
    def json(handler: BaseHTTPRequestHandler, payload, commit: str) -> None:
        data = json.dumps(payload).encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("X-Repo-Commit", commit)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    @staticmethod
    def error(handler: BaseHTTPRequestHandler, status: int, code: str | None, message: str,
              commit: str | None = None) -> None:
        data = json.dumps({"error": message}).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        if code:
            handler.send_header("X-Error-Code", code)
        if commit:
            handler.send_header("X-Repo-Commit", commit)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(data)


def start_fake_hub(hf_home: Path) -> FakeHub:
    return FakeHub(repos_from_cache(hf_home)).start()
