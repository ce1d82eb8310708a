"""The vLLM TEST DOUBLE (tests/doubles/vllm-double) behaves like vLLM 0.25 where the toolkit looks.

Each test starts the double as a real subprocess on 127.0.0.1 and a free port
(from source via PYTHONPATH; one test builds the wheel, installs it into a
temporary venv with uv from a local wheelhouse and runs its `vllm` script).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROJECT = ROOT / "tests" / "doubles" / "vllm-double"
KEY = "sekrit-test-key-4242"
TINY_CONFIG = {  # the tiny MiniMax-M2 that real vLLM 0.25 served on an H200 (docs/gpu-validation.md)
    "architectures": ["MiniMaxM2ForCausalLM"], "model_type": "minimax_m2", "head_dim": 64, "hidden_size": 256,
    "max_position_embeddings": 8192, "num_attention_heads": 4, "num_hidden_layers": 2,
    "num_key_value_heads": 2, "torch_dtype": "bfloat16",
}
# MiniMax-M2's real shape (62 layers, 8 KV heads of 128): the seed log's KV-cache error is for TP=4.
FULL_CONFIG = dict(TINY_CONFIG, head_dim=128, hidden_size=3072, max_position_embeddings=196608,
                   num_attention_heads=48, num_hidden_layers=62, num_key_value_heads=8)
ENGINE_FAILED = "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}"


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_model(tmp_path: Path, name: str = "model", **overrides: object) -> Path:
    """A model directory with a config.json (the tiny MiniMax-M2 plus overrides)."""
    path, n = tmp_path / name, 1
    while path.exists():  # several doubles in one test each get their own directory
        path, n = tmp_path / f"{name}-{n}", n + 1
    path.mkdir()
    (path / "config.json").write_text(json.dumps(dict(TINY_CONFIG, **overrides)))
    return path


def double_env(tmp_path: Path, **extra: str) -> dict:
    """Environment for a source run: no startup delay, no fault file unless a test writes one."""
    env = dict(os.environ, PYTHONPATH=str(PROJECT), VLLM_DOUBLE_STARTUP_SECONDS="0",
               VLLM_DOUBLE_FAULT_FILE=str(tmp_path / "engine-fault"))
    for name in ("VLLM_API_KEY", "VLLM_DOUBLE_FAULT", "VLLM_DOUBLE_KV_BYTES"):
        env.pop(name, None)
    env.update(extra)
    return env


class Double:
    """A running `vllm serve` double; collects its merged stdout/stderr line by line."""

    def __init__(self, argv: list, env: dict, port: int) -> None:
        self.port = port
        self.lines: list = []
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        """Everything printed so far."""
        return "\n".join(self.lines)

    def wait_for(self, text: str, timeout: float = 10.0) -> None:
        """Block until `text` was printed; fail with the output if the process ends first."""
        deadline = time.monotonic() + timeout
        while text not in self.output:
            if self.proc.poll() is not None:
                self._reader.join(2)
                if text in self.output:
                    return
                pytest.fail(f"double exited {self.proc.returncode} before printing {text!r}:\n{self.output}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {text!r} within {timeout} s:\n{self.output}")
            time.sleep(0.02)

    def wait_exit(self, timeout: float = 10.0) -> int:
        """The exit status, once the process ended."""
        status = self.proc.wait(timeout)
        self._reader.join(2)
        return status

    def terminate(self) -> float:
        """SIGTERM; return how long the process took to exit."""
        start = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        self.wait_exit(5)
        return time.monotonic() - start

    def request(self, path: str, body: Optional[dict] = None, key: Optional[str] = KEY,
                raw: Optional[bytes] = None) -> tuple:
        """(status, body bytes) of a GET, or a POST when a body is given."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if key:
            req.add_header("Authorization", f"Bearer {key}")
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()


def serve_argv(model: Path, port: int, *flags: str, python: str = sys.executable) -> list:
    """`vllm serve MODEL --host 127.0.0.1 --port PORT FLAGS` run from source."""
    return [python, "-m", "vllm.entrypoints.cli.main", "serve", str(model), "--host", "127.0.0.1",
            "--port", str(port), *flags]


def start(tmp_path: Path, *flags: str, model: Optional[Path] = None, **env: str) -> Double:
    """Start the double on a free port."""
    port = free_port()
    model = model or make_model(tmp_path)
    return Double(serve_argv(model, port, *flags), double_env(tmp_path, **env), port)


def run_once(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """Run the double's CLI to completion."""
    argv = [sys.executable, "-m", "vllm.entrypoints.cli.main", *args]
    return subprocess.run(argv, env=double_env(tmp_path, **env), capture_output=True, text=True, timeout=20)


# Every serve flag vllm-fleet renders (plus --api-key, which it never uses).
ALL_FLAGS = [
    "--served-model-name", "minimax-m2", "mm2", "--tensor-parallel-size", "1", "--pipeline-parallel-size", "1",
    "--data-parallel-size", "1", "--enable-expert-parallel", "--max-model-len", "8192", "--kv-cache-dtype", "auto",
    "--block-size", "16", "--gpu-memory-utilization", "0.5", "--trust-remote-code", "--tool-call-parser",
    "minimax_m2", "--reasoning-parser", "minimax_m2_append_think", "--enable-auto-tool-choice",
    "--compilation-config", '{"cudagraph_mode": "PIECEWISE"}', "--enforce-eager", "--max-num-seqs", "64",
    "--disable-log-requests", "--uvicorn-log-level", "info", "--generation-config", "vllm",
    "--download-dir", "/tmp/dl", "--seed", "0",
]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    """One double started with every toolkit flag and VLLM_API_KEY, shared by the HTTP tests."""
    tmp = tmp_path_factory.mktemp("served")
    double = start(tmp, *ALL_FLAGS, VLLM_API_KEY=KEY)
    double.wait_for("Application startup complete.")
    yield double
    assert double.terminate() < 1.0, double.output
    assert double.proc.returncode == 0


# ------------------------------------------------------------------ CLI --

def test_package_says_it_is_a_double_and_reports_its_version(tmp_path):
    result = run_once(tmp_path, "--version")
    assert result.returncode == 0 and result.stdout.strip() == "0.25.0"
    probe = subprocess.run([sys.executable, "-c", "import vllm; print(vllm.IS_TEST_DOUBLE, vllm.__doc__)"],
                           env=double_env(tmp_path), capture_output=True, text=True, check=True)
    assert probe.stdout.startswith("True TEST DOUBLE of the vLLM serving engine")


@pytest.mark.parametrize("flag", ["--bogus", "--max-model", "--tensor-parallel", "--api-keys", "--quantization"])
def test_unknown_and_abbreviated_flags_are_rejected_like_argparse(tmp_path, flag):
    result = run_once(tmp_path, "serve", str(make_model(tmp_path)), flag, "1")
    assert result.returncode == 2
    assert "error: unrecognized arguments" in result.stderr and flag in result.stderr


@pytest.mark.parametrize("flags,words", [
    (["--compilation-config", "{not json"], "not valid JSON"),
    (["--gpu-memory-utilization", "1.5"], "must be in (0, 1]"),
    (["--kv-cache-dtype", "int4"], "invalid choice: 'int4'"),
    (["--uvicorn-log-level", "loud"], "invalid choice: 'loud'"),
])
def test_bad_flag_values_exit_2(tmp_path, flags, words):
    result = run_once(tmp_path, "serve", str(make_model(tmp_path)), *flags)
    assert result.returncode == 2 and words in result.stderr


def test_serve_help_lists_the_toolkit_flags(tmp_path):
    result = run_once(tmp_path, "serve", "--help")
    assert result.returncode == 0
    for flag in [f for f in ALL_FLAGS if f.startswith("--")] + ["--api-key", "--host", "--port", "-tp", "-pp", "-dp"]:
        assert flag in result.stdout, flag


def test_serve_takes_every_flag_of_the_options_table(tmp_path):
    """A row added to vllm_fleet/planner/options.py needs the double to take its flag (the e2e hosts run it)."""
    from vllm_fleet.planner import options

    result = run_once(tmp_path, "serve", "--help")
    for flag in [f for r in options.rows(secret=False) for f in r.flags]:
        assert re.search(rf"(^|[\s,\[]){re.escape(flag)}([\s,=\]]|$)", result.stdout, re.M), flag


# --------------------------------------------------------- model checks --

def test_a_path_without_config_json_gives_vllms_invalid_repository_error(tmp_path):
    empty = tmp_path / "weights"
    empty.mkdir()
    result = run_once(tmp_path, "serve", str(empty), "--port", str(free_port()))
    assert result.returncode == 1
    assert f"Value error, Invalid repository ID or local directory specified: '{empty}'." in result.stderr
    assert "   - For Hugging Face models: ensure the presence of a 'config.json'." in result.stderr


@pytest.mark.parametrize("overrides,flags,words", [
    ({"architectures": ["MiniMaxM1ForCausalLM"]}, [],
     "Model architectures ['MiniMaxM1ForCausalLM'] are not supported for now. Supported architectures:"),
    ({"auto_map": {"AutoConfig": "configuration_minimax_m2.MiniMaxM2Config"}}, [],
     "contains custom code which must be executed to correctly load the model."),
    ({}, ["--max-model-len", "16384"],
     "User-specified max_model_len (16384) is greater than the derived max_model_len"),
    ({}, ["--tensor-parallel-size", "3"],
     "Total number of attention heads (4) must be divisible by tensor parallel size (3)."),
])
def test_model_config_problems_exit_1_with_vllms_text(tmp_path, overrides, flags, words):
    model = make_model(tmp_path, **overrides)
    result = run_once(tmp_path, "serve", str(model), "--port", str(free_port()), *flags)
    assert result.returncode == 1, result.stdout
    assert words in result.stderr
    assert "Application startup complete." not in result.stdout


def test_custom_code_runs_with_trust_remote_code_and_minimax_runs_without_it(tmp_path):
    custom = make_model(tmp_path, "custom", auto_map={"AutoConfig": "x.Y"})
    first = start(tmp_path, "--trust-remote-code", model=custom)
    first.wait_for("Application startup complete.")
    assert first.terminate() < 1.0
    native = start(tmp_path, model=make_model(tmp_path, "native"))  # vLLM 0.25 supports MiniMax-M2 natively
    native.wait_for("Application startup complete.")
    assert native.terminate() < 1.0 and native.proc.returncode == 0


# --------------------------------------------------------- startup logs --

def test_startup_reproduces_the_kv_lines_real_vllm_logged_on_an_h200(tmp_path):
    double = start(tmp_path, "--max-model-len", "8192", VLLM_DOUBLE_KV_BYTES=str(72_778_368 * 1024))
    double.wait_for("Application startup complete.")
    double.terminate()
    out = double.output
    assert re.search(r"\(EngineCore_DP0 pid=\d+\) INFO \d\d-\d\d [\d:]{8} \[gpu_worker.py\] "
                     r"Available KV cache memory: 69.41 GiB", out), out
    assert "[kv_cache_utils.py] GPU KV cache size: 72,778,368 tokens" in out
    assert "[kv_cache_utils.py] Maximum concurrency for 8,192 tokens per request: 8884.08x" in out
    assert f"[api_server.py] Starting vLLM server on http://127.0.0.1:{double.port}" in out
    assert re.search(r"\(APIServer pid=\d+\) INFO .* \[api_utils.py\] vLLM server version 0.25.0, serving model /", out)
    lines = [line.split(") ", 1)[1] for line in double.lines if line.startswith("(APIServer")]
    assert "INFO:     Application startup complete." in lines


def test_tp2_halves_kv_heads_per_gpu_and_logs_every_worker(tmp_path):
    double = start(tmp_path, "-tp", "2", VLLM_DOUBLE_KV_BYTES=str(144_894_080 * 512))
    double.wait_for("Application startup complete.")
    double.terminate()
    assert len(re.findall(r"\(Worker_TP[01] pid=\d+\) .*Available KV cache memory: 69.09 GiB", double.output)) == 2
    assert "GPU KV cache size: 144,894,080 tokens" in double.output  # 512 B/token per GPU, as measured


def test_default_budget_is_8_gib_and_fp8_doubles_the_tokens(tmp_path):
    double = start(tmp_path, "--kv-cache-dtype", "fp8")
    double.wait_for("Application startup complete.")
    double.terminate()
    assert "Available KV cache memory: 8.00 GiB" in double.output
    assert "GPU KV cache size: 16,777,216 tokens" in double.output  # 8 GiB / 512 B (fp8 halves 1024 B)
    assert "Maximum concurrency for 8,192 tokens per request: 2048.00x" in double.output


def test_kv_cache_memory_bytes_too_small_fails_like_the_seed_log(tmp_path):
    model = make_model(tmp_path, **FULL_CONFIG)
    result = run_once(tmp_path, "serve", str(model), "--port", str(free_port()), "-tp", "4",
                      "--max-model-len", "196608", "--kv-cache-memory-bytes", str(int(9.38 * 2**30)))
    assert result.returncode == 1
    out = result.stdout + result.stderr
    assert ("ValueError: To serve at least one request with the model's max seq len (196608), (11.62 GiB KV "
            "cache is needed, which is larger than the available KV cache memory (9.38 GiB).") in out
    assert re.search(r"the estimated maximum model length is 1586\d\d\. Try increasing `gpu_memory_utilization`",
                     out)
    assert ENGINE_FAILED in out


# ----------------------------------------------------------------- HTTP --

def test_health_needs_no_key_and_answers_200_with_an_empty_body(served):
    assert served.request("/health", key=None) == (200, b"")


def test_one_keep_alive_connection_carries_chunked_bodies_and_a_refused_request(served):
    """What a router's HTTP client sends (vllm-router: keep-alive, chunked bodies): each request is answered
    on its own, also after a 401 whose body the server had to read and drop (uvicorn does so)."""
    body = json.dumps({"model": "minimax-m2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    with socket.create_connection(("127.0.0.1", served.port), timeout=10) as sock:
        f = sock.makefile("rb")
        for auth, framing, payload in ((None, f"Content-Length: {len(body)}", body),
                                       (KEY, "Transfer-Encoding: chunked", chunked),
                                       (KEY, f"Content-Length: {len(body)}", body)):
            line = f"Authorization: Bearer {auth}\r\n" if auth else ""
            sock.sendall((head + line + framing + "\r\n\r\n").encode() + payload)
            status = f.readline().split()[1]
            length = 0
            while (h := f.readline()) not in (b"\r\n", b""):
                if h.lower().startswith(b"content-length:"):
                    length = int(h.split(b":", 1)[1])
            answer = f.read(length)
            assert status == (b"401" if auth is None else b"200"), answer
            if auth:
                assert json.loads(answer)["object"] == "chat.completion"


@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_v1_without_the_right_key_is_401_unauthorized(served, key):
    for path in ("/v1/models", "/v1/chat/completions", "/v1/anything"):
        status, body = served.request(path, key=key)
        assert (status, json.loads(body)) == (401, {"error": "Unauthorized"}), path


def test_models_lists_every_served_name_with_root_and_max_model_len(served):
    status, body = served.request("/v1/models")
    assert status == 200
    data = json.loads(body)
    assert data["object"] == "list"
    assert [(m["id"], m["object"], m["owned_by"], m["max_model_len"]) for m in data["data"]] == [
        ("minimax-m2", "model", "vllm", 8192), ("mm2", "model", "vllm", 8192)]
    assert all(Path(m["root"]).name == "model" for m in data["data"])


def test_chat_completion_has_openai_shape_and_think_in_content(served):
    status, body = served.request("/v1/chat/completions", {
        "model": "minimax-m2", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 200,
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        "tool_choice": "auto"})
    assert status == 200
    reply = json.loads(body)
    assert reply["object"] == "chat.completion" and reply["id"].startswith("chatcmpl-")
    assert reply["model"] == "minimax-m2"
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["message"]["role"] == "assistant"
    assert choice["message"]["content"].startswith("<think>") and "</think>" in choice["message"]["content"]
    assert choice["message"]["reasoning"] is None
    usage = reply["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0


def test_chat_stream_is_sse_ending_with_done(served):
    status, body = served.request("/v1/chat/completions", {
        "messages": [{"role": "user", "content": "stream please"}], "stream": True,
        "stream_options": {"include_usage": True}})
    assert status == 200
    events = [e[len("data: "):] for e in body.decode().split("\n\n") if e]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text.startswith("<think>")
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop" and chunks[-1]["usage"]["completion_tokens"] > 0


def test_completions_default_to_16_tokens_and_stream(served):
    status, body = served.request("/v1/completions", {"model": "mm2", "prompt": "Once upon a time"})
    reply = json.loads(body)
    assert status == 200 and reply["object"] == "text_completion"
    assert reply["usage"]["completion_tokens"] <= 16 and reply["choices"][0]["text"]
    status, body = served.request("/v1/completions", {"prompt": "x", "max_tokens": 3, "stream": True})
    events = [e for e in body.decode().split("\n\n") if e]
    assert status == 200 and events[-1] == "data: [DONE]" and len(events) == 4
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("path,body,raw,status,words", [
    ("/v1/chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}, None, 404,
     "The model `gpt-4` does not exist."),
    ("/v1/chat/completions", {"messages": []}, None, 400, "messages"),
    ("/v1/chat/completions", None, b"{nope", 400, "JSON decode error"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 10**6}, None, 400,
     "maximum context length is 8192 tokens"),
    ("/v1/nothing", {}, None, 404, "Not Found"),
])
def test_bad_requests_get_vllm_style_errors(served, path, body, raw, status, words):
    got, reply = served.request(path, body, raw=raw)
    assert got == status and words in reply.decode()


def test_every_request_is_logged_like_uvicorn_and_the_key_never_is(served):
    served.request("/health", key=None)
    served.request("/v1/models", key="wrong-key")
    served.wait_for('"GET /v1/models HTTP/1.1" 401 Unauthorized')
    assert re.search(r'\(APIServer pid=\d+\) INFO:     127\.0\.0\.1:\d+ - "GET /health HTTP/1\.1" 200 OK',
                     served.output)
    assert KEY not in served.output and "wrong-key" not in served.output
    assert "'api_key'" not in served.output or "<redacted>" in served.output


def test_api_key_flag_accepts_several_keys_and_underscore_flags_work(tmp_path):
    double = start(tmp_path, "--api_key", "first-key-000", "second-key-00", "--max_model_len=4096")
    double.wait_for("Application startup complete.")
    try:
        assert double.request("/v1/models", key="second-key-00")[0] == 200
        assert double.request("/v1/models", key="first-key-000")[0] == 200
        assert double.request("/v1/models", key=KEY)[0] == 401
        assert json.loads(double.request("/v1/models", key="first-key-000")[1])["data"][0]["max_model_len"] == 4096
    finally:
        double.terminate()
    assert "first-key-000" not in double.output


def wait_healthy(double: Double, timeout: float = 10.0) -> None:
    """Poll /health until it answers (for runs whose log level hides the startup line)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if double.request("/health", key=None)[0] == 200:
                return
        except urllib.error.URLError:
            pass
        if time.monotonic() > deadline or double.proc.poll() is not None:
            pytest.fail(f"never healthy:\n{double.output}")
        time.sleep(0.05)


def test_warning_log_level_hides_uvicorn_info_lines_and_auto_tools_need_the_flags(tmp_path):
    double = start(tmp_path, "--uvicorn-log-level", "warning")
    double.wait_for("Starting vLLM server on")
    wait_healthy(double)
    status, body = double.request("/v1/chat/completions", {
        "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "f"}}]})
    double.terminate()
    assert status == 400 and "--enable-auto-tool-choice and --tool-call-parser" in body.decode()
    assert "POST /v1/chat/completions" not in double.output and "Application startup complete." not in double.output
    assert "GPU KV cache size:" in double.output  # vLLM's own lines stay


# ------------------------------------------------------------- lifecycle --

def test_sigterm_during_startup_exits_0_fast_and_nothing_listens_before_ready(tmp_path):
    double = start(tmp_path, VLLM_DOUBLE_STARTUP_SECONDS="30")
    double.wait_for("Using max model len 8192")
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{double.port}/health", timeout=2)
    assert double.terminate() < 1.0 and double.proc.returncode == 0
    assert "Application startup complete." not in double.output


def test_startup_delay_is_honoured(tmp_path):
    began = time.monotonic()
    double = start(tmp_path, VLLM_DOUBLE_STARTUP_SECONDS="0.6")
    double.wait_for("Application startup complete.")
    assert time.monotonic() - began >= 0.6
    assert double.terminate() < 1.0


def test_a_busy_port_fails_with_errno_98(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(serve_argv(make_model(tmp_path), port), env=double_env(tmp_path),
                                capture_output=True, text=True, timeout=20)
    assert result.returncode == 1 and "OSError: [Errno 98] Address already in use" in result.stderr


# ---------------------------------------------------------------- faults --

@pytest.mark.parametrize("fault,words", [
    ("kv_cache", ["ValueError: To serve at least one request with the model's max seq len (8192), (0.01 GiB KV "
                  "cache is needed, which is larger than the available KV cache memory (0.01 GiB).", ENGINE_FAILED]),
    ("free_memory", ["ValueError: Free memory on device cuda:0 (37.95/79.25 GiB) on startup is less than desired GPU "
                     "memory utilization (0.9, 71.33 GiB). Decrease GPU memory utilization or reduce GPU memory "
                     "used by other processes.", ENGINE_FAILED]),
    ("illegal_memory", ["torch.AcceleratorError: CUDA error: an illegal memory access was encountered",
                        ENGINE_FAILED]),
    ("oom", ["torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB.", ENGINE_FAILED]),
    ("address_in_use", ["OSError: [Errno 98] Address already in use"]),
])
def test_startup_faults_exit_1_with_the_real_error_text(tmp_path, fault, words):
    double = start(tmp_path, VLLM_DOUBLE_FAULT=fault)
    assert double.wait_exit() == 1
    for word in words:
        assert word in double.output
    assert "Application startup complete." not in double.output


def test_a_tp4_worker_reports_the_free_memory_error_like_vllm_025(tmp_path):
    double = start(tmp_path, "-tp", "4", VLLM_DOUBLE_FAULT="free_memory")
    assert double.wait_exit() == 1
    assert re.search(r"\(Worker_TP0 pid=\d+\) ERROR .* \[multiproc_executor.py\] WorkerProc failed to start\.",
                     double.output)
    assert re.search(r"\(Worker_TP0 pid=\d+\) ERROR .* ValueError: Free memory on device cuda:0 \(37\.95/79\.25 GiB\)",
                     double.output)
    assert re.search(r"^\(APIServer pid=\d+\) " + re.escape(ENGINE_FAILED) + "$", double.output, re.M)


def test_the_fault_file_wins_over_the_environment_and_an_empty_file_is_no_fault(tmp_path):
    (tmp_path / "engine-fault").write_text("oom\n")
    double = start(tmp_path, VLLM_DOUBLE_FAULT="kv_cache")
    assert double.wait_exit() == 1 and "torch.OutOfMemoryError" in double.output and "To serve" not in double.output
    (tmp_path / "engine-fault").write_text("")
    double = start(tmp_path, VLLM_DOUBLE_FAULT="unhealthy")
    double.wait_for("Application startup complete.")
    assert double.request("/health")[0] == 500
    double.terminate()


def test_an_unknown_fault_is_an_error(tmp_path):
    (tmp_path / "engine-fault").write_text("gremlins")
    double = start(tmp_path)
    assert double.wait_exit() == 1
    assert "unknown fault 'gremlins'" in double.output and "crash_after_start" in double.output


@pytest.mark.parametrize("fault,flags", [
    ("illegal_memory", ["--compilation-config", '{"cudagraph_mode": "PIECEWISE"}']),
    ("illegal_memory", ["--enforce-eager"]),
    ("free_memory", ["--gpu-memory-utilization", "0.45"]),
])
def test_the_documented_remedies_make_the_fault_go_away(tmp_path, fault, flags):
    double = start(tmp_path, *flags, VLLM_DOUBLE_FAULT=fault)
    double.wait_for("Application startup complete.")
    assert double.request("/health")[0] == 200
    assert double.terminate() < 1.0 and double.proc.returncode == 0


def engine_pid(double: Double) -> int:
    """The engine process's pid, from its log prefix."""
    found = re.search(r"^\(EngineCore_DP0 pid=(\d+)\) ", double.output, re.M)
    assert found, double.output
    return int(found.group(1))


def timed_request(port: int, path: str, body: Optional[dict] = None, timeout: float = 2.0) -> int:
    """The status of one request with a deadline; 0 when nothing answered in time (or at all)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return 0


COMPLETION = {"prompt": "ping", "max_tokens": 1}


def test_the_engine_core_is_a_child_process_with_its_own_pid(tmp_path):
    double = start(tmp_path)
    double.wait_for("Application startup complete.")
    try:
        pid = engine_pid(double)
        assert pid != double.proc.pid
        with open(f"/proc/{pid}/stat") as stat:
            assert int(stat.read().rsplit(")", 1)[1].split()[1]) == double.proc.pid  # its parent is the API server
        assert re.search(r"^\(EngineCore_DP0 pid=%d\) INFO .* GPU KV cache size: " % pid, double.output, re.M)
        assert re.search(r"^\(APIServer pid=%d\) .*Starting vLLM server on " % double.proc.pid, double.output, re.M)
        assert timed_request(double.port, "/v1/completions", COMPLETION) == 200
    finally:
        assert double.terminate() < 1.0 and double.proc.returncode == 0
    assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read()  # stopped with it


def test_engine_sigkill_health_503_then_the_api_server_exits_0(tmp_path):
    # What real vLLM 0.25 did on an H200 under systemd: /health 503 for ~4 s, then exit status 0.
    double = start(tmp_path, VLLM_DOUBLE_WATCHDOG_SECONDS="1.5")
    double.wait_for("Application startup complete.")
    assert timed_request(double.port, "/health") == 200
    killed = time.monotonic()
    os.kill(engine_pid(double), signal.SIGKILL)
    double.wait_for("[shutdown] MPClient: engine core exited unexpectedly; starting cleanup", timeout=3)
    assert timed_request(double.port, "/health") == 503
    assert timed_request(double.port, "/v1/completions", COMPLETION) == 500
    assert double.wait_exit(5) == 0
    down = time.monotonic() - killed
    assert 0.0 < down <= 1.5 + 0.5, down  # at the API server's next watchdog tick
    assert re.search(r"^\(APIServer pid=\d+\) WARNING .* \[core_client.py\] \[shutdown\] MPClient", double.output, re.M)
    assert "Application shutdown complete." in double.output


def test_a_stopped_engine_keeps_health_and_metrics_200_while_completions_time_out(tmp_path):
    double = start(tmp_path, VLLM_DOUBLE_WATCHDOG_SECONDS="0.5")
    double.wait_for("Application startup complete.")
    pid = engine_pid(double)
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(1.2)  # two watchdog ticks: a hung engine is not a dead one
        assert timed_request(double.port, "/health") == 200
        assert timed_request(double.port, "/metrics") == 200
        began = time.monotonic()
        assert timed_request(double.port, "/v1/completions", COMPLETION, timeout=1.5) == 0
        assert time.monotonic() - began >= 1.4
        assert double.proc.poll() is None
    finally:
        os.kill(pid, signal.SIGCONT)
    assert timed_request(double.port, "/v1/completions", COMPLETION) == 200  # served again at once
    assert double.terminate() < 1.0


def test_metrics_are_vllms_gauges_without_the_key(tmp_path):
    double = start(tmp_path, "--served-model-name", "minimax-m2", VLLM_API_KEY=KEY)
    double.wait_for("Application startup complete.")
    try:
        status, body = double.request("/metrics", key=None)
        assert status == 200
        assert 'vllm:num_requests_running{engine="0",model_name="minimax-m2"} 0.0' in body.decode()
    finally:
        double.terminate()


def test_api_server_sigkill_leaves_the_engine_running(tmp_path):
    # Outside systemd nothing reaps it (under systemd the unit's cgroup is killed): a GPU-holding leftover.
    double = start(tmp_path, VLLM_DOUBLE_ORPHAN_SECONDS="30")
    double.wait_for("Application startup complete.")
    pid = engine_pid(double)
    try:
        double.proc.kill()
        assert double.wait_exit(5) == -signal.SIGKILL
        time.sleep(0.5)
        with open(f"/proc/{pid}/status") as status:
            assert "State:\tS" in status.read()
    finally:
        os.kill(pid, signal.SIGKILL)


def test_crash_after_start_the_engine_errors_and_the_api_server_exits_0(tmp_path):
    double = start(tmp_path, VLLM_DOUBLE_FAULT="crash_after_start", VLLM_DOUBLE_CRASH_SECONDS="0.8",
                   VLLM_DOUBLE_WATCHDOG_SECONDS="0.5")
    double.wait_for("Application startup complete.")
    assert double.request("/health")[0] == 200
    assert double.wait_exit(5) == 0
    assert re.search(r"^\(EngineCore_DP0 pid=\d+\) ERROR .* EngineCore encountered a fatal error\.", double.output, re.M)
    assert "EngineDeadError: EngineCore encountered an issue." in double.output


def test_unhealthy_serves_500_on_health_and_chat_but_lists_models(tmp_path):
    double = start(tmp_path, VLLM_DOUBLE_FAULT="unhealthy", VLLM_API_KEY=KEY)
    double.wait_for("Application startup complete.")
    try:
        assert double.request("/health", key=None) == (500, b"")
        status, body = double.request("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})
        assert status == 500 and json.loads(body)["error"]["type"] == "InternalServerError"
        assert double.request("/v1/models")[0] == 200
    finally:
        double.terminate()


# ----------------------------------------------------------------- wheel --

def test_the_wheel_builds_installs_from_a_wheelhouse_and_serves(tmp_path):
    from tests.doubles.build_wheelhouse import find_uv

    uv = find_uv()  # ./setup puts it in .venv: a missing uv is a failure, not a skip
    house = tmp_path / "wheelhouse"
    subprocess.run([sys.executable, str(ROOT / "tests" / "doubles" / "build_wheelhouse.py"), "--out", str(house),
                    "--versions", "0.25.0", "0.26.0"], check=True, capture_output=True, timeout=120)
    wheels = sorted(p.name for p in house.glob("*.whl"))
    assert wheels == ["vllm-0.25.0-py3-none-any.whl", "vllm-0.26.0-py3-none-any.whl"]
    venv = tmp_path / "venv"
    subprocess.run([uv, "venv", "--python", sys.executable, str(venv)], check=True, capture_output=True, timeout=60)
    subprocess.run([uv, "pip", "install", "--python", str(venv / "bin" / "python"), "--no-index", "--find-links",
                    str(house), "vllm==0.26.0"], check=True, capture_output=True, timeout=60)
    vllm = str(venv / "bin" / "vllm")
    env = {k: v for k, v in double_env(tmp_path).items() if k != "PYTHONPATH"}
    version = subprocess.run([vllm, "--version"], env=env, capture_output=True, text=True, timeout=20)
    assert version.stdout.strip() == "0.26.0"
    assert "--reasoning-parser" in subprocess.run([vllm, "serve", "--help"], env=env, capture_output=True,
                                                  text=True, timeout=20).stdout
    port = free_port()
    argv = [vllm, "serve", str(make_model(tmp_path)), "--host", "127.0.0.1", "--port", str(port)]
    double = Double(argv, env, port)
    double.wait_for("Application startup complete.")
    try:
        assert double.request("/version") == (200, b'{"version": "0.26.0"}')
        assert "vLLM server version 0.26.0, serving model" in double.output
    finally:
        assert double.terminate() < 1.0


def test_memory_hog_grows_the_engines_memory_while_serving(tmp_path):
    double = start(tmp_path, VLLM_DOUBLE_FAULT="memory_hog", VLLM_DOUBLE_HOG_MIB="256")
    double.wait_for("Application startup complete.")
    try:
        pid = engine_pid(double)
        time.sleep(1.0)
        with open(f"/proc/{pid}/status") as status:
            rss_kib = int(next(l for l in status if l.startswith("VmRSS:")).split()[1])
        assert rss_kib >= 200 * 1024, rss_kib  # 256 MiB touched (4 x 64), besides the interpreter
        assert timed_request(double.port, "/health") == 200
    finally:
        double.terminate()


def test_a_request_in_flight_counts_as_running_in_metrics(tmp_path):
    """VLLM_DOUBLE_REQUEST_SECONDS keeps each completion in flight; /metrics counts it as vLLM does."""
    double = start(tmp_path, VLLM_DOUBLE_REQUEST_SECONDS="1.5")  # no --api-key: the default key=KEY is ignored
    try:
        double.wait_for("Application startup complete.")
        answers = []
        t = threading.Thread(target=lambda: answers.append(double.request("/v1/completions", body={"prompt": "x", "max_tokens": 1})))
        t.start()
        time.sleep(0.5)
        _, text = double.request("/metrics", key=None)
        assert re.search(rb'vllm:num_requests_running\{[^}]*\} 1\.0', text), text
        t.join(timeout=10)
        assert answers and answers[0][0] == 200
        _, text = double.request("/metrics", key=None)
        assert re.search(rb'vllm:num_requests_running\{[^}]*\} 0\.0', text), text
    finally:
        double.terminate()
