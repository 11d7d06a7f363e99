"""A server started on a free port for the tests that talk to it over HTTP (a client library, a browser)."""

import socket
import threading
import time

import pytest
import uvicorn

from commands import serve


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def live(tiny_model_dir, tmp_path):
    """A server on the tiny model at http://127.0.0.1:PORT, stopped after the test; (port, outdir)."""
    port, outdir = free_port(), tmp_path / "out"
    argv = ["--model", str(tiny_model_dir), "--outdir", str(outdir), "--device", "cpu", "--port", str(port),
            "--queue", "4"]  # fmt: skip
    server = uvicorn.Server(uvicorn.Config(serve.build(serve.parse(argv)), port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    yield port, outdir
    server.should_exit = True
    thread.join(10)
