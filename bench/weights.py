"""Weights download throughput: the fetch program vs curl vs `hf download` (and aria2c when installed), side by side.

    python bench/weights.py                      # 8 shards x 256 MiB, 3 rounds, 8 parallel files each
    python bench/weights.py --shards 4 --shard-mib 64 -n 1   # quick look

One local HF-compatible mirror (tests/hfmirror, unthrottled: sendfile(2)) on 127.0.0.1 serves a repo of
random shards; every tool fetches the same files into a fresh directory, 8 files at a time, in an
order that rotates per round. Per tool: wall seconds to have the files (and with a `sync` after,
so that every tool pays for putting the bytes on the disk; the fetch program fsyncs each file
itself), and CPU seconds (user + sys of the tool's processes) per GB. The mirror runs in this
process, so its CPU is not counted for anyone. Prints a table and the ratios
project/curl and project/hf (throughput: > 1 is faster than the other tool), medians over rounds.

Tools:
- project: ``vllm_fleet/weights/hostprog.py run CONFIG`` (as the fetch unit runs it, workers 8)
- curl: ``curl --parallel --parallel-max 8`` of every file's resolve URL (no verification)
- curl+sha256sum: the same, then ``sha256sum -c`` of the shards, 8 at a time (the verification the project does)
- hf: ``hf download REPO --local-dir D --max-workers 8`` (huggingface_hub's CLI; HF_HUB_DISABLE_XET=1)
- aria2c: ``aria2c -j 8 -x 1`` and ``-x 4 -s 4 -k 16M`` (4 connections per file) of the URLs, with
  ``--checksum=sha-256=...`` per file (it verifies), when aria2c is on PATH
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.hfmirror import repo as hfrepo  # noqa: E402
from tests.hfmirror.server import Mirror  # noqa: E402

PROGRAM = REPO / "vllm_fleet" / "weights" / "hostprog.py"
GB = 1e9


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _urls(mirror: Mirror) -> list[tuple[str, str]]:
    return [(name, f"{mirror.url}/{mirror.repo_id}/resolve/{mirror.commit}/{name}") for name in sorted(mirror.files)]


def tools(mirror: Mirror, workers: int, python: str) -> dict:
    """name -> function(dest dir, work dir) -> argv list + env (run by `measure`)."""
    env = {**os.environ, "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_ENDPOINT": mirror.url,
           "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    hf = shutil.which("hf", path=str(Path(python).parent)) or shutil.which("hf")

    def project(dest: Path, work: Path):
        cfg = {"identity": "bench", "dest": str(dest), "state_dir": str(work / "state"), "marker": str(work / "state" / "ok"),
               "retries": 1, "backoff_s": 0, "workers": workers, "headroom_bytes": 0,
               "sources": [{"kind": "hf", "repo": mirror.repo_id, "endpoint": mirror.url, "revision": mirror.commit}]}
        (work / "fetch.json").write_text(json.dumps(cfg))
        return [python, str(PROGRAM), "run", str(work / "fetch.json")]

    def curl(dest: Path, work: Path):
        argv = ["curl", "--silent", "--show-error", "--fail", "--parallel", "--parallel-max", str(workers), "--create-dirs"]
        for name, url in _urls(mirror):
            argv += ["-o", str(dest / name), url]
        return argv

    def curl_verified(dest: Path, work: Path):
        """curl, then sha256sum -c of the LFS files (8 at a time): the same verification the project does."""
        sums = "".join(f"{f.sha256}  {dest / f.name}\n" for f in mirror.files.values() if f.sha256)
        (work / "sums").write_text(sums)
        cmd = " ".join(curl(dest, work)) + f" && split -n l/{workers} {work}/sums {work}/part. && ls {work}/part.* | " \
              f"xargs -P {workers} -n 1 sha256sum --quiet -c"
        return ["sh", "-c", cmd]

    def hf_download(dest: Path, work: Path):
        return [hf, "download", mirror.repo_id, "--revision", mirror.commit, "--local-dir", str(dest),
                "--max-workers", str(workers)]

    def aria2(connections: int):
        def run(dest: Path, work: Path):
            lines = []
            for name, url in _urls(mirror):
                f = mirror.files[name]
                lines += [url, f"  out={name}", f"  dir={dest}"]
                if f.sha256:
                    lines.append(f"  checksum=sha-256={f.sha256}")
            (work / "aria2.txt").write_text("\n".join(lines) + "\n")
            return ["aria2c", "-q", "-i", str(work / "aria2.txt"), "-j", str(workers), "-x", str(connections),
                    "-s", str(connections), "-k", "16M", "--file-allocation=none", "--auto-file-renaming=false",
                    "--allow-overwrite=true", "--check-integrity=true"]
        return run

    out = {"project": project, "curl": curl, "curl+sha256sum": curl_verified}
    if hf:
        out["hf"] = hf_download
    if shutil.which("aria2c"):
        out["aria2c-x1"] = aria2(1)
        out["aria2c-x4"] = aria2(4)
    return out, env


def measure(name: str, make, env: dict, root: Path, total: int) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root))
    dest = work / "dest"
    dest.mkdir()
    argv = make(dest, work)
    subprocess.run(["sync"], check=True)
    cpu0, t0 = _cpu(), time.perf_counter()
    done = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t1 = time.perf_counter()
    cpu1 = _cpu()
    subprocess.run(["sync"], check=True)
    t2 = time.perf_counter()
    if done.returncode != 0:
        raise SystemExit(f"{name} failed ({done.returncode}): {done.stderr[-2000:]}")
    got = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file() and ".cache" not in p.parts)
    if got != total:
        raise SystemExit(f"{name} left {got} bytes in {dest}, not {total}")
    shutil.rmtree(work)
    return {"wall": t1 - t0, "wall_sync": t2 - t0, "cpu": cpu1 - cpu0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--shard-mib", type=int, default=256)
    ap.add_argument("-n", "--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--python", default=sys.executable, help="the python of the fetch venv (has huggingface_hub)")
    ap.add_argument("--dir", type=Path, default=Path(os.environ.get("VLLM_FLEET_CACHE", Path.home() / ".cache" / "vllm-fleet")) / "bench-weights",
                    help="where the repo and the downloads go (same disk for every tool)")
    ap.add_argument("--only", nargs="*", help="tools to run (default: all found)")
    a = ap.parse_args()
    a.dir.mkdir(parents=True, exist_ok=True)
    repo_dir = hfrepo.build(a.shards, a.shard_mib * 1024 * 1024, cache=a.dir)
    mirror = Mirror(repo_dir).start()
    try:
        found, env = tools(mirror, a.workers, a.python)
        names = [n for n in found if not a.only or n in a.only]
        total = mirror.total_bytes
        print(f"{a.shards} x {a.shard_mib} MiB + small files = {total / 2**20:.0f} MiB from {mirror.url}, "
              f"{a.workers} files at a time, {a.rounds} round(s), {os.cpu_count()} CPUs; tools: {', '.join(names)}", flush=True)
        results: dict = {n: [] for n in names}
        for r in range(a.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for n in order:
                m = measure(n, found[n], env, a.dir, total)
                results[n].append(m)
                print(f"  round {r + 1} {n:10s} {m['wall']:6.2f} s ({total / m['wall'] / 2**20:6.0f} MiB/s), with sync "
                      f"{m['wall_sync']:6.2f} s, CPU {m['cpu']:5.2f} s", flush=True)
    finally:
        mirror.stop()
    med = {n: {k: statistics.median(x[k] for x in v) for k in ("wall", "wall_sync", "cpu")} for n, v in results.items()}
    print("\n| tool | wall s (median) | MiB/s | wall s incl. sync | CPU s per GB |")
    print("|---|---|---|---|---|")
    for n, m in med.items():
        print(f"| {n} | {m['wall']:.2f} | {total / m['wall'] / 2**20:.0f} | {m['wall_sync']:.2f} | {m['cpu'] / (total / GB):.2f} |")
    p = med.get("project")
    if p:
        for other in ("curl", "curl+sha256sum", "hf", "aria2c-x1", "aria2c-x4"):
            if other in med:
                o = med[other]
                print(f"throughput project/{other}: {o['wall'] / p['wall']:.2f}x (incl. sync {o['wall_sync'] / p['wall_sync']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
