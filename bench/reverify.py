"""A full re-verify of the weights (vllm_weights_reverify = True): hashed in parallel, against reading alone.

Issue 15 asks that a full re-verify hash files in parallel, up to the disk's speed. This writes N shards of
random bytes, then times, alternating R rounds, each over the same files:

  read:      `cat` of every file to /dev/null: what reading alone costs (the ceiling)
  serial:    the fetch program's verify_file over the files one after another (1 worker)
  parallel:  the same through a pool of W workers, as the fetch program's `_verify` does (vllm_weights_workers)
  hashlib:   bare hashlib.sha256 over the same files in the same pool (the machine's own hashing ceiling)

and prints the medians and the ratios parallel/read, parallel/hashlib and serial/parallel. The files stay in the page cache after
the first round, so "read" here is memory speed, a stricter ceiling than a disk; sha256 releases the GIL, so the
pool scales with the cores until it meets that ceiling.

    python bench/reverify.py [-n 3] [--shards 8] [--mib 128] [--workers 8]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from vllm_fleet.weights import hostprog as fw  # noqa: E402


def make(dest: Path, shards: int, mib: int) -> list:
    files = []
    for i in range(shards):
        path = dest / f"model-{i:05d}.safetensors"
        h = hashlib.sha256()
        with open(path, "wb") as out:
            for _ in range(mib):
                block = os.urandom(1 << 20)
                h.update(block)
                out.write(block)
        files.append(fw.RemoteFile(path.name, mib << 20, sha256=h.hexdigest()))
    return files


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=3, help="rounds of each series (default 3)")
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--mib", type=int, default=128, help="MiB per shard (default 128)")
    ap.add_argument("--workers", type=int, default=8, help="the pool's size (vllm_weights_workers, default 8)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="reverify-", dir=os.environ.get("TMPDIR", "/var/tmp")) as tmp:
        dest = Path(tmp)
        files = make(dest, args.shards, args.mib)
        paths = [str(dest / f.name) for f in files]

        def read() -> None:
            subprocess.run(["cat", *paths], stdout=subprocess.DEVNULL, check=True)

        def serial() -> None:
            assert all(fw.verify_file(p, f) is None for p, f in zip(paths, files))

        def parallel() -> None:
            with ThreadPoolExecutor(max_workers=args.workers) as pool:
                assert all(r is None for r in pool.map(fw.verify_file, paths, files))

        def bare(path: str) -> str:
            h = hashlib.sha256()
            with open(path, "rb") as fh:
                while chunk := fh.read(8 << 20):
                    h.update(chunk)
            return h.hexdigest()

        def hashlib_pool() -> None:
            with ThreadPoolExecutor(max_workers=args.workers) as pool:
                assert list(pool.map(bare, paths)) == [f.sha256 for f in files]

        series = {"read": read, "serial": serial, "parallel": parallel, "hashlib": hashlib_pool}
        times: dict[str, list] = {k: [] for k in series}
        read()  # into the page cache: every series reads the same cached bytes
        for _ in range(args.n):
            for name, fn in series.items():
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    total = args.shards * args.mib / 1024
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.shards} shards of {args.mib} MiB ({total:.2f} GiB), {args.n} alternating rounds, {os.cpu_count()} CPUs, "
          f"pool of {args.workers}")
    for name, m in med.items():
        print(f"{name:9s} median {m:6.2f} s  {total / m:6.2f} GiB/s  (runs: {', '.join(f'{t:.2f}' for t in times[name])})")
    print(f"parallel / read: {med['parallel'] / med['read']:.2f}x the time of reading alone")
    print(f"parallel / hashlib: {med['parallel'] / med['hashlib']:.2f}x (the program against bare hashlib in the same pool)")
    print(f"serial / parallel: {med['serial'] / med['parallel']:.2f}x (what the pool buys)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
