"""A fake Hugging Face Hub for tests: a Hub cache on disk, a loopback HTTP endpoint, and a clean subprocess.

``huggingface_hub`` reads ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE`` and ``HF_ENDPOINT`` once, when it is imported, so the
code under test runs in a subprocess started with those variables set (:func:`run_python`).
"""
import hashlib
import json
import os
import subprocess
import sys
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, Iterator, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
COMMIT = 'a' * 40  # the revision every fake repo is at


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def add_to_hub_cache(cache_dir: Path, repo_id: str, files: Dict[str, bytes], commit: str = COMMIT) -> Path:
    """Lay ``files`` out in ``cache_dir`` exactly as ``huggingface_hub`` does; returns the snapshot folder.

    ``models--org--name/blobs/<etag>`` holds the bytes, ``snapshots/<commit>/<file>`` links to the blob and
    ``refs/main`` holds the commit hash with no trailing newline.
    """
    repo_dir = cache_dir / ('models--' + repo_id.replace('/', '--'))
    snapshot = repo_dir / 'snapshots' / commit
    (repo_dir / 'blobs').mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo_dir / 'refs').mkdir(exist_ok=True)
    (repo_dir / 'refs' / 'main').write_text(commit)
    for name, data in files.items():
        blob = repo_dir / 'blobs' / _sha256(data)  # the Hub's etag of an LFS file is its sha256
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


class _HubHandler(BaseHTTPRequestHandler):
    """Answers ``/{org}/{name}/resolve/{revision}/{file}`` from ``server.root/{org}/{name}/{file}`` like the Hub."""

    def _resolve(self, send_body: bool) -> None:
        parts = self.path.split('?')[0].strip('/').split('/')
        if len(parts) < 5 or parts[2] != 'resolve':
            return self._error(404, 'RepoNotFound')
        repo_dir = Path(self.server.root) / parts[0] / parts[1]
        target = repo_dir / '/'.join(parts[4:])
        if not repo_dir.is_dir():
            return self._error(404, 'RepoNotFound')
        if not target.is_file():
            return self._error(404, 'EntryNotFound')
        data = target.read_bytes()
        self.send_response(200)
        self.send_header('X-Repo-Commit', COMMIT)
        self.send_header('ETag', f'"{_sha256(data)}"')
        self.send_header('Content-Length', str(len(data)))
        self.end_headers()
        if send_body:
            self.wfile.write(data)

    def _error(self, status: int, code: str) -> None:
        self.send_response(status)
        self.send_header('X-Error-Code', code)
        self.send_header('X-Repo-Commit', COMMIT)
        self.send_header('Content-Length', '0')
        self.end_headers()

    def do_HEAD(self) -> None:
        self._resolve(send_body=False)

    def do_GET(self) -> None:
        self._resolve(send_body=True)

    def log_message(self, *args) -> None:
        pass


@contextmanager
def serve_hub(root: Path) -> Iterator[str]:
    """Serve the repos under ``root`` (``root/org/name/files``) on loopback; yields the endpoint URL."""
    server = ThreadingHTTPServer(('127.0.0.1', 0), _HubHandler)
    server.root = str(root)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f'http://127.0.0.1:{server.server_address[1]}'
    finally:
        server.shutdown()
        server.server_close()


def run_python(
        code: str, cache_dir: Path, offline: bool, endpoint: Optional[str] = None, argv: Sequence[str] = (),
) -> Dict:
    """Run ``code`` in a fresh interpreter with a clean Hugging Face environment; returns the JSON it prints last.

    The Hub cache is ``cache_dir``, ``HF_HOME`` sits beside it (no stored token), no token or proxy variables leak
    in, and ``HF_HUB_OFFLINE`` / ``HF_ENDPOINT`` are set as asked.
    """
    env = {k: v for k, v in os.environ.items()
           if not k.startswith('HF_') and k.lower() not in ('http_proxy', 'https_proxy', 'all_proxy')}
    env.update(
        HF_HUB_CACHE=str(cache_dir), HF_HOME=str(cache_dir.parent / 'hf_home'), HF_HUB_OFFLINE='1' if offline else '0',
        HF_HUB_DISABLE_TELEMETRY='1', HF_HUB_DISABLE_XET='1', NO_PROXY='127.0.0.1,localhost',
        PYTHONPATH=os.pathsep.join([str(REPO_ROOT), env.get('PYTHONPATH', '')]), OMP_NUM_THREADS='1')
    if endpoint:
        env['HF_ENDPOINT'] = endpoint
    proc = subprocess.run([sys.executable, '-c', code, *argv], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f'subprocess failed ({proc.returncode}):\n{proc.stderr[-4000:]}')
    return json.loads(proc.stdout.strip().splitlines()[-1])
