"""The OpenAI-compatible server under torchrun, on the converted tiny InternVL, through the
official ``openai`` client and raw HTTP.

One server start per layout (CP=2; TP=2 x CP=2), many requests against it. Greedy answers to
a chat with an image and one with a video (streamed and not) are exactly those of the
generate CLI for the same prompt (one rank, the engine without the server); 16 concurrent
requests all succeed and share engine batches; each malformed request gets its 4xx with a
message and the server keeps serving; an engine exception is a 500 and the ranks carry on;
a client leaving mid-stream stops its generation; ``PUT /api`` answers in the reference's
shape; SIGTERM stops every rank with exit code 0.
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.harness import free_port, run_distributed
from tests.references import tiny_chat_tokenizer

API_KEY = "test-key"
MODEL = "tiny-long-vita"
MAX_TOKENS = 6
IM_END = 2  # the tiny tokenizer's <|im_end|>
IMAGE_QUESTION, VIDEO_QUESTION = "what is shown", "describe the video"
MAX_REQUEST_BYTES = 256 * 1024
STARTUP_S, REQUEST_S = 300, 120


@pytest.fixture(scope="module")
def assets(converted, tmp_path_factory):
    """Checkpoint, tokenizer, an image and a video under a media root, and the generate CLI's
    greedy answers (ids, text) for the image and the video prompt."""
    from tests.unit.data.factories import make_image, make_video

    root, _ = converted
    directory = tmp_path_factory.mktemp("serve")
    media = directory / "media"
    media.mkdir()
    assets = {
        "load": str(root / "mcore"),
        "tokenizer": tiny_chat_tokenizer(str(directory)),
        "media": str(media),
        "image": make_image(str(media / "a.png"), 90, 60),
        "video": make_video(str(media / "clip.mp4"), 12),
        "dir": directory,
    }
    [assets["reference"]] = run_distributed(generate_answers, 1, assets, str(directory))
    return assets


def generate_answers(assets: dict, out_dir: str) -> dict:
    """The generate CLI on this one rank: {"image"|"video": (generated ids, text)}."""
    from megatron_longvita import generate

    common = ["--load", assets["load"], "--tokenizer", assets["tokenizer"], "--max-new-tokens", str(MAX_TOKENS)]
    cases = {
        "image": [IMAGE_QUESTION, "--image", assets["image"]],
        "video": [VIDEO_QUESTION, "--video", assets["video"], "--max-num-frames", "2"],
    }
    answers = {}
    for name, (question, *media) in cases.items():
        output = os.path.join(out_dir, f"{name}.json")
        generate.main(common + ["--prompt", question, *media, "--output", output])
        with open(output) as f:
            result = json.load(f)
        answers[name] = (result["generated_ids"], result["text"])
    return answers


class Server:
    """``torchrun -m megatron_longvita.serve`` on 127.0.0.1 (the default host)."""

    def __init__(self, assets: dict, nproc: int, tp: int, cp: int, log: Path) -> None:
        self.port, self.log = free_port(), log
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
            "-m",
            "megatron_longvita.serve",
            "--load",
            assets["load"],
            "--tokenizer",
            assets["tokenizer"],
            "--tp",
            str(tp),
            "--cp",
            str(cp),
            "--port",
            str(self.port),
            "--served-model-name",
            MODEL,
            "--api-key",
            API_KEY,
            "--allowed-media-root",
            assets["media"],
            "--max-request-bytes",
            str(MAX_REQUEST_BYTES),
            "--max-batch-size",
            "8",
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "LONGVITA_PLATFORM": "cpu", "PYTHONWARNINGS": "ignore"}
        self.process = subprocess.Popen(
            command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=Path(__file__).resolve().parents[2]
        )
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + STARTUP_S
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{log.read_text()[-5000:]}")
            try:
                if self.request("GET", "/health")[0] == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"the server did not come up in {STARTUP_S} s:\n{log.read_text()[-5000:]}")
            time.sleep(1)

    def client(self, **options):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key=API_KEY, max_retries=0, timeout=REQUEST_S, **options)

    def request(
        self,
        method: str,
        path: str,
        body: bytes | dict | None = None,
        key: str | None = API_KEY,
        headers: dict | None = None,
    ) -> tuple[int, bytes]:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        request = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})}
        )
        if key is not None:
            request.add_header("Authorization", f"Bearer {key}")
        try:
            with urllib.request.urlopen(request, timeout=REQUEST_S) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def metric(self, name: str) -> float:
        status, text = self.request("GET", "/metrics", key=None)
        assert status == 200
        match = re.search(rf"^{name} ([0-9.e+]+)$", text.decode(), re.MULTILINE)
        return float(match.group(1)) if match else 0.0

    def stop(self, timeout: float = 90) -> None:
        """SIGTERM to torchrun, which forwards it to the ranks: each must log a clean stop and exit.

        torchrun itself re-raises the signal (exit code 1, SignalException) whatever its workers do."""
        ranks = psutil.Process(self.process.pid).children()
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout)
        _, alive = psutil.wait_procs(ranks, timeout=10)
        log = self.log.read_text()
        stopped = sorted(re.findall(r"\[rank (\d+)\].*stopped cleanly", log))
        assert not alive and stopped == [str(r) for r in range(len(ranks))], log[-3000:]
        assert "ChildFailedError" not in log, log[-3000:]

    def kill(self) -> None:
        """SIGKILL torchrun and its ranks (killed alone, torchrun would leave them running)."""
        if self.process.poll() is None:
            processes = [psutil.Process(self.process.pid), *psutil.Process(self.process.pid).children(recursive=True)]
            for process in processes:
                process.kill()
            psutil.wait_procs(processes, timeout=30)


def _data_url(path: str, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(Path(path).read_bytes()).decode()}"


def chat_messages(assets: dict, name: str) -> list[dict]:
    """The same prompt as the generate CLI's: the media part first, then the question."""
    if name == "image":
        part, question = (
            {"type": "image_url", "image_url": {"url": _data_url(assets["image"], "image/png")}},
            IMAGE_QUESTION,
        )
    else:
        part, question = (
            {"type": "video_url", "video_url": {"url": _data_url(assets["video"], "video/mp4")}},
            VIDEO_QUESTION,
        )
    return [{"role": "user", "content": [part, {"type": "text", "text": question}]}]


def chat(server: Server, assets: dict, name: str, stream: bool) -> tuple[str, int, str]:
    """(text, completion tokens, finish reason) of a greedy chat through the openai client."""
    client = server.client()
    options = dict(
        model=MODEL,
        messages=chat_messages(assets, name),
        max_tokens=MAX_TOKENS,
        temperature=0,
        extra_body={"max_num_frames": 2},
    )
    if not stream:
        response = client.chat.completions.create(**options)
        return response.choices[0].message.content, response.usage.completion_tokens, response.choices[0].finish_reason
    text, usage, finish = [], None, None
    for chunk in client.chat.completions.create(**options, stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
        for choice in chunk.choices:
            text.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    return "".join(text), usage, finish


def assert_matches_generate(server: Server, assets: dict, name: str, stream: bool) -> None:
    ids, expected = assets["reference"][name]
    text, completion_tokens, finish = chat(server, assets, name, stream)
    assert (text, completion_tokens) == (expected, len(ids)), f"{name}, stream={stream}: {text!r} vs {expected!r}"
    assert finish == ("stop" if len(ids) < MAX_TOKENS or ids[-1] == IM_END else "length"), finish


@pytest.fixture(scope="module")
def cp2_server(assets):
    server = Server(assets, 2, 1, 2, assets["dir"] / "cp2.log")
    yield server
    server.kill()


def test_cp2_chats_with_image_and_video_match_generate(cp2_server, assets) -> None:
    for name in ("image", "video"):
        for stream in (False, True):
            assert_matches_generate(cp2_server, assets, name, stream)


def test_cp2_16_concurrent_requests_succeed_in_shared_batches(cp2_server, assets) -> None:
    batches_before = cp2_server.metric("longvita_batch_size_count")
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: chat(cp2_server, assets, "image", stream=i % 2 == 1), range(16)))
    ids, expected = assets["reference"]["image"]
    assert all(text == expected and tokens == len(ids) for text, tokens, _ in results), results
    batches = cp2_server.metric("longvita_batch_size_count") - batches_before
    assert batches < 16, f"16 concurrent requests ran in {batches} batches: none was shared"


def test_cp2_malformed_requests_get_4xx_and_the_server_keeps_serving(cp2_server, assets) -> None:
    good = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}
    garbage = base64.b64encode(b"this is not a picture at all" * 4).decode()
    long_text = " ".join(["what is shown in the image"] * 200)

    def with_content(content) -> dict:
        return {**good, "messages": [{"role": "user", "content": content}]}

    cases = {
        "malformed JSON": (b'{"model": "x", "messages": [', 400, "not valid JSON"),
        "wrong type": ({**good, "max_tokens": "ten"}, 400, "max_tokens"),
        "wrong content type": (with_content(42), 400, "messages[0].content"),
        "missing messages": ({"model": MODEL}, 400, "'messages' is required"),
        "missing model": ({"messages": good["messages"]}, 400, "'model' is required"),
        "undecodable image": (
            with_content([{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{garbage}"}}]),
            400,
            "image #1",
        ),
        "undecodable video": (
            with_content([{"type": "video_url", "video_url": {"url": f"data:video/mp4;base64,{garbage}"}}]),
            400,
            "video #1",
        ),
        "bad base64": (
            with_content([{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}]),
            400,
            "base64",
        ),
        "remote media": (
            with_content([{"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]),
            400,
            "remote",
        ),
        "outside media root": (
            with_content([{"type": "image_url", "image_url": {"url": "/etc/passwd"}}]),
            403,
            "outside --allowed-media-root",
        ),
        "prompt over the context": (with_content(long_text), 400, "maximum context length is 512"),
        "max_tokens over the context": ({**good, "max_tokens": 100000}, 400, "maximum context length"),
        "unknown model": ({**good, "model": "gpt-4"}, 404, "does not exist"),
        "body too large": (b"{" + b" " * MAX_REQUEST_BYTES + b"}", 413, "--max-request-bytes"),
    }
    for case, (body, status, fragment) in cases.items():
        got, payload = cp2_server.request("POST", "/v1/chat/completions", body)
        error = json.loads(payload)["error"]
        assert got == status and fragment in error["message"], f"{case}: {got} {error}"
    for key in (None, "wrong-key"):
        got, payload = cp2_server.request("POST", "/v1/chat/completions", good, key=key)
        assert got == 401 and "API key" in json.loads(payload)["error"]["message"], f"key {key}: {got}"
    got, payload = cp2_server.request("POST", "/v1/chat/completions", good)
    assert got == 200 and json.loads(payload)["choices"][0]["message"]["role"] == "assistant"
    assert cp2_server.metric('longvita_request_errors_total{endpoint="/v1/chat/completions",status="400"}') >= 11


def test_cp2_engine_exception_is_500_and_every_rank_serves_the_next(cp2_server, assets) -> None:
    # temperature 1e-300 is 0 in float32: the scores become inf/NaN and torch.multinomial raises on every rank
    from openai import InternalServerError

    client = cp2_server.client()
    with pytest.raises(InternalServerError, match="engine failed"):
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=3, temperature=1e-300
        )
    assert_matches_generate(cp2_server, assets, "image", stream=False)


def test_cp2_client_leaving_mid_stream_stops_its_generation(cp2_server) -> None:
    steps_before, cancelled_before = (
        cp2_server.metric(f"longvita_{n}_total") for n in ("decode_steps", "requests_cancelled")
    )
    body = json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 480,
            "ignore_eos": True,
            "temperature": 0,
            "stream": True,
        }
    ).encode()
    with socket.create_connection(("127.0.0.1", cp2_server.port), timeout=REQUEST_S) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        received = b""
        while received.count(b"data: ") < 4:  # the role chunk and a few tokens
            received += sock.recv(4096)
    deadline = time.monotonic() + REQUEST_S
    while cp2_server.metric("longvita_requests_cancelled_total") == cancelled_before:
        assert time.monotonic() < deadline, "the server never noticed the client leave"
        time.sleep(0.2)
    # batches run one after another: once a later request is answered, the cancelled one has left the engine
    status, _ = cp2_server.request(
        "POST",
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
    )
    assert status == 200
    steps = cp2_server.metric("longvita_decode_steps_total") - steps_before
    assert steps < 400, f"the engine ran {steps} of the 480 steps after the client left"


def test_cp2_reference_api_models_health_metrics(cp2_server, assets) -> None:
    ids, expected = assets["reference"]["image"]
    body = {
        "prompts": [f"<image>\n{IMAGE_QUESTION}"],
        "image_path_list": [assets["image"]],
        "tokens_to_generate": MAX_TOKENS,
    }
    status, payload = cp2_server.request("PUT", "/api", body)
    assert status == 200 and json.loads(payload) == {"text": [expected]}
    status, payload = cp2_server.request("PUT", "/api", {"tokens_to_generate": 4})
    assert status == 400 and "'prompts' is required" in json.loads(payload)["message"]
    assert [m.id for m in cp2_server.client().models.list().data] == [MODEL]
    assert cp2_server.request("GET", "/health", key=None) == (200, b'{"status":"ok"}')
    status, text = cp2_server.request("GET", "/metrics", key=None)
    for name in (
        "longvita_requests_total",
        "longvita_request_errors_total",
        "longvita_queue_depth",
        "longvita_prompt_tokens_total",
        "longvita_generation_tokens_total",
        "longvita_request_latency_seconds_bucket",
        "longvita_time_to_first_token_seconds_bucket",
    ):
        assert name in text.decode(), name


def test_cp2_binds_127_0_0_1_by_default_and_sigterm_stops_all_ranks(cp2_server) -> None:
    ranks = psutil.Process(cp2_server.process.pid).children(recursive=True)
    listening = [
        c.laddr
        for p in ranks
        for c in p.net_connections("tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == cp2_server.port
    ]
    assert listening and {address.ip for address in listening} == {"127.0.0.1"}
    cp2_server.stop()


def test_tp2_cp2_chats_match_generate_and_concurrent_requests_succeed(assets) -> None:
    server = Server(assets, 4, 2, 2, assets["dir"] / "tp2cp2.log")
    try:
        for name, stream in (("image", False), ("image", True), ("video", False)):
            assert_matches_generate(server, assets, name, stream)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda i: chat(server, assets, "image", stream=False), range(4)))
        assert {text for text, _, _ in results} == {assets["reference"]["image"][1]}
        server.stop()
    finally:
        server.kill()
