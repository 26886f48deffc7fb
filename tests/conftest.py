import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from gemma_opt.models import load_model

ROOT = Path(__file__).resolve().parent.parent


def repo_text() -> str:
    """What the repo shows and runs (its READMEs and docs, cog.yaml, Makefile, CI, scripts, the package),
    in one string: where the commands and GEMMA_OPT_* names a user meets are written."""
    files = [ROOT / name for name in ("README.md", "weights/README.md", "cog.yaml", "Makefile", "predict.py")]
    files += [*(ROOT / ".ci").iterdir(), *(ROOT / "scripts").iterdir(), *(ROOT / "gemma_opt").glob("*.py"),
              *(ROOT / "docs").rglob("*.md")]
    return "".join(f.read_text() for f in files if f.is_file())


@pytest.fixture
def tiny():
    """A fresh tiny random Gemma3ForConditionalGeneration (tests modify it in place)."""
    return load_model("tiny-random")


def png_bytes(size=(96, 64), color=(30, 160, 90), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color if mode == "RGB" else 0).save(buffer, format="PNG")
    return buffer.getvalue()


class _Files(BaseHTTPRequestHandler):
    """Serves images and receives webhooks, on 127.0.0.1 only."""
    files: dict[str, bytes] = {}
    webhooks: list[dict] = []

    def do_GET(self):
        body = self.files.get(self.path)
        self.send_response(200 if body is not None else 404)
        self.end_headers()
        self.wfile.write(body or b"")

    def do_POST(self):
        self.webhooks.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def http_files():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", _Files
    server.shutdown()
