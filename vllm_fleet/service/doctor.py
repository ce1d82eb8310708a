"""Read a vLLM log (or a journal excerpt) and name each failure, its cause and its remedy.

Pure and fast: text in, diagnoses out; no host, no file, no subprocess. The
deploy's health gate calls `diagnose` on the journal of a failed start; the
`vllm-fleet doctor` command calls `examine` on a file.

Every pattern matches a message text of vLLM 0.25.0 (or of torch, transformers
or Python it surfaces), read from their source; where the seed log's older vLLM
worded it differently, both wordings match. Lines may carry journald prefixes
(``Nov 28 10:00:00 host vllm[1234]: ``), vLLM's process prefix
(``(EngineCore_DP0 pid=123) ``), vLLM's level/time/file prefix
(``ERROR 11-28 10:00:00 [core.py:700] ``) and ANSI colours; all are stripped
before matching.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from vllm_fleet.planner import options as serve_options
from vllm_fleet.preflight.parse import GpuProcess, Listener
from vllm_fleet.versions import VLLM_VERSION

Severity = Literal["error", "warning"]
Status = Literal["failed", "healthy", "unknown"]

# Exit codes of `vllm-fleet doctor` (2 is the CLI's own error: unreadable input).
EXIT_HEALTHY = 0
EXIT_UNKNOWN = 1
EXIT_DIAGNOSED = 3

VLLM_DEFAULT_PORT = 8000  # `vllm serve` listens here when no --port is given
_EVIDENCE_CHARS = 400  # the architecture list of vLLM's message runs to many KiB

# Architectures whose support was checked in vLLM's own model registry.
_VERIFIED_ARCHITECTURES = {
    "MiniMaxM2ForCausalLM": (
        f"vLLM {VLLM_VERSION}'s model registry lists MiniMaxM2ForCausalLM (checked in its "
        "source); vLLM 0.11.0 does not (MiniMax-AI/MiniMax-M2 issue 40). The first release "
        "with it is believed to be 0.11.1 (not verified)."
    ),
}

# The seed's older vLLM named the model, not the architecture.
_VERIFIED_ARCHITECTURES["MiniMax-M2"] = _VERIFIED_ARCHITECTURES["MiniMaxM2ForCausalLM"]

# Top-level modules whose pip package has another name.
_PIP_NAMES = {"flashinfer": "flashinfer-python", "cv2": "opencv-python-headless", "yaml": "pyyaml"}


@dataclass(frozen=True)
class Diagnosis:
    """One failure (or warning) found in a log.

    ``evidence`` is the matched line as it appears in the log (ANSI colours
    removed, cut at 400 characters) and ``line`` its 1-based number;
    ``settings`` maps each toolkit setting (a key of group_data/all.py) to the
    value the remedy suggests.
    """

    code: str
    severity: Severity
    summary: str
    evidence: str
    remedy: str
    settings: dict[str, object] = field(default_factory=dict)
    line: int = 0

    def to_json(self) -> dict[str, object]:
        """A JSON-ready dict of every field."""
        return {
            "code": self.code,
            "severity": self.severity,
            "summary": self.summary,
            "evidence": self.evidence,
            "line": self.line,
            "remedy": self.remedy,
            "settings": dict(self.settings),
        }


@dataclass(frozen=True)
class Report:
    """The verdict on one log: its status, the diagnoses, and its last error lines."""

    status: Status
    diagnoses: list[Diagnosis]
    error_lines: list[str]

    @property
    def exit_code(self) -> int:
        """0 healthy start, 3 failure diagnosed, 1 nothing known found."""
        return {"healthy": EXIT_HEALTHY, "failed": EXIT_DIAGNOSED}.get(self.status, EXIT_UNKNOWN)

    def to_json(self) -> dict[str, object]:
        """A JSON-ready dict of the report."""
        return {
            "status": self.status,
            "exit_code": self.exit_code,
            "diagnoses": [d.to_json() for d in self.diagnoses],
            "error_lines": list(self.error_lines),
        }


@dataclass(frozen=True)
class _Line:
    """A log line: its number, its text as logged, and its message without prefixes."""

    number: int
    raw: str
    message: str


@dataclass(frozen=True)
class _Context:
    """What the whole run tells every rule: vLLM's args and the host facts given."""

    lines: list[_Line]
    args: str
    version: str | None
    gpu_processes: Sequence[GpuProcess]
    port_owner: Listener | None
    all_lines: list[_Line] = field(default_factory=list)  # the whole excerpt (lines: the last start only)

    def arg(self, name: str) -> str | None:
        """A value from vLLM's ``non-default args: {...}`` line, as written there."""
        found = re.search(rf"'{name}': ('[^']*'|[^,}}]+)", self.args)
        return found.group(1).strip("'") if found else None


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_JOURNAL = re.compile(
    r"^(?:[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d|\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\S*)"
    r" \S+ [^\s:\[]+(?:\[\d+\])?: "
)
_PROCESS = re.compile(r"^\([\w.:-]+ pid=\d+\) ")
_LEVEL = re.compile(
    r"^(?:DEBUG|INFO|WARNING|ERROR|CRITICAL) \d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)? \[[^\]]*\] ?"
)
_RUN_START = re.compile(r"non-default args: \{")
_VERSION = re.compile(r"vLLM (?:API )?server version (\d[\w.+-]*?),?(?:\s|$)|█\s+version\s+(\d\S*)")
_HEALTHY = re.compile(r"Application startup complete|Starting vLLM server on ")
_ERRORISH = re.compile(
    r"^(?:ERROR|CRITICAL) |Traceback \(most recent call last\)|^\w+(?:\.\w+)*(?:Error|Exception)\b"
    r"|Value error, |status=\d+/FAILURE"
)
_SMI_ROW = re.compile(r"^\|\s+(\d+)\s+\S+\s+\S+\s+(\d+)\s+[CG+]+\s+(\S.*?)\s+(\d+)MiB\s+\|$")


def _strip(raw: str) -> str:
    """The message of a log line without journald, process and level prefixes."""
    text = _JOURNAL.sub("", raw, count=1)
    while True:
        shorter = _LEVEL.sub("", _PROCESS.sub("", text, count=1), count=1)
        if shorter == text:
            return text.strip()
        text = shorter


def _lines(text: str) -> list[_Line]:
    """Number and clean every line (vLLM ends continuation lines with \\r\\n)."""
    out = []
    for number, raw in enumerate(text.splitlines(), start=1):
        clean = _ANSI.sub("", raw).rstrip()
        out.append(_Line(number, clean, _strip(clean)))
    return out


def _last_run(lines: list[_Line]) -> list[_Line]:
    """The lines of the last vLLM start (from its ``non-default args`` line on)."""
    starts = [i for i, line in enumerate(lines) if _RUN_START.search(line.message)]
    if not starts:
        return lines
    first = starts[-1]
    # The version banner is logged just before the args line: keep it with the run.
    for i in range(first, max(first - 8, -1), -1):
        if _VERSION.search(lines[i].message):
            return lines[i:]
    return lines[first:]


def _evidence(line: _Line) -> str:
    """The line as logged, cut short."""
    raw = line.raw.strip()
    return raw if len(raw) <= _EVIDENCE_CHARS else raw[: _EVIDENCE_CHARS - 3] + "..."


def _smi_processes(lines: list[_Line]) -> list[GpuProcess]:
    """Processes from nvidia-smi table rows pasted into the log, if any."""
    found = []
    for line in lines:
        row = _SMI_ROW.match(line.message)
        if row:
            gpu, pid, name, mib = row.groups()
            found.append(GpuProcess(int(gpu), "", int(pid), name, int(mib)))
    return found


def _describe(process: GpuProcess) -> str:
    """``pid 4242 (python, 41000 MiB on GPU 1)``."""
    where = f" on GPU {process.gpu_index}" if process.gpu_index is not None else ""
    mib = f", {process.used_memory_mib} MiB" if process.used_memory_mib is not None else ""
    return f"pid {process.pid} ({process.name}{mib}{where})"


# -- the rules: each turns every match of its pattern into one diagnosis --

_Build = Callable[[list[tuple[_Line, re.Match[str]]], _Context], Diagnosis]


def _kv_cache(hits: list[tuple[_Line, re.Match[str]]], ctx: _Context) -> Diagnosis:
    line, m = hits[0]
    max_len = int(m["max_len"])
    needed, available = float(m["needed"]), float(m["available"])
    estimates = [int(h["estimate"]) for _, h in hits if h["estimate"]]
    fits: int | str = min(estimates) if estimates else "auto"
    remedy = (
        f'set vllm_max_model_len = {fits} (the length vLLM estimates fits; "auto" lets the '
        f"planner pick the largest that fits), or give the KV cache {needed - available:.2f} GiB "
        "more per GPU: raise vllm_gpu_memory_utilization, free other GPU memory, or set "
        'vllm_kv_cache_dtype = "fp8" (halves KV memory; vLLM 0.25 supports FP8 KV only on '
        "compute capability 8.9+ - not on A100/A800)."
    )
    return Diagnosis(
        "kv_cache_too_small",
        "error",
        f"The KV cache cannot hold one request of the max model length {max_len}: "
        f"{needed:.2f} GiB needed, {available:.2f} GiB available per GPU"
        + (f"; about {fits} tokens fit." if estimates else "."),
        _evidence(line),
        remedy,
        {"vllm_max_model_len": fits},
        line.number,
    )


def _no_kv_memory(hits: list[tuple[_Line, re.Match[str]]], ctx: _Context) -> Diagnosis:
    line, _ = hits[0]
    return Diagnosis(
        "no_kv_cache_memory",
        "error",
        "Weights, activations and other memory left nothing for the KV cache.",
        _evidence(line),
        "raise vllm_gpu_memory_utilization, free the GPUs of other processes, or spread the "
        "model over more GPUs (vllm_gpus / vllm_tensor_parallel_size).",
        {},
        line.number,
    )


def _free_memory(hits: list[tuple[_Line, re.Match[str]]], ctx: _Context) -> Diagnosis:
    line, m = hits[0]
    fits = min(math.floor(float(h["free"]) / float(h["total"]) * 100) / 100 for _, h in hits)
    devices = sorted({h["device"] for _, h in hits if h["device"]})
    worst = min(hits, key=lambda hit: float(hit[1]["free"]))[1]
    holders = list(ctx.gpu_processes) or _smi_processes(ctx.lines)
    who = (
        "Held by: " + ", ".join(_describe(p) for p in holders) + "."
        if holders
        else "Who holds it is not in the log: run `nvidia-smi` on the host (preflight lists the holders)."
    )
    return Diagnosis(
        "free_memory_below_utilization",
        "error",
        f"Other processes hold GPU memory: only {worst['free']}/{worst['total']} GiB free"
        + (f" on {', '.join(devices)}" if devices else "")
        + f", vLLM wants {m['util']} x total = {m['wanted']} GiB. {who}",
        _evidence(line),
        f"set vllm_gpu_memory_utilization = {fits:.2f} (the fraction that is free; the KV cache "
        "shrinks, so vllm_max_model_len \"auto\" may pick a shorter length), or stop the "
        "processes holding the GPUs, or choose free GPUs with vllm_gpus.",
        {"vllm_gpu_memory_utilization": fits},
        line.number,
    )


def _address_in_use(hits: list[tuple[_Line, re.Match[str]]], ctx: _Context) -> Diagnosis:
    line, m = hits[0]
    port_text = m["port"] or ctx.arg("port")
    port = int(port_text) if port_text else VLLM_DEFAULT_PORT
    source = "" if port_text else " (vLLM's default: no port in the log)"
    owner = ctx.port_owner
    who = (
        f" It is held by pid {owner.pid} ({owner.process})."
        if owner and owner.pid is not None
        else " Find the owner with `ss -tlnp 'sport = :%d'`." % port
    )
    return Diagnosis(
        "address_in_use",
        "error",
        f"Port {port}{source} is already in use; vLLM could not listen.{who}",
        _evidence(line),
        f"set vllm_port to a free port (e.g. {port + 1}; preflight checks it), or stop the "
        f"process that owns port {port}.",
        {"vllm_port": port + 1},
        line.number,
    )


_HF_CACHE_ROOT = re.compile(r"^(?P<root>.*/models--(?P<org>[^/]+?)--(?P<name>[^/]+))/?$")


def _invalid_model(hits: list[tuple[_Line, re.Match[str]]], ctx: _Context) -> Diagnosis:
    line, m = hits[0]
    path = m["path"]
    cache = _HF_CACHE_ROOT.match(path)
    if cache:
        snapshot = f"{cache['root']}/snapshots/<commit>"
        summary = (
            f"'{path}' is a Hugging Face cache root, not a model directory: config.json lives in "
            f"{snapshot} (repo {cache['org']}/{cache['name']})."
        )
        remedy = (
            f"set vllm_model to the snapshot directory {snapshot} (the one holding config.json), "
            "or to the model profile name: the toolkit's weights role resolves the snapshot."
        )
        settings: dict[str, object] = {"vllm_model": snapshot}
    elif "/snapshots/" in path:
        summary = f"'{path}' has no config.json: the download is incomplete."
        remedy = "run the deploy again so the weights role resumes and verifies the download."
        settings = {}
    else:
        summary = f"'{path}' is neither a Hugging Face repo id nor a directory holding config.json."
        remedy = "set vllm_model to a model profile name, a repo id, or the directory that holds config.json."
        settings = {}
    return Diagnosis("invalid_model_path", "error", summary, _evidence(line), remedy, settings, line.number)


def _remote_code(hits: list[tuple[_Line, re.Match[str]]], ctx: _Context) -> Diagnosis:
    line, _ = hits[0]
    return Diagnosis(
        "trust_remote_code_missing",
        "error",
        "The model ships custom code and vLLM ran without --trust-remote-code.",
        _evidence(line),
        "use the model profile (vllm_model = \"minimax-m2\" or the profile of this model): profiles "
        "with `trust_remote_code: true` render --trust-remote-code. A bare directory in "
        "vllm_model gets no profile flags; add a profile for it.",
        {},
        line.number,
    )


def _illegal_access(hits: list[tuple[_Line, re.Match[str]]], ctx: _Context) -> Diagnosis:
    line, _ = hits[0]
    already = "PIECEWISE" in ctx.args
    return Diagnosis(
        "cuda_illegal_memory_access",
        "error",
        "A CUDA kernel made an illegal memory access (seen with MiniMax-M2 during CUDA-graph replay).",
        _evidence(line),
        (
            "PIECEWISE is already on: run once with vllm_enforce_eager = True (--enforce-eager) to rule "
            "out CUDA graphs, then report to vLLM with the traceback."
            if already
            else "set vllm_cudagraph_piecewise = True (renders --compilation-config "
            "'{\"cudagraph_mode\": \"PIECEWISE\"}')."
        ),
        {} if already else {"vllm_cudagraph_piecewise": True},
        line.number,
    )


def _unsupported_arch(hits: list[tuple[_Line, re.Match[str]]], ctx: _Context) -> Diagnosis:
    line, m = hits[0]
    arch = (m["archs"] or m["model"] or "").strip()
    names = re.findall(r"'([^']+)'", arch) or [arch]
    known = [_VERIFIED_ARCHITECTURES[n] for n in names if n in _VERIFIED_ARCHITECTURES]
    ran = f" (the log shows vLLM {ctx.version})" if ctx.version else ""
    if known:
        remedy = f'set vllm_version = "{VLLM_VERSION}" (the toolkit\'s pin). ' + " ".join(known)
        settings: dict[str, object] = {"vllm_version": VLLM_VERSION}
    else:
        remedy = (
            f"set vllm_version to a vLLM release whose model registry lists {', '.join(names)}; "
            f"the doctor has not verified which (the pin is {VLLM_VERSION}; vllm_channel "
            "\"nightly\" carries the newest models)."
        )
        settings = {}
    return Diagnosis(
        "unsupported_architecture",
        "error",
        f"This vLLM{ran} does not know the model architecture {', '.join(names)}: it is too old.",
        _evidence(line),
        remedy,
        settings,
        line.number,
    )


def _cuda_oom(hits: list[tuple[_Line, re.Match[str]]], ctx: _Context) -> Diagnosis:
    line, m = hits[0]
    # not in vLLM's non-default args: vLLM's default, which is the options row's
    util = float(ctx.arg("gpu_memory_utilization") or serve_options.row("gpu_memory_utilization").default)
    lower = round(util - 0.05, 2)
    where = f" on GPU {m['gpu']} ({m['free']} free of {m['total']})" if m["gpu"] else ""
    return Diagnosis(
        "cuda_out_of_memory",
        "error",
        f"CUDA ran out of memory allocating {m['size']}{where}.",
        _evidence(line),
        f"lower vllm_gpu_memory_utilization (e.g. {util} -> {lower}), lower vllm_max_model_len, or "
        "cap the batch with vllm_max_num_seqs = 64 (--max-num-seqs); check no other process "
        "took the GPU after start-up.",
        {"vllm_gpu_memory_utilization": lower},
        line.number,
    )


def _engine_core(hits: list[tuple[_Line, re.Match[str]]], ctx: _Context) -> Diagnosis:
    """The bare engine-core diagnosis; `examine` adds the root cause found above its line."""
    line, m = hits[0]
    return Diagnosis(
        "engine_core_init_failed",
        "error",
        f"The engine core process died while starting (failed procs: {m['procs']}).",
        _evidence(line),
        "",
        {},
        line.number,
    )


def _fp8_marlin(hits: list[tuple[_Line, re.Match[str]]], ctx: _Context) -> Diagnosis:
    line, _ = hits[0]
    return Diagnosis(
        "fp8_weight_only_marlin",
        "warning",
        "These GPUs have no native FP8 (compute capability < 8.9, e.g. A100/A800): vLLM runs the "
        "FP8 weights through the Marlin weight-only kernel. It works; prefill-heavy loads are slower.",
        _evidence(line),
        "nothing to change to keep serving; for full FP8 speed use GPUs with compute capability 8.9+.",
        {},
        line.number,
    )


def _fp8_kv_unsupported(hits: list[tuple[_Line, re.Match[str]]], ctx: _Context) -> Diagnosis:
    line, m = hits[0]
    return Diagnosis(
        "fp8_kv_cache_unsupported",
        "error",
        f"FP8 KV cache needs compute capability 8.9+; this GPU is {m['cc']}.",
        _evidence(line),
        'set vllm_kv_cache_dtype = "auto" and shorten vllm_max_model_len instead.',
        {"vllm_kv_cache_dtype": "auto"},
        line.number,
    )


def _missing_module(hits: list[tuple[_Line, re.Match[str]]], ctx: _Context) -> Diagnosis:
    line, m = hits[0]
    module = m["module"]
    top = module.split(".")[0]
    if top == "flashinfer":
        remedy = (
            "set vllm_flashinfer_sampler = False (VLLM_USE_FLASHINFER_SAMPLER=0: vLLM 0.25 then samples "
            "without FlashInfer), or install flashinfer-python into the service venv."
        )
        settings: dict[str, object] = {"vllm_flashinfer_sampler": False}
    elif module.startswith("vllm."):
        remedy = (
            f"the vLLM install is broken or built for another platform ({module} is part of its "
            "wheel): reinstall it (vllm_version) with the torch it pins (vllm_torch_backend auto)."
        )
        settings = {}
    else:
        package = _PIP_NAMES.get(top, top)
        remedy = (
            f"install {package} into the service venv (pip install {package}); the toolkit has no "
            "setting for extra packages."
        )
        settings = {}
    return Diagnosis(
        "missing_module",
        "error",
        f"Python module '{module}' is not installed in the service venv.",
        _evidence(line),
        remedy,
        settings,
        line.number,
    )


def _abi_mismatch(hits: list[tuple[_Line, re.Match[str]]], ctx: _Context) -> Diagnosis:
    line, m = hits[0]
    return Diagnosis(
        "binary_mismatch",
        "error",
        f"{m['lib']} was built against another torch/CUDA (undefined symbol).",
        _evidence(line),
        "install the torch version this vLLM pins: keep vllm_torch_backend = \"auto\" and let the "
        "toolkit build a fresh venv for vllm_version (never upgrade torch alone).",
        {"vllm_torch_backend": "auto"},
        line.number,
    )


@dataclass(frozen=True)
class _Rule:
    pattern: re.Pattern[str]
    build: _Build
    journal: bool = False  # matched over the whole excerpt (systemd's and the toolkit's lines), not the last start


# ---------------------------------------------------------------- configuration errors vLLM 0.25 raises at startup --


def _simple(code: str, summary: str, remedy: str, settings: dict[str, object]) -> _Build:
    """A builder for a message whose remedy needs no numbers from it."""
    def build(hits: list[tuple[_Line, re.Match[str]]], ctx: _Context) -> Diagnosis:
        line, _ = hits[0]
        return Diagnosis(code, "error", summary, _evidence(line), remedy, dict(settings), line.number)
    return build


def _max_len_above_model(hits: list[tuple[_Line, re.Match[str]]], ctx: _Context) -> Diagnosis:
    line, m = hits[0]
    derived = int(m["derived"])
    return Diagnosis(
        "max_model_len_above_model", "error",
        f"vllm_max_model_len ({m['wanted']}) is longer than the model's own limit ({m['key']}={derived} in its "
        "config.json): vLLM refuses to start.",
        _evidence(line),
        f'set vllm_max_model_len = {derived} or "auto" (the planner then picks the longest that fits); '
        "VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 in vllm_extra_env forces it, at the risk of NaNs (RoPE) or out-of-bounds "
        "errors vLLM warns about.",
        {"vllm_max_model_len": derived}, line.number)


def _heads_not_divisible(hits: list[tuple[_Line, re.Match[str]]], ctx: _Context) -> Diagnosis:
    line, m = hits[0]
    heads, tp = int(m["heads"]), int(m["tp"])
    fits = max(d for d in range(1, tp + 1) if heads % d == 0)
    return Diagnosis(
        "tensor_parallel_heads", "error",
        f"Tensor parallel size {tp} does not divide the model's {heads} attention heads.",
        _evidence(line),
        f"set vllm_tensor_parallel_size = {fits} (the largest size up to {tp} that divides {heads}), or give "
        f"vllm_gpus a GPU count that divides {heads}.",
        {"vllm_tensor_parallel_size": fits}, line.number)


def _batched_below_len(hits: list[tuple[_Line, re.Match[str]]], ctx: _Context) -> Diagnosis:
    line, m = hits[0]
    return Diagnosis(
        "max_num_batched_tokens_below_max_model_len", "error",
        f"vllm_max_num_batched_tokens ({m['batched']}) is below the max model length ({m['len']}) with chunked "
        "prefill off: vLLM refuses to start.",
        _evidence(line),
        f"set vllm_max_num_batched_tokens = {m['len']} or more (or None: vLLM's default), or a shorter "
        "vllm_max_model_len.",
        {"vllm_max_num_batched_tokens": int(m["len"])}, line.number)


def _batched_below_seqs(hits: list[tuple[_Line, re.Match[str]]], ctx: _Context) -> Diagnosis:
    line, m = hits[0]
    return Diagnosis(
        "max_num_batched_tokens_below_max_num_seqs", "error",
        f"vllm_max_num_batched_tokens ({m['batched']}) is below vllm_max_num_seqs ({m['seqs']}).",
        _evidence(line),
        f"set vllm_max_num_batched_tokens = {m['seqs']} or more (or None), or vllm_max_num_seqs = {m['batched']} or "
        "fewer.",
        {"vllm_max_num_batched_tokens": int(m["seqs"])}, line.number)


def _world_size(hits: list[tuple[_Line, re.Match[str]]], ctx: _Context) -> Diagnosis:
    line, m = hits[0]
    gpus = int(m["gpus"])
    return Diagnosis(
        "more_ranks_than_gpus", "error",
        f"The layout needs {m['world']} GPUs (tensor x pipeline parallel) but vLLM sees {gpus} on this host.",
        _evidence(line),
        f"make vllm_tensor_parallel_size x vllm_pipeline_parallel_size at most {gpus}, or list more GPUs in "
        "vllm_gpus (it sets CUDA_VISIBLE_DEVICES); a layout across hosts is the cluster settings' job.",
        {"vllm_tensor_parallel_size": gpus}, line.number)


# ---------------------------------------------------------------- what the journal says about the process --


def _engine_killed(hits: list[tuple[_Line, re.Match[str]]], ctx: _Context) -> Diagnosis:
    line, m = hits[0]
    oom = any(_OOM.search(l.message) for l in ctx.all_lines if abs(l.number - line.number) < 200)
    fatal = any(_ENGINE_FATAL.search(l.message) for l in ctx.all_lines if line.number - 200 < l.number <= line.number)
    who = f"the worker process {m['worker']}" if m["worker"] else "the engine core process"
    if fatal:
        cause = "after the Python error logged above it (engine_fatal_error)"
    elif oom:
        cause = "without a Python error: the OOM killer killed it (oom_killed)"
    else:
        cause = ("without a Python error: it was killed by a signal (the kernel's OOM killer, a person's kill -9, "
                 "a GPU fault)")
    return Diagnosis(
        "engine_died", "error",
        f"vLLM's {who} died {cause}; the API server then stops (exit status 0: vLLM 0.25) and systemd restarts "
        "it (Restart=always).",
        _evidence(line),
        "see what killed it where the kernel logs: `journalctl -k -b --since <time>` (or `dmesg -T`) for "
        "'Out of memory: Killed process' (host RAM: fewer other programs, or a smaller vllm_max_num_seqs / "
        "vllm_max_model_len) or 'NVRM: Xid' (a GPU or driver fault: `nvidia-smi -q`); the service comes back "
        "by itself.",
        {}, line.number)


def _engine_fatal(hits: list[tuple[_Line, re.Match[str]]], ctx: _Context) -> Diagnosis:
    line, _ = hits[0]
    after = [l for l in ctx.all_lines if l.number > line.number and _ERRORISH.search(l.message)
             and not l.message.startswith("Traceback") and not _ENGINE_FATAL.search(l.message)]
    cause = _evidence(after[0]) if after else "(no exception line after it in this excerpt)"
    return Diagnosis(
        "engine_fatal_error", "error",
        "vLLM's engine core raised an error while serving and died; the API server then exits and systemd "
        "restarts it.",
        _evidence(line),
        f"the exception after it is the cause: {cause}",
        {}, line.number)


def _oom_killed(hits: list[tuple[_Line, re.Match[str]]], ctx: _Context) -> Diagnosis:
    line, m = hits[0]
    victim = f" (pid {m['pid']}, {m['name']})" if m["pid"] else ""
    return Diagnosis(
        "oom_killed", "error",
        f"The kernel's OOM killer killed a process of the service{victim}: the host ran out of RAM (not GPU memory).",
        _evidence(line),
        "`journalctl -k -b | grep -i -e 'out of memory' -e oom-kill` shows which process and its RSS; free host RAM "
        "(other programs), or make vLLM hold less: a smaller vllm_max_num_seqs or vllm_max_model_len; the service "
        "restarts by itself (Restart=always).",
        {}, line.number)


def _watchdog_restart(hits: list[tuple[_Line, re.Match[str]]], ctx: _Context) -> Diagnosis:
    line, m = hits[-1]
    deadline = float(m["deadline"])
    return Diagnosis(
        "watchdog_restart", "error",
        f"The engine hung: {m['misses']} completions in a row got no answer within {deadline:.0f} s while /health "
        f"kept answering 200, so the watchdog restarted {m['unit']} ({len(hits)} time(s) in this excerpt).",
        _evidence(line),
        "the lines before the restart show what the engine did last (NCCL timeouts; a stuck kernel: "
        "`journalctl -k` for 'NVRM: Xid', `nvidia-smi`); if long prompts on a full queue legitimately take longer "
        f"than {deadline:.0f} s to the first token, raise vllm_watchdog_deadline_s or vllm_watchdog_misses.",
        {"vllm_watchdog_deadline_s": int(deadline * 2)}, line.number)


def _gpu_refused(hits: list[tuple[_Line, re.Match[str]]], ctx: _Context) -> Diagnosis:
    line, m = hits[-1]
    return Diagnosis(
        "gpu_held_by_other", "error",
        f"{m['unit']} did not start: pid {m['pid']} ({m['name']}, user {m['user']}, cgroup {m['cgroup']}) holds "
        f"{m['mib']} MiB on {m['gpu']}, and it is not this service's.",
        _evidence(line),
        f"stop pid {m['pid']} (user {m['user']}), or set vllm_gpus to GPUs it does not use; systemd retries the "
        "start every RestartSec, so the service comes up by itself once the GPU is free.",
        {"vllm_gpus": None}, line.number)


def _gpu_reaped(hits: list[tuple[_Line, re.Match[str]]], ctx: _Context) -> Diagnosis:
    line, _ = hits[-1]
    return Diagnosis(
        "gpu_leftover_ended", "warning",
        f"Before starting, {len(hits)} leftover process(es) of this service still held GPU memory and were ended.",
        _evidence(line),
        "none: the reaper did its job; a leftover means an earlier run was not stopped through systemd (a manual "
        "`vllm serve` as the service user, or an escaped process).",
        {}, line.number)


def _restart_loop(hits: list[tuple[_Line, re.Match[str]]], ctx: _Context) -> Diagnosis:
    line, m = max(hits, key=lambda h: int(h[1]["count"]))
    count = int(m["count"])
    return Diagnosis(
        "restart_loop", "warning",
        f"systemd restarted the service {count} time(s) (restart counter {count}); Restart=always with no start "
        "limit keeps trying.",
        _evidence(line),
        "the cause is the failure of the last start: the other diagnoses here, or `journalctl -u <service> -n 300`; "
        "`vllm-fleet status` shows the loop while it lasts.",
        {}, line.number)


def _start_limit(hits: list[tuple[_Line, re.Match[str]]], ctx: _Context) -> Diagnosis:
    line, _ = hits[-1]
    return Diagnosis(
        "start_limit_hit", "error",
        "systemd gave up starting the service after too many failed starts (start limit): it stays down until "
        "someone acts.",
        _evidence(line),
        "fix the cause of the failed starts (the other diagnoses), then `systemctl reset-failed <service>` and "
        "redeploy: the toolkit's unit sets StartLimitIntervalSec=0 so that it never gives up; a unit with a "
        "start limit is an older deploy's or a local override's (`systemctl cat <service>`).",
        {}, line.number)


_OOM = re.compile(
    r"A process of this unit has been killed by the OOM killer\.|Failed with result 'oom-kill'\."
    r"|Out of memory: Killed process (?P<pid>\d+) \((?P<name>[^)]+)\)|oom-kill:"
)
_ENGINE_FATAL = re.compile(r"EngineCore encountered a fatal error\.")


_RULES: list[_Rule] = [
    _Rule(
        re.compile(
            r"To serve at least one request with the models?'s max seq len \((?P<max_len>\d+)\), "
            r"\((?P<needed>[\d.]+) GiB KV cache is needed, which is larger than the available KV "
            r"cache memory \((?P<available>[\d.]+) GiB\)\.(?: Based on the available memory, the "
            r"estimated maximum model length is (?P<estimate>\d+)\.)?"
        ),
        _kv_cache,
    ),
    _Rule(re.compile(r"No available memory for the cache blocks\."), _no_kv_memory),
    _Rule(
        re.compile(
            r"Free memory on device(?: (?P<device>\S+))? \((?P<free>[\d.]+)/(?P<total>[\d.]+) GiB\) "
            r"on startup is less than desired GPU memory utilization \((?P<util>[\d.]+), "
            r"(?P<wanted>[\d.]+) GiB\)"
        ),
        _free_memory,
    ),
    _Rule(
        re.compile(
            r"\[Errno 98\] (?:error while attempting to bind on address \(.*?, (?P<port>\d+)\): )?"
            r"[Aa]ddress already in use"
        ),
        _address_in_use,
    ),
    _Rule(
        re.compile(r"Invalid repository ID or local directory specified: '(?P<path>[^']*)'"),
        _invalid_model,
    ),
    _Rule(
        re.compile(
            r"contains custom code which must be executed|consider setting `trust_remote_code=True`"
        ),
        _remote_code,
    ),
    _Rule(re.compile(r"CUDA error: an illegal memory access was encountered"), _illegal_access),
    _Rule(
        re.compile(
            r"Model architectures \[(?P<archs>[^\]]*)\] are not supported for now"
            r"|(?P<model>[\w.-]+) model is not currently supported"
        ),
        _unsupported_arch,
    ),
    _Rule(
        re.compile(
            r"OutOfMemoryError: CUDA out of memory\. Tried to allocate (?P<size>[\d.]+ [KMGT]?i?B)"
            r"(?:\. GPU (?P<gpu>\d+) has a total capacity of (?P<total>[\d.]+ [KMGT]iB) of which "
            r"(?P<free>[\d.]+ [KMGT]iB) is free)?"
        ),
        _cuda_oom,
    ),
    _Rule(
        re.compile(
            r"Engine core initialization failed\. See root cause above\. "
            r"Failed core proc\(s\): (?P<procs>\{.*\})"
        ),
        _engine_core,
    ),
    _Rule(
        re.compile(
            r"Your GPU does not have native support for FP8 computation but FP8 quantization is "
            r"being used\. Weight-only FP8 compression will be used leveraging the Marlin kernel"
        ),
        _fp8_marlin,
    ),
    _Rule(
        re.compile(
            r"FP8 KV cache is not supported by the \w+ attention backend on .*?"
            r"\(compute capability (?P<cc>[\d.]+)\)"
        ),
        _fp8_kv_unsupported,
    ),
    _Rule(re.compile(r"(?:ModuleNotFoundError|ImportError): No module named '(?P<module>[\w.]+)'"), _missing_module),
    _Rule(re.compile(r"ImportError: (?P<lib>\S+\.so): undefined symbol"), _abi_mismatch),
    # Configuration errors vLLM 0.25.0 raises at startup that a setting causes (texts from its source:
    # config/model.py, config/scheduler.py, config/parallel.py, utils/torch_utils.py).
    _Rule(re.compile(r"User-specified max_model_len \((?P<wanted>\d+)\) is greater than the derived max_model_len "
                     r"\((?P<key>\w+)=(?P<derived>\d+)"), _max_len_above_model),
    _Rule(re.compile(r"Total number of attention heads \((?P<heads>\d+)\) must be divisible by tensor parallel size "
                     r"\((?P<tp>\d+)\)"), _heads_not_divisible),
    _Rule(re.compile(r"Number of experts in the model must be greater than 0 when expert parallelism is enabled"),
          _simple("expert_parallel_dense_model", "Expert parallelism is on for a model without experts (not MoE).",
                  "set vllm_enable_expert_parallel = False (or None: the model profile decides).",
                  {"vllm_enable_expert_parallel": False})),
    _Rule(re.compile(r"Pipeline parallelism is not supported for this model\."),
          _simple("pipeline_parallel_unsupported", "This model's vLLM implementation has no pipeline parallelism.",
                  "set vllm_pipeline_parallel_size = 1 and spread it with vllm_tensor_parallel_size instead.",
                  {"vllm_pipeline_parallel_size": 1})),
    _Rule(re.compile(r"max_num_batched_tokens \((?P<batched>\d+)\) is smaller than max_model_len \((?P<len>\d+)\)"),
          _batched_below_len),
    _Rule(re.compile(r"max_num_batched_tokens \((?P<batched>\d+)\) must be greater than or equal to max_num_seqs "
                     r"\((?P<seqs>\d+)\)"), _batched_below_seqs),
    _Rule(re.compile(r"World size \((?P<world>\d+)\) is larger than the number of available GPUs \((?P<gpus>\d+)\)"),
          _world_size),
    _Rule(re.compile(r"Invalid kv cache dtype: (?P<dtype>\S+)"),
          _simple("invalid_kv_cache_dtype", "vLLM does not know the KV-cache dtype it was given.",
                  'set vllm_kv_cache_dtype = "auto" (the model\'s dtype) or one vLLM 0.25 lists for --kv-cache-dtype.',
                  {"vllm_kv_cache_dtype": "auto"})),
    # The process, from vLLM's, systemd's and the toolkit's own lines (vLLM 0.25.0 v1/engine/core_client.py:703,
    # v1/executor/multiproc_executor.py:285, v1/engine/core.py:1233; systemd 252's unit and service messages;
    # vllm_fleet/service/hostprog_watchdog.py).
    _Rule(re.compile(r"\[shutdown\] MPClient: engine core exited unexpectedly; starting cleanup"
                     r"|Worker proc (?P<worker>\S+) died unexpectedly, shutting down executor\."), _engine_killed,
          journal=True),
    _Rule(_ENGINE_FATAL, _engine_fatal, journal=True),
    _Rule(_OOM, _oom_killed, journal=True),
    _Rule(re.compile(r"vllm-fleet-watchdog: restarting (?P<unit>\S+): (?P<misses>\d+) consecutive completion probes "
                     r"missed their (?P<deadline>[\d.]+) s deadline"), _watchdog_restart, journal=True),
    _Rule(re.compile(r"vllm-fleet-watchdog reap: refusing to start (?P<unit>\S+): pid (?P<pid>\d+) \((?P<name>[^,]+), "
                     r"user (?P<user>[^,]+), cgroup (?P<cgroup>[^)]*)\) holds (?P<mib>\d+) MiB on (?P<gpu>GPU \S+(?: \([^)]*\))?)"),
          _gpu_refused, journal=True),
    _Rule(re.compile(r"vllm-fleet-watchdog reap: leftover of \S+: pid \d+"), _gpu_reaped, journal=True),
    _Rule(re.compile(r"Scheduled restart job, restart counter is at (?P<count>\d+)\."), _restart_loop, journal=True),
    _Rule(re.compile(r"Start request repeated too quickly\.|Failed with result 'start-limit-hit'\."), _start_limit,
          journal=True),
]

_CONSEQUENCES = {"engine_core_init_failed"}


def _earlier(d: Diagnosis, first: int) -> Diagnosis:
    """An error from before the last start (a journal event the service recovered from) is a warning."""
    if d.severity != "error" or d.line >= first:
        return d
    return Diagnosis(d.code, "warning", f"Earlier in this journal (before the last start): {d.summary}", d.evidence,
                     d.remedy, d.settings, d.line)


def _context(lines: list[_Line], gpu_processes: Sequence[GpuProcess], port_owner: Listener | None,
             every: list[_Line] | None = None) -> _Context:
    """Collect vLLM's args line and version from the run's lines."""
    args = next((l.message for l in reversed(lines) if _RUN_START.search(l.message)), "")
    version = None
    for line in lines:
        found = _VERSION.search(line.message)
        if found:
            version = found.group(1) or found.group(2)
    return _Context(lines, args, version, gpu_processes, port_owner, every if every is not None else lines)


def _error_lines(lines: list[_Line], limit: int = 12) -> list[str]:
    """The last error-looking lines, as logged."""
    return [_evidence(l) for l in lines if _ERRORISH.search(l.message)][-limit:]


def _with_root_cause(engine: Diagnosis, causes: list[Diagnosis], above: list[_Line]) -> Diagnosis:
    """The engine-core diagnosis, pointing at the root cause found above its line."""
    before = [d for d in causes if d.line < engine.line]
    if before:
        root = before[0]
        summary = f"{engine.summary} Root cause: {root.code} (line {root.line}); this is its consequence."
        remedy = f"fix the root cause: {root.remedy}"
    else:
        tail = _error_lines(above, limit=5)
        summary = f"{engine.summary} No known root cause found above it."
        remedy = "read the error lines above it (the engine's own traceback):\n  " + "\n  ".join(
            tail or ["(none in this excerpt: widen it, e.g. journalctl -u vllm -n 500)"]
        )
    return Diagnosis(engine.code, engine.severity, summary, engine.evidence, remedy, {}, engine.line)


def examine(
    text: str,
    *,
    gpu_processes: Sequence[GpuProcess] = (),
    port_owner: Listener | None = None,
) -> Report:
    """Diagnose the last vLLM start in ``text`` and say whether it failed, came up, or is unclear.

    ``gpu_processes`` (preflight's nvidia-smi facts) and ``port_owner`` (the
    listener on vLLM's port) name who holds the GPU memory or the port.
    """
    every = _lines(text)
    lines = _last_run(every)
    ctx = _context(lines, gpu_processes, port_owner, every)
    first = lines[0].number if lines else 1
    found: list[Diagnosis] = []
    for rule in _RULES:
        hits = [(l, m) for l in (every if rule.journal else lines) if (m := rule.pattern.search(l.message))]
        if not hits:
            continue
        if rule.journal and any(l.number >= first for l, _ in hits):
            hits = [(l, m) for l, m in hits if l.number >= first] or hits
        found.append(_earlier(rule.build(hits, ctx), first))
    errors = sorted((d for d in found if d.severity == "error" and d.code not in _CONSEQUENCES), key=lambda d: d.line)
    consequences = [
        _with_root_cause(d, errors, [l for l in lines if l.number < d.line])
        for d in found
        if d.code in _CONSEQUENCES
    ]
    warnings = sorted((d for d in found if d.severity == "warning"), key=lambda d: d.line)
    diagnoses = errors + consequences + warnings
    if errors:
        status: Status = "failed"
    elif not consequences and any(_HEALTHY.search(l.message) for l in lines):
        status = "healthy"
    else:
        status = "unknown"
    return Report(status, diagnoses, _error_lines(lines))


def diagnose(
    text: str,
    *,
    gpu_processes: Sequence[GpuProcess] = (),
    port_owner: Listener | None = None,
) -> list[Diagnosis]:
    """The diagnoses of the last vLLM start in ``text``: root causes first, then consequences, then warnings."""
    return examine(text, gpu_processes=gpu_processes, port_owner=port_owner).diagnoses
