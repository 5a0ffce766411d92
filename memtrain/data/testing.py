"""Small deterministic corpora and datasets for tests (they take well under a second to prepare).

Test files import these instead of sharing a conftest, so every data test file stands alone.
"""
from __future__ import annotations

import gzip
import json
import os
import random

from memtrain.data import prepare

_WORDS = ("the cat sat on a mat while seven dogs ran across wide green fields under blue sky and "
          "def return import class for in if else print value index 0 1 2 3 4 5 6 7 8 9").split()


def write_corpus(root: str, n_docs: int = 48, seed: int = 0) -> list[str]:
    """Write `n_docs` documents of varied length across .txt, .md, .py, .jsonl and .jsonl.gz files."""
    rng = random.Random(seed)
    os.makedirs(root, exist_ok=True)

    def doc() -> str:
        lines = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12))) for _ in range(rng.randint(1, 40))]
        return "\n".join(lines) + "\n"

    paths, i = [], 0
    jsonl = []
    while i < n_docs:
        kind = i % 5
        if kind < 3:
            path = os.path.join(root, f"doc{i:03d}" + (".txt", ".md", ".py")[kind])
            with open(path, "w", encoding="utf-8") as f:
                f.write(doc())
            paths.append(path)
        else:
            jsonl.append(json.dumps({"text": doc(), "id": i}))
        i += 1
    half = len(jsonl) // 2
    with open(os.path.join(root, "part.jsonl"), "w", encoding="utf-8") as f:
        f.write("\n".join(jsonl[:half]) + "\n")
    with gzip.GzipFile(os.path.join(root, "part2.jsonl.gz"), "wb", mtime=0) as f:
        f.write(("\n".join(jsonl[half:]) + "\n").encode())
    return paths


def prepare_tiny(corpus: str, out: str, *, vocab_size: int = 320, shard_tokens: int = 1500, val_every: int = 8,
                 workers: int = 1, extra: list[str] | None = None) -> dict:
    """Prepare `corpus` (from `write_corpus`) into `out`; returns the manifest dict."""
    argv = ["--input", os.path.join(corpus, "*"), "--out", out, "--vocab-size", str(vocab_size),
            "--shard-tokens", str(shard_tokens), "--val-every", str(val_every), "--workers", str(workers),
            "--quiet"] + (extra or [])
    return prepare.prepare(prepare.parse_args(argv))


def tiny_dataset(base: str, name: str = "tiny", **kwargs) -> str:
    """A prepared tiny dataset under `base`, made once and reused (e.g. per pytest session)."""
    out = os.path.join(base, name)
    if not os.path.isfile(os.path.join(out, "manifest.json")):
        corpus = os.path.join(base, name + "_corpus")
        write_corpus(corpus, n_docs=kwargs.pop("n_docs", 48))
        prepare_tiny(corpus, out, **kwargs)
    return out


class ShardServer:
    """A static HTTP server for a directory on localhost, in a thread, with faults to inject (tests, benchmarks).

        with ShardServer(dataset_dir) as srv:
            url = srv.url + "manifest.json"
            srv.fail["train-000001.tar"] = 2      # the next 2 requests for it get HTTP 503
            srv.delay = 0.2                       # seconds before every answer (a slow source)

    `requests` lists the paths asked for, in order.
    """

    def __init__(self, directory: str) -> None:
        import functools
        import http.server
        import threading

        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                name = self.path.lstrip("/").split("?")[0]
                with server._lock:
                    server.requests.append(name)
                    failing = server.fail.get(name, 0)
                    if failing:
                        server.fail[name] = failing - 1
                if server.delay:
                    import time
                    time.sleep(server.delay)
                if failing:
                    self.send_error(503, "injected fault")
                    return
                super().do_GET()

            def log_message(self, *args) -> None:  # keep test output clean
                pass

        self.requests: list[str] = []
        self.fail: dict[str, int] = {}
        self.delay = 0.0
        self._lock = threading.Lock()
        class Server(http.server.ThreadingHTTPServer):
            def handle_error(self, request, client_address) -> None:
                import sys
                if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
                    super().handle_error(request, client_address)  # a client hanging up early is normal

        self._httpd = Server(("127.0.0.1", 0), functools.partial(Handler, directory=directory))
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> "ShardServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
