"""The real Cog HTTP server (coglet) on 127.0.0.1, as a client drives it: for the tests and
``bench --served``."""

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CogServer:
    """``python -m gemma_opt serve`` in a subprocess. Its output goes to a temporary log, which
    ``stop`` removes: errors quote its last lines instead."""

    def __init__(self, env: dict[str, str], base_env: dict[str, str] | None = None, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w", prefix="cog-server-", suffix=".log", delete=False)
        # `python -m gemma_opt serve` execs `python -m cog.server.http` on predict.py.
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gemma_opt", "serve", "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=ROOT, env={**(os.environ if base_env is None else base_env), **env}, stdout=self.log, stderr=subprocess.STDOUT)
        self.statuses: list[str] = []

    def health(self) -> dict:
        return requests.get(f"{self.url}/health-check", timeout=5).json()

    def wait_until_set_up(self, timeout: float = 600) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:  # e.g. the port was taken: coglet exits at once
                raise RuntimeError(f"the server exited (code {self.process.returncode}) before it was set up:\n"
                                   f"{self.tail()}")
            try:
                health = self.health()
            except (requests.ConnectionError, requests.Timeout):  # not listening, or not this server
                time.sleep(0.2)
                continue
            if not self.statuses or self.statuses[-1] != health["status"]:
                self.statuses.append(health["status"])
            if health["status"] not in ("STARTING",):
                return health
            time.sleep(0.5)
        raise TimeoutError(f"server not set up after {timeout}s: {self.statuses}\n{self.tail()}")

    def post(self, body: dict, headers: dict | None = None, timeout: float = 300, stream: bool = False) -> requests.Response:
        """POST /predictions. coglet frees a prediction's slot a moment after answering it (9 of 40
        requests sent right after a completed one heard 409 "At capacity" from coglet 0.23.1):
        retry briefly, as a client would."""
        for _ in range(50):
            response = requests.post(f"{self.url}/predictions", json=body, headers=headers, timeout=timeout, stream=stream)
            if response.status_code != 409 or "At capacity" not in response.text:
                return response
            time.sleep(0.1)
        return response

    def predict(self, timeout: float = 300, **inputs) -> requests.Response:
        """A synchronous prediction."""
        return self.post({"input": inputs}, timeout=timeout)

    def output(self) -> str:
        """Everything the server process printed, worker lines included (JSON log records)."""
        return Path(self.log.name).read_text()

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.output().splitlines()[-lines:])

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()
        os.unlink(self.log.name)
