"""HTTP side of the vLLM TEST DOUBLE: /health, /version, /v1/models, chat and text completions.

Shapes follow vLLM 0.25's OpenAI server as recorded on an H200 (docs/gpu-validation.md):
401 `{"error": "Unauthorized"}` on /v1/* without the right Bearer key,
/health 200 with an empty body, chat content starting with `<think>` under
the minimax_m2_append_think reasoning parser, SSE streams ending with
`data: [DONE]`. Answers are canned text, never model output.
"""

from __future__ import annotations

import json
import re
import secrets
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator, List, Optional

from vllm.test_double.client import EngineClient, EngineDead
from vllm.test_double.logs import ProcLog

APPEND_THINK_PARSER = "minimax_m2_append_think"
_TOKEN = re.compile(r"\s*\S+")
# vLLM 0.25.0's histogram buckets (tests/fixtures/vllm-metrics/vllm-0.25.0-metrics.txt).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)


class Histogram:
    """Cumulative buckets, count and sum, as prometheus_client keeps them."""

    def __init__(self, bounds: tuple) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
        self.count += 1
        self.sum += value

    def lines(self, name: str, labels: str) -> str:
        """Sample lines; ``le`` sorts between engine and model_name, as vLLM prints it."""
        engine, model = labels.split(",", 1)
        out = [f'{name}_bucket{{{engine},le="{b}",{model}}} {float(c)}\n' for b, c in zip(self.bounds, self.counts)]
        out.append(f'{name}_bucket{{{engine},le="+Inf",{model}}} {float(self.count)}\n')
        out.append(f"{name}_count{{{labels}}} {float(self.count)}\n{name}_sum{{{labels}}} {self.sum}\n")
        return "".join(out)


@dataclass
class Metrics:
    """The double's counters and histograms (every answered completion counts; tokens come from its usage).
    The double answers a request in one piece, so time to first token is the request's time and each further
    token follows at once (an inter-token latency of 0 s)."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    created: float = field(default_factory=time.time)
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    itl: Histogram = field(default_factory=lambda: Histogram(ITL_BUCKETS))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def served(self, usage: dict, seconds: float) -> None:
        with self.lock:
            self.prompt_tokens += usage["prompt_tokens"]
            self.generation_tokens += usage["completion_tokens"]
            self.ttft.observe(seconds)
            for _ in range(max(0, usage["completion_tokens"] - 1)):
                self.itl.observe(0.0)

    def text(self, model: str, running: float, waiting: float, kv_usage: float) -> str:
        """The families the toolkit reads, in vLLM 0.25.0's exposition (names, HELP, TYPE, labels, _created)."""
        labels = f'engine="0",model_name="{model}"'
        out = []
        for metric, help_, value in (
                ("num_requests_running", "Number of requests in model execution batches.", running),
                ("num_requests_waiting", "Number of requests waiting to be processed.", waiting),
                ("kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", kv_usage)):
            out.append(f"# HELP vllm:{metric} {help_}\n# TYPE vllm:{metric} gauge\nvllm:{metric}{{{labels}}} {value}\n")
        with self.lock:
            for metric, help_, value in (
                    ("prompt_tokens", "Number of prefill tokens processed.", self.prompt_tokens),
                    ("generation_tokens", "Number of generation tokens processed.", self.generation_tokens)):
                out.append(f"# HELP vllm:{metric}_total {help_}\n# TYPE vllm:{metric}_total counter\n"
                           f"vllm:{metric}_total{{{labels}}} {float(value)}\n"
                           f"# HELP vllm:{metric}_created {help_}\n# TYPE vllm:{metric}_created gauge\n"
                           f"vllm:{metric}_created{{{labels}}} {self.created}\n")
            for metric, help_, hist in (
                    ("time_to_first_token_seconds", "Histogram of time to first token in seconds.", self.ttft),
                    ("inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", self.itl)):
                out.append(f"# HELP vllm:{metric} {help_}\n# TYPE vllm:{metric} histogram\n"
                           + hist.lines(f"vllm:{metric}", labels)
                           + f"# HELP vllm:{metric}_created {help_}\n# TYPE vllm:{metric}_created gauge\n"
                           f"vllm:{metric}_created{{{labels}}} {self.created}\n")
        return "".join(out)


@dataclass
class ServeState:
    """What the handlers need to know about the served model and the injected fault."""

    served_names: List[str]
    model_root: str
    max_model_len: int
    version: str
    api_keys: List[str] = field(default_factory=list)
    reasoning_parser: Optional[str] = None
    tool_call_parser: Optional[str] = None
    auto_tool_choice: bool = False
    unhealthy: bool = False
    engine: Optional[EngineClient] = None  # the engine process (None until it is ready)
    metrics: Metrics = field(default_factory=Metrics)


class ApiError(Exception):
    """An OpenAI-style error response."""

    def __init__(self, status: int, message: str, kind: str, param: Optional[str] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param

    def body(self) -> dict:
        """vLLM's ErrorResponse JSON."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


def _bad_request(message: str, param: Optional[str] = None) -> ApiError:
    return ApiError(400, message, "BadRequestError", param)


def _engine_dead() -> ApiError:
    message = "EngineCore encountered an issue. See stack trace (above) for the root cause."
    return ApiError(500, message, "InternalServerError")


class DoubleServer(ThreadingHTTPServer):
    """ThreadingHTTPServer that binds at once and listens only when `activate` is called (like vLLM)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, host: str, port: int, state: ServeState, log: ProcLog) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.state = state
        self.log = log
        super().__init__((host, port), Handler, bind_and_activate=False)
        try:
            self.server_bind()
        except OSError:
            self.server_close()
            raise

    def get_request(self):
        """Each connection with TCP_NODELAY, as uvicorn's (asyncio's) are: a keep-alive client (a router) would
        otherwise wait out a delayed ACK (~40 ms) between the response's header and body writes."""
        conn, addr = super().get_request()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn, addr


def _count_tokens(text: str) -> int:
    return len(_TOKEN.findall(text))


def _split_tokens(text: str) -> List[str]:
    return _TOKEN.findall(text)


def _message_text(content: object) -> str:
    """Text of an OpenAI message content (a string or a list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


class Handler(BaseHTTPRequestHandler):
    """One HTTP request to the double."""

    server: DoubleServer
    protocol_version = "HTTP/1.1"

    def version_string(self) -> str:
        """The Server header uvicorn sends."""
        return "uvicorn"

    # ------------------------------------------------------------ logging --
    def log_request(self, code: object = "-", size: object = "-") -> None:
        """uvicorn's access line: `127.0.0.1:54321 - "GET /health HTTP/1.1" 200 OK`."""
        try:
            phrase = HTTPStatus(int(code)).phrase  # type: ignore[arg-type]
        except ValueError:
            phrase = ""
        host, port = self.client_address[:2]
        self.server.log.uvicorn(f'{host}:{port} - "{self.requestline}" {code} {phrase}')

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - BaseHTTPRequestHandler's name
        """Silence http.server's own stderr lines (errors are answered, not logged)."""

    # ----------------------------------------------------------- plumbing --
    def _send(self, status: int, body: Optional[object], content_type: str = "application/json") -> None:
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        if body is not None:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorized(self) -> bool:
        keys = self.server.state.api_keys
        if not keys or not self.path.startswith("/v1"):
            return True
        given = self.headers.get("Authorization", "")
        return any(secrets.compare_digest(given.encode(), f"Bearer {k}".encode()) for k in keys)

    def _read_body(self) -> bytes:
        """The whole request body, read once: by Content-Length or chunked (a router's HTTP client sends either;
        vLLM's uvicorn reads both). Read before any answer, so a keep-alive connection's next request starts where
        it should, also after a 401."""
        if getattr(self, "_body", None) is None:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                parts = []
                while True:
                    size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                            pass
                        break
                    parts.append(self.rfile.read(size))
                    self.rfile.readline()  # the CRLF after each chunk
                self._body = b"".join(parts)
            else:
                length = int(self.headers.get("Content-Length") or 0)
                self._body = self.rfile.read(length) if length else b""
        return self._body

    def _json_body(self) -> dict:
        raw = self._read_body()
        try:
            body = json.loads(raw or b"null")
        except ValueError as exc:
            raise _bad_request(f"JSON decode error: {exc}") from exc
        if not isinstance(body, dict):
            raise _bad_request("The request body must be a JSON object.")
        return body

    def _route(self, method: str) -> None:
        path = self.path.split("?", 1)[0]
        self._began = time.monotonic()
        self._body = None
        self._read_body()
        if not self._authorized():
            self._send(401, {"error": "Unauthorized"})
            return
        routes = {
            ("GET", "/health"): self._health,
            ("GET", "/version"): self._version,
            ("GET", "/metrics"): self._metrics,
            ("GET", "/v1/models"): self._models,
            ("POST", "/v1/chat/completions"): self._chat,
            ("POST", "/v1/completions"): self._completions,
        }
        handler = routes.get((method, path))
        if handler is None:
            known = {p for _, p in routes}
            if path in known:
                self._send(405, {"detail": "Method Not Allowed"})
            else:
                self._send(404, {"detail": "Not Found"})
            return
        try:
            handler()
        except ApiError as exc:
            self._send(exc.status, exc.body())

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        """GET routes."""
        self._route("GET")

    def do_POST(self) -> None:  # noqa: N802
        """POST routes."""
        self._route("POST")

    # ------------------------------------------------------------- routes --
    def _health(self) -> None:
        engine = self.server.state.engine
        if engine is not None and engine.dead.is_set():
            self._send(503, None)  # vLLM 0.25: EngineDeadError -> 503
            return
        self._send(500 if self.server.state.unhealthy else 200, None)

    def _generate(self) -> None:
        """Have the engine process do the work: blocks while the engine is stopped, 500 once it is dead."""
        engine = self.server.state.engine
        if engine is None:
            return
        try:
            engine.generate()
        except EngineDead:
            raise _engine_dead() from None

    def _metrics(self) -> None:
        """vLLM 0.25's families that the toolkit reads, in its exposition format (names, HELP and TYPE lines,
        labels as vLLM 0.25.0 serves them; tests/unit/test_vllm_metrics_format.py checks them against the real
        capture). The API server answers them itself, so they stay 200 while the engine hangs. Running: the
        requests forwarded to the engine and not yet answered (VLLM_DOUBLE_REQUEST_SECONDS keeps each in flight);
        nothing waits and the double holds no KV cache, so waiting and KV usage are 0."""
        name = (self.server.state.served_names or [self.server.state.model_root])[0]
        engine = self.server.state.engine
        running = float(len(engine._waiting)) if engine is not None else 0.0  # requests the engine has not answered
        text = self.server.state.metrics.text(name, running, 0.0, 0.0)
        data = text.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _version(self) -> None:
        self._send(200, {"version": self.server.state.version})

    def _models(self) -> None:
        st = self.server.state
        cards = [
            {"id": name, "object": "model", "created": int(time.time()), "owned_by": "vllm", "root": st.model_root,
             "parent": None, "max_model_len": st.max_model_len, "permission": []}
            for name in st.served_names
        ]
        self._send(200, {"object": "list", "data": cards})

    def _check_model(self, body: dict) -> str:
        names = self.server.state.served_names
        model = body.get("model")
        if model is None:
            return names[0]
        if model not in names:
            raise ApiError(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
        return str(model)

    def _max_tokens(self, body: dict, prompt_tokens: int, default: Optional[int]) -> int:
        value = body.get("max_completion_tokens", body.get("max_tokens", default))
        room = self.server.state.max_model_len - prompt_tokens
        if value is None:
            return room
        if not isinstance(value, int) or value < 1:
            raise _bad_request("max_tokens must be at least 1", "max_tokens")
        if value > room:
            raise _bad_request(
                f"This model's maximum context length is {self.server.state.max_model_len} tokens. However, you "
                f"requested {value} output tokens and your prompt contains at least {prompt_tokens} input tokens, "
                f"for a total of at least {value + prompt_tokens} tokens.", "max_tokens")
        return value

    def _chat(self) -> None:
        st = self.server.state
        body = self._json_body()
        model = self._check_model(body)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise _bad_request("messages must be a non-empty list of message objects", "messages")
        tool_choice = body.get("tool_choice", "auto" if body.get("tools") else "none")
        if body.get("tools") and tool_choice == "auto" and not (st.auto_tool_choice and st.tool_call_parser):
            raise _bad_request('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set')
        if st.unhealthy:
            raise _engine_dead()
        self._generate()
        texts = [_message_text(m.get("content")) for m in messages]
        prompt_tokens = sum(_count_tokens(t) for t in texts) + 4 * len(messages)
        limit = self._max_tokens(body, prompt_tokens, None)
        question = " ".join(texts[-1].split()[:24]) or "(empty)"
        thinking = f"The user wrote: {question}. I am a test double, so I answer with canned text."
        answer = f"Hello from the vLLM test double (vllm {st.version}). You said: {question}"
        reasoning: Optional[str] = None
        if st.reasoning_parser == APPEND_THINK_PARSER:
            answer = f"<think>\n{thinking}\n</think>\n\n{answer}"
        elif st.reasoning_parser:
            reasoning = thinking
        pieces = _split_tokens(answer)
        finish = "length" if len(pieces) > limit else "stop"
        pieces = pieces[:limit]
        usage = _usage(prompt_tokens, len(pieces) + (_count_tokens(reasoning) if reasoning else 0))
        st.metrics.served(usage, time.monotonic() - self._began)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.get("stream"):
            self._stream(_chat_chunks(rid, created, model, reasoning, pieces, finish, usage, _include_usage(body)))
            return
        message = {"role": "assistant", "content": "".join(pieces), "refusal": None, "annotations": None,
                   "audio": None, "function_call": None, "tool_calls": [], "reasoning": reasoning}
        self._send(200, {
            "id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish,
                         "stop_reason": None}],
            "service_tier": None, "system_fingerprint": None, "usage": usage, "prompt_logprobs": None,
            "kv_transfer_params": None,
        })

    def _completions(self) -> None:
        st = self.server.state
        body = self._json_body()
        model = self._check_model(body)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise _bad_request("prompt must be a string or a list of strings", "prompt")
        if st.unhealthy:
            raise _engine_dead()
        self._generate()
        prompt_tokens = _count_tokens(prompt)
        limit = self._max_tokens(body, prompt_tokens, 16)  # vLLM's CompletionRequest default
        pieces = _split_tokens(" and this is the vLLM test double completing it with canned text.")
        finish = "length" if len(pieces) > limit else "stop"
        pieces = pieces[:limit]
        usage = _usage(prompt_tokens, len(pieces))
        st.metrics.served(usage, time.monotonic() - self._began)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.get("stream"):
            self._stream(_completion_chunks(rid, created, model, pieces, finish, usage, _include_usage(body)))
            return
        self._send(200, {
            "id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": "".join(pieces), "logprobs": None, "finish_reason": finish,
                         "stop_reason": None, "prompt_logprobs": None}],
            "service_tier": None, "system_fingerprint": None, "usage": usage, "kv_transfer_params": None,
        })

    def _stream(self, events: Iterator[dict]) -> None:
        """Server-sent events over chunked transfer encoding, ending with `data: [DONE]`."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for payload in [f"data: {json.dumps(e)}\n\n" for e in events] + ["data: [DONE]\n\n"]:
            data = payload.encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.write(b"0\r\n\r\n")


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "total_tokens": prompt + completion, "completion_tokens": completion,
            "prompt_tokens_details": None}


def _include_usage(body: dict) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and bool(options.get("include_usage"))


def _chat_chunks(rid: str, created: int, model: str, reasoning: Optional[str], pieces: List[str],
                 finish: str, usage: dict, include_usage: bool) -> Iterator[dict]:
    def chunk(delta: dict, finish_reason: Optional[str] = None) -> dict:
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}

    yield chunk({"role": "assistant", "content": ""})
    for piece in _split_tokens(reasoning or ""):
        yield chunk({"reasoning": piece})
    for piece in pieces:
        yield chunk({"content": piece})
    yield chunk({}, finish)
    if include_usage:
        yield {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [],
               "usage": usage}


def _completion_chunks(rid: str, created: int, model: str, pieces: List[str], finish: str, usage: dict,
                       include_usage: bool) -> Iterator[dict]:
    def chunk(text: str, finish_reason: Optional[str] = None) -> dict:
        return {"id": rid, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason,
                             "stop_reason": None}]}

    for i, piece in enumerate(pieces):
        yield chunk(piece, finish if i == len(pieces) - 1 else None)
    if not pieces:
        yield chunk("", finish)
    if include_usage:
        yield {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [],
               "usage": usage}

