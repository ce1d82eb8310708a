#!/usr/bin/env python3
"""GPU smoke test: real vLLM serving a tiny MiniMax-M2 model, launched as vllm-fleet renders it.

One run = plan + render through the toolkit, start the rendered argv with the rendered
environment, probe the API, read vLLM's KV log lines, compare them with the plan, stop.

    VLLM_API_KEY=... python3 tests/gpu/smoke.py --model /tmp/tinym --venv /tmp/vroot \\
        --tp 1 --label tp1-cold --data-dir /srv/vf-tp1 --fresh --out $OUT

--venv is a directory whose bin/vllm starts vLLM (a service venv, or the launcher that
tests/gpu/kit.sh writes). --fresh deletes --data-dir first: a cold compile cache (the
rendered env puts VLLM_CACHE_ROOT, TRITON_CACHE_DIR, TORCHINDUCTOR_CACHE_DIR under it);
without it the cache of an earlier run with the same --data-dir is reused (warm).
Appends one JSON object per run to OUT/results.jsonl and writes OUT/LABEL.log (vLLM's output).
The API key comes from the environment only; it is never put in argv.
Nothing here needs a GPU until `run` is called: the parsing and comparison helpers are
tested on the recorded logs by tests/gpu/test_gpu_smoke.py on any machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from vllm_fleet.planner import kv  # noqa: E402
from vllm_fleet.planner.hardware import GiB, Hardware  # noqa: E402
from vllm_fleet.planner.plan import Plan, make_plan  # noqa: E402

SERVED_NAME = "minimax-m2"
REASONING_PARSER = "minimax_m2_append_think"
TOOL_ARGS = ["--enable-auto-tool-choice", "--tool-call-parser", "minimax_m2"]
# What the GPU test machine needs, passed as the settings a deploy on such a host would set
# (their defaults are vLLM's own behaviour): the lent H200 machines must keep NVLink multicast
# off in every process, and the kit (tests/gpu/kit.sh) is a hand-carried package set without
# FlashInfer, so vLLM samples in PyTorch.
MACHINE_SETTINGS: dict[str, object] = {"nvlink_multicast": False, "flashinfer_sampler": False}
MACHINE_EXTRA_ENV = {"HF_HUB_OFFLINE": "1"}  # the GPU machine has no network

# vLLM 0.25.0 log lines (gpu_worker.py, kv_cache_utils.py, gpu_model_runner.py, compilation/, api_server).
LOG_PATTERNS = {
    "available_kv_gib": re.compile(r"Available KV cache memory: ([\d.]+) GiB"),
    "kv_cache_tokens": re.compile(r"GPU KV cache size: ([\d,]+) tokens"),
    "max_concurrency": re.compile(r"Maximum concurrency for ([\d,]+) tokens per request: ([\d.]+)x"),
    "model_loading": re.compile(r"Model loading took ([\d.]+) GiB memory and ([\d.]+) seconds"),
    "torch_compile_s": re.compile(r"torch\.compile took ([\d.]+) s in total"),
    "graph_capture": re.compile(r"Graph capturing finished in ([\d.]+) secs?, took ([\d.]+) GiB"),
    "engine_init_s": re.compile(r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+) s"),
    "vllm_version": re.compile(r"Initializing a V1 LLM engine \(v([^)]+)\)"),
    "flash_attn_version": re.compile(r"Using FlashAttention version (\d+)"),
}
WARM_CACHE_LINE = "Directly load the compiled graph"


def parse_log(text: str) -> dict:
    """The figures vLLM logs about memory, KV cache and start-up (every occurrence, in order)."""
    out: dict = {}
    for key, rx in LOG_PATTERNS.items():
        found = rx.findall(text)
        if not found:
            continue
        if key == "available_kv_gib":
            out[key] = [float(x) for x in found]
        elif key == "kv_cache_tokens":
            out[key] = [int(x.replace(",", "")) for x in found]
        elif key == "max_concurrency":
            out[key] = [(int(a.replace(",", "")), float(b)) for a, b in found]
        elif key in ("model_loading", "graph_capture"):
            out[key] = [(float(a), float(b)) for a, b in found]
        elif key in ("vllm_version", "flash_attn_version"):
            out[key] = found[0]
        else:
            out[key] = [float(x) for x in found]
    out["compile_cache_hit"] = WARM_CACHE_LINE in text
    return out


def compare_kv(plan: Plan, logged: dict) -> dict:
    """Planner prediction vs vLLM's log for one GPU: available KV memory and KV cache tokens.

    vLLM prints the available memory rounded to 0.01 GiB, so the measured bytes are taken from
    the logged token count (tokens x bytes per token: one KV group, no block held back) when it
    agrees with the printed GiB, else from the GiB figure.
    """
    mem = plan.memory_per_gpu
    per_token = plan.kv_cache_bytes_per_token_per_gpu
    gib_printed = min(logged["available_kv_gib"])
    tokens = min(logged["kv_cache_tokens"])
    from_tokens = tokens * per_token
    agrees = kv.format_gib(from_tokens) == f"{gib_printed}"
    measured = from_tokens if agrees else int(gib_printed * GiB)
    predicted = mem.available_for_kv
    return {
        "requested_gib": mem.requested / GiB,
        "weights_predicted_gib": mem.weights / GiB,
        "overhead_predicted_gib": mem.overhead.total / GiB,
        "overhead_terms_predicted_gib": {
            "non_torch": mem.overhead.non_torch / GiB,
            "activations": mem.overhead.activations / GiB,
            "cuda_graphs": mem.overhead.cuda_graphs / GiB,
            "margin": mem.overhead.margin / GiB,
        },
        "available_kv_predicted_gib": predicted / GiB,
        "available_kv_logged_gib": gib_printed,
        "available_kv_measured_bytes": measured,
        "measured_from_tokens": agrees,
        "available_kv_error_gib": (predicted - measured) / GiB,
        "available_kv_error_pct": 100.0 * (predicted - measured) / measured,
        "kv_tokens_predicted": plan.kv_capacity_tokens,
        "kv_tokens_logged": tokens,
        "kv_tokens_error_pct": 100.0 * (plan.kv_capacity_tokens - tokens) / tokens,
        "kv_bytes_per_token_per_gpu": per_token,
        # everything vLLM kept back from the requested memory: weights + activations + non-torch + graphs
        "overhead_measured_gib": (mem.requested - measured) / GiB,
        "overhead_measured_less_weights_gib": (mem.requested - measured - mem.weights) / GiB,
    }


def gpu_facts() -> list[dict]:
    """nvidia-smi's view of the GPUs (what the toolkit's host facts read)."""
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=index,name,memory.total,compute_cap,driver_version", "--format=csv,noheader,nounits"],
        check=True, capture_output=True, text=True).stdout
    facts = []
    for line in out.strip().splitlines():
        index, name, mib, cc, driver = (p.strip() for p in line.split(","))
        facts.append({"index": int(index), "name": name, "memory_total_mib": int(mib), "compute_cap": cc, "driver": driver})
    return facts


def gpu_memory_used() -> list[int]:
    """MiB in use per GPU right now."""
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def render_launch(model: str, venv: str, tp: int, ep: bool | None, data_dir: str, port: int, api_key: str,
                  facts: list[dict]) -> dict:
    """Plan and render the launch through the toolkit, as vllm_fleet/preflight/step.py and the service role do."""
    gpus = list(range(tp))
    hardware = Hardware.from_facts([facts[i] for i in gpus])
    extra_env = dict(MACHINE_EXTRA_ENV)
    result: dict = {"gpus": gpus}
    try:
        from vllm_fleet.service.render import exec_argv, render, service_environment
        from vllm_fleet.settings import Settings

        settings = Settings(
            model=model, served_model_name=SERVED_NAME, gpus=gpus, tensor_parallel_size=tp,
            enable_expert_parallel=ep, gpu_memory_utilization=0.5, reasoning_parser=REASONING_PARSER,
            extra_args=TOOL_ARGS, extra_env=extra_env, port=port, api_key=api_key, data_dir=data_dir,
            **MACHINE_SETTINGS,
        )
        plan = make_plan(settings.model, hardware, settings.plan_options(model))
        rendered = render(settings, plan, venv)
        env = service_environment(settings, plan)
        env_file = parse_env_file(rendered.env)
        argv = exec_argv(plan, venv)
        shown = render(settings, plan, venv, show_secrets=False)
        result.update(rendered_by="vllm_fleet.service.render", unit=shown.unit, env_file_shown=shown.env)
    except ImportError as exc:  # render.py not there: the plan's own argv and env
        from vllm_fleet.planner.plan import PlanOptions

        plan = make_plan(model, hardware, PlanOptions(
            tensor_parallel_size=tp, enable_expert_parallel=ep, gpu_memory_utilization=0.5, port=port,
            served_model_name=SERVED_NAME, reasoning_parser=REASONING_PARSER, extra_args=tuple(TOOL_ARGS),
            **MACHINE_SETTINGS))
        env = {**plan.env, **extra_env, "VLLM_CACHE_ROOT": f"{data_dir}/cache/vllm", "HOME": data_dir}
        env_file = {"VLLM_API_KEY": api_key}
        argv = [f"{venv}/bin/vllm", *plan.argv[1:]]
        result.update(rendered_by=f"plan.argv/plan.env (render unavailable: {exc})")
    if any(api_key in word for word in argv) or "--api-key" in argv:
        raise SystemExit("the API key is in argv: the toolkit must never put it there")
    result.update(plan=plan, argv=argv, env=env, env_file_keys=sorted(env_file), env_file=env_file)
    return result


def parse_env_file(text: str) -> dict[str, str]:
    """NAME="value" lines of a systemd EnvironmentFile as render.py writes them."""
    out = {}
    for line in text.splitlines():
        m = re.match(r'^([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"$', line.strip())
        if m:
            out[m.group(1)] = re.sub(r"\\(.)", r"\1", m.group(2))
    return out


def _req(base: str, method: str, path: str, body: dict | None = None, key: str | None = None, timeout: float = 60) -> dict:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if body is not None else None
    t = time.time()
    try:
        with urllib.request.urlopen(urllib.request.Request(base + path, data=data, headers=headers, method=method),
                                    timeout=timeout) as resp:
            code, text = resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        code, text = e.code, e.read().decode()
    except Exception as e:  # connection refused while starting, timeouts
        code, text = None, repr(e)
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = text[:2000]
    return {"status": code, "secs": round(time.time() - t, 3), "body": parsed}


def probe(base: str, key: str) -> dict:
    """The API checks: health, models with/without/wrong key, chat with/without key, tools, completions."""
    chat = {"model": SERVED_NAME, "max_tokens": 16, "messages": [{"role": "user", "content": "Say hi"}]}
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Get weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    r = {
        "health": _req(base, "GET", "/health"),
        "models_with_key": _req(base, "GET", "/v1/models", key=key),
        "models_no_key": _req(base, "GET", "/v1/models"),
        "models_wrong_key": _req(base, "GET", "/v1/models", key="wrong-key"),
        "chat": _req(base, "POST", "/v1/chat/completions", chat, key=key),
        "chat_no_key": _req(base, "POST", "/v1/chat/completions", chat),
        "chat_tools_auto": _req(base, "POST", "/v1/chat/completions", {**chat, "tools": tools, "tool_choice": "auto"}, key=key),
        "completions": _req(base, "POST", "/v1/completions", {"model": SERVED_NAME, "prompt": "Hello", "max_tokens": 8}, key=key),
    }
    try:
        content = r["chat"]["body"]["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        content = None
    models = r["models_with_key"]["body"]
    r["summary"] = {
        "health": r["health"]["status"],
        "models_with_key": r["models_with_key"]["status"],
        "models_no_key": r["models_no_key"]["status"],
        "models_wrong_key": r["models_wrong_key"]["status"],
        "model_ids": [m.get("id") for m in models.get("data", [])] if isinstance(models, dict) else None,
        "chat": r["chat"]["status"],
        "chat_no_key": r["chat_no_key"]["status"],
        "chat_tools_auto": r["chat_tools_auto"]["status"],
        "completions": r["completions"]["status"],
        "chat_content_starts_with_think": isinstance(content, str) and content.startswith("<think>"),
        "chat_content": content,
    }
    return r


def stop_group(proc: subprocess.Popen, grace_s: float = 30) -> bool:
    """SIGTERM vLLM's process group (API server, engine core, workers), as systemd's KillMode=mixed
    ends with; SIGKILL what is left after grace_s. True when everything left within the grace."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.time() + grace_s
    while time.time() < deadline:
        proc.poll()
        try:
            os.killpg(proc.pid, 0)  # anyone of the group left?
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    time.sleep(2)
    return False


def run(model: str, venv: str, tp: int, ep: bool | None, label: str, data_dir: str, fresh: bool, out: Path,
        port: int = 8100, health_timeout_s: float = 420) -> dict:
    """One launch: render, start, wait for /health, probe, parse the log, compare, stop."""
    api_key = os.environ.get("VLLM_API_KEY")
    if not api_key:
        raise SystemExit("set VLLM_API_KEY in the environment (it goes to the rendered env file, never argv)")
    if fresh:
        shutil.rmtree(data_dir, ignore_errors=True)
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    facts = gpu_facts()
    launch = render_launch(model, venv, tp, ep, data_dir, port, api_key, facts)
    plan: Plan = launch["plan"]
    # The harness's own VLLM_FLEET_GPU_* variables stay out (vLLM warns about unknown VLLM_* names).
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_FLEET_GPU_")}
    env.update({**launch["env"], **launch["env_file"]})
    # The launcher stands in for the service venv: its packages live in --target dirs.
    site = os.environ.get("VLLM_FLEET_GPU_SITE")
    if site:
        env["PYTHONPATH"] = site
    log_path = out / f"{label}.log"
    res: dict = {
        "label": label, "tp": tp, "expert_parallel": plan.layout.expert_parallel, "fresh_cache": fresh,
        "data_dir": data_dir, "rendered_by": launch["rendered_by"], "argv": launch["argv"],
        "env_from_toolkit": launch["env"], "env_file_keys": launch["env_file_keys"],
        "plan_errors": [e.to_dict() for e in plan.errors], "plan_warnings": [w.code for w in plan.warnings],
        "gpus": [facts[i] for i in launch["gpus"]],
    }
    if "unit" in launch:
        res["unit"] = launch["unit"]
        res["env_file_shown"] = launch["env_file_shown"]
    print(f"[{label}] argv: {' '.join(launch['argv'])}", flush=True)
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(launch["argv"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    healthy = False
    while time.time() - t0 < health_timeout_s:
        if proc.poll() is not None:
            break
        if _req(base, "GET", "/health", timeout=5)["status"] == 200:
            healthy = True
            break
        time.sleep(0.5)
    res["healthy"] = healthy
    res["startup_s"] = round(time.time() - t0, 1)
    res["exit_code_before_healthy"] = proc.poll()
    print(f"[{label}] healthy={healthy} after {res['startup_s']} s", flush=True)
    if healthy:
        res["gpu_memory_used_mib"] = gpu_memory_used()
        res["api"] = probe(base, api_key)
        print(f"[{label}] api: {json.dumps(res['api']['summary'])}", flush=True)
    t_stop = time.time()
    res["stop_clean"] = stop_group(proc)
    res["stop_s"] = round(time.time() - t_stop, 1)
    logged = parse_log(log_path.read_text(errors="replace"))
    res["logged"] = logged
    if logged.get("available_kv_gib") and logged.get("kv_cache_tokens"):
        res["kv"] = compare_kv(plan, logged)
        k = res["kv"]
        print(f"[{label}] KV available: predicted {k['available_kv_predicted_gib']:.2f} GiB, logged "
              f"{k['available_kv_logged_gib']} GiB (error {k['available_kv_error_gib']:+.2f} GiB, "
              f"{k['available_kv_error_pct']:+.1f} %); tokens predicted {k['kv_tokens_predicted']:,} logged "
              f"{k['kv_tokens_logged']:,}", flush=True)
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps(res) + "\n")
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="the tiny model directory (make_tiny_model.py)")
    ap.add_argument("--venv", required=True, help="directory whose bin/vllm starts vLLM")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--ep", action="store_true", help="--enable-expert-parallel")
    ap.add_argument("--label", required=True)
    ap.add_argument("--data-dir", required=True, help="the service's data_dir (caches live under it)")
    ap.add_argument("--fresh", action="store_true", help="delete --data-dir first (cold compile cache)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--port", type=int, default=8100)
    ap.add_argument("--health-timeout", type=float, default=420, help="seconds to wait for /health")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res = run(a.model, a.venv, a.tp, True if a.ep else None, a.label, a.data_dir, a.fresh, out, a.port, a.health_timeout)
    ok = res["healthy"] and res.get("api", {}).get("summary", {}).get("chat") == 200 and "kv" in res
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
