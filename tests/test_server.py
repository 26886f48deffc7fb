"""The Cog service over HTTP: the real coglet server on 127.0.0.1 running predict.py."""

import base64
import io
import json
import socket
import struct
import time
import zlib
from pathlib import Path

import pytest
import requests
from PIL import Image

from conftest import png_bytes
from gemma_opt.cog_server import CogServer

pytestmark = pytest.mark.slow


def data_uri(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def png_bomb(side: int) -> bytes:
    """A real 1-bit PNG of side x side black pixels, in well under 1 MB (written with zlib:
    Pillow would hold side² bytes to write it)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    row, packer = b"\0" * (1 + -(-side // 8)), zlib.compressobj(9)  # a filter byte, then 8 pixels a byte
    pixels = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def tiny_server():
    server = CogServer({"GEMMA_OPT_MODEL": "tiny-random"})
    health = server.wait_until_set_up()
    assert health["status"] == "READY", health
    yield server
    server.stop()


def test_health_goes_from_starting_to_ready(tiny_server):
    assert tiny_server.statuses[0] == "STARTING" and tiny_server.statuses[-1] == "READY"


def test_setup_failure_says_how_to_get_the_weights():
    server = CogServer({"GEMMA_OPT_MODEL": "weights/not-downloaded", "GEMMA_OPT_FALLBACK_MODEL": ""})
    try:
        health = server.wait_until_set_up(120)
        assert health["status"] == "SETUP_FAILED"
        assert "python -m gemma_opt download" in health["setup"]["logs"]
    finally:
        server.stop()


def test_a_server_that_cannot_start_says_why_at_once_and_leaves_no_log():
    with socket.socket() as taken:  # another server on the port: coglet exits at once
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = CogServer({"GEMMA_OPT_MODEL": "tiny-random"}, port=taken.getsockname()[1])
        try:
            with pytest.raises(RuntimeError, match="exited .* before it was set up(.|\n)*Address already in use"):
                server.wait_until_set_up(120)
        finally:
            server.stop()
    assert not Path(server.log.name).exists()


def test_image_as_data_uri_and_as_http_url(tiny_server, http_files):
    base, files = http_files
    files.files["/photo.png"] = png_bytes()
    for image in (data_uri(png_bytes()), f"{base}/photo.png"):
        response = tiny_server.predict(prompt="What is in this picture?", image=image, max_new_tokens=8)
        body = response.json()
        assert body["status"] == "succeeded", body
        assert "".join(body["output"])
        assert body["metrics"]["input_token_count"] > 16  # the 16 image tokens are in the prompt
        assert body["metrics"]["output_token_count"] == 8


def test_streaming_yields_ordered_output_events(tiny_server):
    response = tiny_server.post({"input": {"prompt": "Hello", "max_new_tokens": 12, "temperature": 0}},
                                headers={"Accept": "text/event-stream"}, timeout=120, stream=True)
    assert response.status_code == 200, response.text
    events = []
    # SSE is UTF-8, its lines end at a line feed: requests guesses ISO-8859-1 for text/*, and
    # splitlines() also breaks at U+0085 and U+2028, which a random model's tokens contain
    for block in response.content.decode().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n") if ": " in line)
        if "event" in lines:
            events.append((lines["event"], json.loads(lines["data"])))
    kinds = [kind for kind, _ in events]
    assert kinds[0] == "start" and kinds[-1] == "completed"
    outputs = [data for kind, data in events if kind == "output"]
    assert len(outputs) >= 2
    assert [o["index"] for o in outputs] == list(range(len(outputs)))
    assert "".join(o["chunk"] for o in outputs) == "".join(events[-1][1]["output"])
    assert {"time_to_first_token", "tokens_per_second", "sparsity"} <= {d["name"] for k, d in events if k == "metric"}


def test_openapi_lists_every_input_with_description_and_bounds(tiny_server):
    schema = requests.get(f"{tiny_server.url}/openapi.json", timeout=10).json()
    props = schema["components"]["schemas"]["Input"]["properties"]
    assert sorted(props, key=lambda name: props[name]["x-order"]) == ["prompt", "image", "system_prompt", "max_new_tokens", "temperature", "top_p", "top_k",
                           "seed", "sparsity_method", "sparsity_ratio", "quantization"]
    assert all(p.get("description") for p in props.values())
    assert (props["max_new_tokens"]["minimum"], props["max_new_tokens"]["maximum"]) == (1, 8192)
    assert (props["sparsity_ratio"]["minimum"], props["sparsity_ratio"]["maximum"]) == (0, 0.8)
    assert schema["components"]["schemas"]["sparsity_method"]["enum"] == [
        "none", "magnitude", "wanda", "gradual", "neurons", "layer_norm", "owl-magnitude", "owl-wanda"]
    output = schema["components"]["schemas"]["Output"]
    assert output["x-cog-array-type"] == "iterator" and output["x-cog-array-display"] == "concatenate"


@pytest.mark.parametrize("inputs, field", [
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"temperature": 2.5}, "temperature"),
    ({"sparsity_ratio": 0.9}, "sparsity_ratio"), ({"quantization": "int3"}, "quantization"),
    ({"sparsity_method": "random"}, "sparsity_method"), ({"max_new_tokens": "many"}, "max_new_tokens"),
])
def test_invalid_inputs_get_422_naming_the_field(tiny_server, inputs, field):
    response = tiny_server.predict(prompt="Hi", **inputs)
    assert response.status_code == 422, response.text
    assert field in json.dumps(response.json()["detail"])


def test_bad_files_and_prompts_fail_clearly_and_the_server_keeps_serving(tiny_server):
    bomb = png_bomb(20_000)  # 400M pixels in ~60 kB; phones' largest photos have 200M
    assert Image.open(io.BytesIO(png_bomb(100))).convert("L").getextrema() == (0, 0)  # a valid PNG
    cases = [
        (data_uri(png_bytes()[:60]), "not a readable image"),
        (data_uri(b"", "image/jpeg"), "empty"),
        (data_uri(b"just some text, not a jpeg", "image/jpeg"), "not a readable image"),
        (data_uri(bomb), "too large to decode safely"),
    ]
    for image, message in cases:
        body = tiny_server.predict(prompt="Describe", image=image, max_new_tokens=4).json()
        assert body["status"] == "failed" and message in body["error"], body
    body = tiny_server.predict(prompt="word " * 5000, max_new_tokens=4).json()
    assert body["status"] == "failed" and "exceeds this model's context of 4096 tokens" in body["error"], body
    body = tiny_server.predict(prompt="", max_new_tokens=4).json()  # the web form's field left empty
    assert body["status"] == "failed" and "the prompt is empty" in body["error"], body
    body = tiny_server.predict(prompt="Still there?", max_new_tokens=4).json()
    assert body["status"] == "succeeded", body


def test_cancel_stops_generation_and_frees_the_server(tiny_server, http_files):
    base, files = http_files
    started = time.monotonic()
    response = tiny_server.post({"id": "long-one", "webhook": f"{base}/hook", "webhook_events_filter": ["completed"],
                                 "input": {"prompt": "Tell me everything.", "max_new_tokens": 4000}},
                                headers={"Prefer": "respond-async"}, timeout=30)
    assert response.status_code == 202, response.text
    time.sleep(2)
    assert requests.post(f"{tiny_server.url}/predictions/long-one/cancel", timeout=30).status_code == 200
    body = tiny_server.predict(prompt="Next one", max_new_tokens=4).json()
    assert body["status"] == "succeeded", body
    assert time.monotonic() - started < 60  # 4000 tokens would take far longer
    deadline = time.monotonic() + 30
    while not [h for h in files.webhooks if h.get("id") == "long-one"] and time.monotonic() < deadline:
        time.sleep(0.2)
    final = [h for h in files.webhooks if h.get("id") == "long-one"][-1]
    assert final["status"] == "canceled"
    assert final["metrics"].get("output_token_count", 0) < 4000


def test_whole_number_temperature_and_top_p_sample_as_the_same_floats(tiny_server):
    """JSON clients send "temperature": 1; the server passes the int on, and transformers'
    temperature warper refuses ints."""
    bodies = [tiny_server.predict(prompt="Hello", max_new_tokens=6, seed=3, temperature=t, top_p=p).json()
              for t, p in ((1, 1), (1.0, 1.0))]
    assert all(b["status"] == "succeeded" for b in bodies), bodies
    assert bodies[0]["output"] == bodies[1]["output"]


def test_switching_sparsity_back_and_forth_is_reproducible(tiny_server):
    def run(method, ratio):
        body = tiny_server.predict(prompt="Tell me a story", max_new_tokens=10, seed=1234, temperature=1.0,
                                   sparsity_method=method, sparsity_ratio=ratio).json()
        assert body["status"] == "succeeded", body
        return "".join(body["output"]), body["metrics"]["sparsity"]

    variants = [("magnitude", 0.3), ("owl-wanda", 0.6)]
    first = [run(*v) for v in variants + variants]
    assert first[0] == first[2] and first[1] == first[3]
    assert first[0][1] == pytest.approx(0.3, abs=0.01) and first[1][1] == pytest.approx(0.6, abs=0.01)
    assert first[0][0] != first[1][0]


def test_the_270m_serves_text_and_refuses_images_clearly():
    server = CogServer({"GEMMA_OPT_MODEL": "gemma-3-270m"})
    try:
        assert server.wait_until_set_up()["status"] == "READY"
        body = server.predict(prompt="The capital of France is", max_new_tokens=6, temperature=0).json()
        assert body["status"] == "succeeded" and "".join(body["output"]).strip(), body
        body = server.predict(prompt="What is this?", image=data_uri(png_bytes()), max_new_tokens=4).json()
        assert body["status"] == "failed" and "has no vision tower" in body["error"], body
        assert server.predict(prompt="Hi", max_new_tokens=2).json()["status"] == "succeeded"
    finally:
        server.stop()


def test_a_second_boot_loads_the_cold_boot_cache(tmp_path):
    answers = []
    for expected in ("cold-boot cache: miss: no entry", "cold-boot cache: hit"):
        server = CogServer({"GEMMA_OPT_MODEL": "tiny-random", "GEMMA_OPT_CACHE_DIR": str(tmp_path)})
        try:
            assert server.wait_until_set_up()["status"] == "READY"
            body = server.predict(prompt="Hello there", max_new_tokens=8, temperature=0).json()
            answers.append("".join(body["output"]))
            # The process log, not /health-check's setup logs: coglet 0.23.1 can ship the last
            # line printed before setup() returns after READY, and then files it as a user log.
            assert expected in server.output(), server.output()
        finally:
            server.stop()
    assert answers[0] == answers[1]
