#!/usr/bin/env python3
"""vllm-fleet's venv program, run ON THE HOST (stdlib only, Python 3.8+). Not imported by the toolkit's roles.

    python3 hostprog.py state BASE_DIR         # JSON: every venv's state, uv, the pushed wheelhouse (one round trip)
    python3 hostprog.py build SPEC_JSON        # build one venv atomically, verify it, rename it into place
    VENV/bin/python hostprog.py verify EXPECT  # JSON: vLLM/torch versions, CUDA, model registry (run by build)

`state` is what the `VenvState` fact runs (the source is sent inline, so it
works before this file is installed). A venv counts as complete only when its
marker file `.vllm-fleet.json` exists; build writes it last, inside a
temporary directory `.tmp-NAME` that is renamed into place, so a killed run
never leaves a half venv that looks complete. A venv is intact when every file
the installed distributions' RECORDs listed at build time is there with the size
it had then (the manifest `.vllm-fleet-files`, written before the marker; a
deleted `bin/vllm` or site-packages file makes it damaged: rebuilt).

`verify` never claims what it cannot see: with a CPU build of torch (or the
vLLM test double) the CUDA check is "skipped", with the reason.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time

MARKER = ".vllm-fleet.json"
FILES = ".vllm-fleet-files"  # the build-time manifest: "SIZE\tPATH" per file the RECORDs list (see integrity)
PYTHONS = ("3.10", "3.11", "3.12", "3.13")


# ------------------------------------------------------------------ state --

def _site_packages(venv: str) -> list[str]:
    lib = os.path.join(venv, "lib")
    try:
        return [os.path.join(lib, d, "site-packages") for d in sorted(os.listdir(lib))
                if os.path.isdir(os.path.join(lib, d, "site-packages"))]
    except OSError:
        return []


def _recorded(venv: str):
    """Yield (path relative to venv, recorded size or None, dist-info name) for every file the RECORDs list (.pyc aside).

    A first element of None for the path means a dist-info without RECORD (its name is the third element).
    """
    venv = os.path.normpath(venv)
    prefix = venv + os.sep
    for site in _site_packages(venv):
        for entry in sorted(os.listdir(site)):
            if not entry.endswith(".dist-info"):
                continue
            record = os.path.join(site, entry, "RECORD")
            if not os.path.isfile(record):
                yield None, None, entry
                continue
            with open(record, newline="", encoding="utf-8") as fh:
                for row in csv.reader(fh):
                    if not row or row[0].endswith(".pyc"):
                        continue
                    path = os.path.normpath(os.path.join(site, row[0]))
                    rel = path[len(prefix):] if path.startswith(prefix) else os.path.relpath(path, venv)
                    yield rel, (int(row[2]) if len(row) > 2 and row[2].isdigit() else None), entry


def write_files_manifest(venv: str) -> int:
    """Write FILES: each file the RECORDs list, with the size it has now (at build time); return how many.

    The manifest, not RECORD, is what `integrity` checks later: real venvs hold files that two
    distributions both install (the later one wins, the other's RECORD keeps a stale size:
    nvidia-cutlass-dsl-libs-base and -cu13, flashinfer-python and torch-c-dlpack-ext in vLLM 0.25.0's
    venv) and wheels whose RECORD gives a wrong size (pynvvideocodec 2.0.4). Files a RECORD lists that
    were not there when the build finished are left out.
    """
    sizes = {}
    for rel, _size, _entry in _recorded(venv):
        if rel is None or rel in sizes or "\n" in rel:
            continue
        try:
            sizes[rel] = os.stat(os.path.join(venv, rel)).st_size
        except OSError:
            continue
    tmp = os.path.join(venv, FILES + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.writelines(f"{size}\t{rel}\n" for rel, size in sorted(sizes.items()))
    os.replace(tmp, os.path.join(venv, FILES))
    return len(sizes)


def integrity(venv: str) -> str | None:
    """None when the venv is whole, else the first problem (a missing or resized file, no python).

    Checks the build-time manifest FILES when there is one; a venv built before it existed is checked
    against its RECORDs, a size recorded by any of the distributions that list a path counting as right.
    """
    py = os.path.join(venv, "bin", "python")
    if not os.path.exists(py):  # follows the link: a removed interpreter counts
        return "bin/python is missing or points nowhere"
    if not _site_packages(venv):
        return "no lib/pythonX.Y/site-packages"
    stat = os.stat
    try:
        fh = open(os.path.join(venv, FILES), encoding="utf-8")
    except OSError:
        fh = None
    if fh is not None:  # ~2 us a file: each path is looked up from the venv's directory fd
        fd = os.open(venv, os.O_RDONLY)
        try:
            with fh:
                count = 0
                for line in fh:
                    size, _, rel = line[:-1].partition("\t")
                    count += 1
                    try:
                        have = stat(rel, dir_fd=fd).st_size
                    except OSError:
                        return f"{rel} is missing"
                    if str(have) != size:
                        return f"{rel} has {have} bytes, {size} when the venv was built"
        finally:
            os.close(fd)
        return None if count else "no distribution is installed"
    claims: dict = {}
    for rel, size, entry in _recorded(venv):
        if rel is None:
            return f"{entry} has no RECORD"
        sizes, _first = claims.setdefault(rel, (set(), entry))
        if size is not None:
            sizes.add(size)
    if not claims:
        return "no distribution is installed"
    for rel, (sizes, entry) in claims.items():
        try:
            have = stat(os.path.join(venv, rel)).st_size
        except OSError:
            return f"{rel} (from {entry}) is missing"
        if sizes and have not in sizes:
            return f"{rel} (from {entry}) has {have} bytes, RECORD says {' or '.join(map(str, sorted(sizes)))}"
    return None


def _venv_state(venvs_dir: str, name: str) -> dict:
    path = os.path.join(venvs_dir, name)
    out: dict = {"name": name}
    if os.path.islink(path):
        out["target"] = os.path.basename(os.readlink(path))
        return out
    marker = os.path.join(path, MARKER)
    try:
        with open(marker, encoding="utf-8") as fh:
            data = json.load(fh)
        out.update(complete=True, key=data.get("key"), version=(data.get("verify") or {}).get("vllm", {}).get("version"),
                   built_at=data.get("built_at", 0.0))
    except (OSError, ValueError):
        out.update(complete=False, problem="no marker: the build never finished")
        return out
    problem = integrity(path)
    src = data.get("source_dir")
    if problem is None and src and not os.path.isdir(os.path.join(src, ".git")):
        problem = f"its source checkout {src} is missing (the venv is an editable install of it)"
    out.update(intact=problem is None, problem=problem)
    return out


def _sha256(path: str) -> str | None:
    try:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()
    except OSError:
        return None


def _wheelhouse(d: str) -> dict | None:
    """The pushed wheelhouse's manifest, keeping only entries whose file is there with the right size."""
    try:
        with open(os.path.join(d, "MANIFEST.json"), encoding="utf-8") as fh:
            manifest = json.load(fh)
    except (OSError, ValueError):
        return None
    out = {}
    for name, entry in manifest.items():
        try:
            if os.stat(os.path.join(d, name)).st_size == entry.get("size"):
                out[name] = entry
        except OSError:
            pass
    return out


def _uv_version(uv: str) -> str | None:
    try:
        proc = subprocess.run([uv, "--version"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.match(rb"uv (\S+)", proc.stdout)
    return m.group(1).decode() if proc.returncode == 0 and m else None


def units_venvs(units, venvs_dir: str) -> list:
    """The venvs (names under ``venvs_dir``) whose ``bin/`` the ExecStart= lines of the unit files ``units`` run:
    the live unit's and the gate's last known good (``*.service.prev``), which pruning must never remove."""
    pattern = re.compile(re.escape(venvs_dir.rstrip("/")) + r"/([^/\s\"']+)/bin/")
    out = []
    for unit in units:
        try:
            with open(unit, encoding="utf-8", errors="replace") as fh:
                lines = fh.read().splitlines()
        except OSError:
            continue
        for line in lines:
            if line.lstrip().startswith("ExecStart="):
                out += [m.group(1) for m in pattern.finditer(line) if m.group(1) not in out]
    return out


def state(paths) -> dict:
    """Everything the role needs to plan the Python stack, read at once.

    + paths: {"venvs_dir", "uv", "program", "wheelhouse_dir", "units"} (HostLayout.venv_state_paths, sent as JSON
      by the fact; "units": the live unit and its last known good copy); a plain base_dir string means the
      default layout below it.
    """
    if isinstance(paths, str):
        paths = {"venvs_dir": os.path.join(paths, "venvs"), "uv": os.path.join(paths, "uv", "bin", "uv"),
                 "program": os.path.join(paths, "bin", "vllm-fleet-venv"),
                 "wheelhouse_dir": os.path.join(paths, "wheelhouse")}
    venvs_dir = paths["venvs_dir"]
    try:
        names = sorted(os.listdir(venvs_dir))
    except OSError:
        names = []
    return {
        "venvs": [_venv_state(venvs_dir, n) for n in names if n.startswith("vllm-")],
        "in_use": units_venvs(paths.get("units", []), venvs_dir),
        "partial": [n for n in names if n.startswith((".tmp-", ".old-"))],
        "uv": _uv_version(paths["uv"]),
        "program_sha256": _sha256(paths["program"]),
        "wheelhouse": _wheelhouse(paths["wheelhouse_dir"]),
        "pythons": {v: shutil.which(f"python{v}") for v in PYTHONS if shutil.which(f"python{v}")},
        "git": shutil.which("git"),
    }


# ----------------------------------------------------------------- verify --

def _vtuple(version: str) -> tuple:
    """The release numbers of a version: "0.26.1rc1.dev5+gabc" -> (0, 26, 1)."""
    m = re.match(r"\d+(?:\.\d+)*", version)
    return tuple(int(x) for x in m.group(0).split(".")) if m else ()


def _torch_backend_of(version: str, cuda: str | None) -> str:
    local = version.partition("+")[2]
    if local:
        return local
    if cuda is None:
        return "cpu"
    major, _, minor = cuda.partition(".")
    return f"cu{major}{minor[:1]}"


def check(expect: dict, found: dict) -> list[str]:
    """The problems in what `verify` found, against what the build asked for (pure; unit-tested)."""
    problems = []
    vllm_version = found.get("vllm", {}).get("version")
    want = expect.get("version")
    channel = expect.get("channel", "release")
    if vllm_version is None:
        problems.append(f"vLLM does not import: {found.get('vllm', {}).get('error')}")
    elif channel == "release" and vllm_version != want:
        problems.append(f"vLLM {vllm_version} is installed, vllm_version is {want}; remedy: check the index/wheelhouse holds vllm=={want}")
    elif channel == "nightly" and _vtuple(vllm_version) < _vtuple(want):
        problems.append(f"the nightly index resolved vLLM {vllm_version}, older than vllm_version {want}; remedy: lower vllm_version or wait for a newer nightly")
    src = expect.get("source_dir")
    where = found.get("vllm", {}).get("path") or "the venv's site-packages"
    if vllm_version is not None and channel == "source" and src and not where.startswith(src.rstrip("/") + "/"):
        problems.append(f"vLLM is imported from {where}, not from the checkout {src} (the source channel installs it editable); "
                        "remedy: check that the checkout is a vLLM source tree and that nothing else on sys.path provides vllm")
    torch = found.get("torch", {})
    if torch.get("version") is None:
        problems.append(f"torch does not import: {torch.get('error')}")
    else:
        if expect.get("torch_version") and torch["version"].partition("+")[0] != expect["torch_version"]:
            problems.append(f"torch {torch['version']} is installed, vllm_torch_version is {expect['torch_version']}")
        have = _torch_backend_of(torch["version"], torch.get("cuda"))
        if have != expect.get("backend"):
            problems.append(f"torch {torch['version']} is a {have} build, the torch backend chosen is {expect.get('backend')}; "
                            "remedy: make the index/wheelhouse offer that build, or set vllm_torch_backend")
    arch = found.get("architecture") or {}
    if expect.get("architecture") and arch.get("supported") is False:
        minimum = expect.get("min_vllm_version")
        problems.append(f"{expect['architecture']} is not in vLLM {vllm_version}'s model registry; remedy: set vllm_version to "
                        f"{minimum + ' or newer (the model profile minimum)' if minimum else 'a release that supports it'}")
    elif expect.get("architecture") and arch.get("supported") is None:
        problems.append(f"cannot read vLLM's model registry: {arch.get('error')}")
    if found.get("cuda", {}).get("status") == "failed":
        problems.append(f"CUDA check failed: {found['cuda'].get('reason')}; remedy: check the driver (`nvidia-smi`), "
                        "CUDA_VISIBLE_DEVICES and that the torch build matches the driver")
    return problems


def verify(expect: dict) -> dict:
    """Import vLLM and torch in THIS interpreter (the venv's) and report what they are."""
    found: dict = {}
    try:
        import vllm  # noqa: PLC0415
        found["vllm"] = {"version": getattr(vllm, "__version__", None), "test_double": bool(getattr(vllm, "IS_TEST_DOUBLE", False))}
        where = os.path.dirname(os.path.abspath(vllm.__file__)) if getattr(vllm, "__file__", None) else None
        if where and not where.startswith(os.path.abspath(sys.prefix) + os.sep):
            found["vllm"]["path"] = where  # imported from outside the venv: an editable install (source channel)
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        found["vllm"] = {"version": None, "error": f"{type(exc).__name__}: {exc}"}
    try:
        import torch  # noqa: PLC0415
        cuda_build = torch.version.cuda
        found["torch"] = {"version": torch.__version__, "cuda": cuda_build}
        if cuda_build is None:
            found["cuda"] = {"status": "skipped", "reason": f"torch {torch.__version__} is a CPU build: no CUDA to check"
                             + (" (the vLLM engine is the test double: emulated GPUs)" if found["vllm"].get("test_double") else "")}
        else:
            available, count = torch.cuda.is_available(), torch.cuda.device_count()
            want = expect.get("expect_devices")
            ok = available and (want is None or count == want)
            found["cuda"] = {"status": "passed" if ok else "failed", "available": available, "device_count": count,
                             "reason": f"torch.cuda.is_available()={available}, device_count()={count}, expected {want}"}
    except Exception as exc:  # noqa: BLE001
        found["torch"] = {"version": None, "error": f"{type(exc).__name__}: {exc}"}
        found["cuda"] = {"status": "failed", "reason": "torch does not import"}
    arch = expect.get("architecture")
    if arch:
        try:
            from vllm.model_executor.models import ModelRegistry  # noqa: PLC0415
            found["architecture"] = {"name": arch, "supported": arch in set(ModelRegistry.get_supported_archs())}
        except Exception as exc:  # noqa: BLE001
            found["architecture"] = {"name": arch, "supported": None, "error": f"{type(exc).__name__}: {exc}"}
    found["problems"] = check(expect, found)
    found["ok"] = not found["problems"]
    return found


# ------------------------------------------------------------------ build --

def _run(argv: list, env: dict | None = None) -> None:
    print("+ " + " ".join(argv), flush=True)
    proc = subprocess.run(argv, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"vllm-fleet-venv: command failed with exit status {proc.returncode}: {argv[0]} {argv[1] if len(argv) > 1 else ''}")


def _remove(path: str) -> None:
    if os.path.islink(path):
        os.unlink(path)
    elif os.path.exists(path):
        shutil.rmtree(path)


def _checkout(spec: dict) -> str:
    """Clone (or refresh) spec's checkout at source_ref; return the commit checked out.

    A branch name follows the remote's branch (origin/BRANCH), not a stale local one.
    """
    src, url = spec["source_dir"], spec["source_url"]
    if not os.path.isdir(os.path.join(src, ".git")):
        _remove(src)
        os.makedirs(os.path.dirname(src), exist_ok=True)
        _run(["git", "clone", "--filter=blob:none", "--no-checkout", url, src])
    else:
        _run(["git", "-C", src, "remote", "set-url", "origin", url])
    _run(["git", "-C", src, "fetch", "--tags", "--force", "origin"])
    ref = spec.get("source_ref") or "origin/HEAD"
    remote_branch = subprocess.run(["git", "-C", src, "rev-parse", "--verify", "--quiet", f"refs/remotes/origin/{ref}^{{commit}}"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if remote_branch.returncode == 0:
        ref = f"origin/{ref}"
    _run(["git", "-C", src, "checkout", "--force", "--detach", ref])
    _run(["git", "-C", src, "clean", "-fdx", "--quiet"])
    head = subprocess.run(["git", "-C", src, "rev-parse", "HEAD"], stdout=subprocess.PIPE, check=True)
    return head.stdout.decode().strip()


def build(spec: dict) -> dict:
    """Build spec's venv in a temporary directory, verify it, then rename it into place."""
    venvs_dir = spec["venvs_dir"]
    os.makedirs(venvs_dir, exist_ok=True)
    for leftover in os.listdir(venvs_dir):
        if leftover.startswith((".tmp-", ".old-")):
            _remove(os.path.join(venvs_dir, leftover))
    tmp = os.path.join(venvs_dir, ".tmp-" + spec["name"])
    env = dict(os.environ, UV_CACHE_DIR=spec["uv_cache"], **spec.get("env", {}))
    offline = ["--offline"] if spec.get("offline") else []
    no_download = ["--no-python-downloads"] if spec.get("no_python_downloads") else []
    _run([spec["uv"], "venv", *offline, *no_download, "--relocatable", "--python", spec["python"], tmp], env)
    commit = _checkout(spec) if spec["channel"] == "source" else None
    _run([spec["uv"], "pip", "install", *(["--offline"] if spec.get("offline") else []),
          "--python", os.path.join(tmp, "bin", "python"), *spec["install"]], env)
    verify_env = dict(os.environ)
    if spec.get("cuda_visible_devices"):
        verify_env["CUDA_VISIBLE_DEVICES"] = spec["cuda_visible_devices"]
    proc = subprocess.run([os.path.join(tmp, "bin", "python"), os.path.abspath(__file__), "verify", json.dumps(spec)],
                          stdout=subprocess.PIPE, env=verify_env, cwd="/")
    try:
        found = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise SystemExit(f"vllm-fleet-venv: the verify program printed no result (exit {proc.returncode})") from None
    print("verify: " + json.dumps(found), flush=True)
    if not found.get("ok"):
        _remove(tmp)
        raise SystemExit("vllm-fleet-venv: verification failed, nothing replaced:\n" + "\n".join(f"  - {p}" for p in found["problems"]))
    files = write_files_manifest(tmp)
    print(f"files: {files} recorded with their sizes in {FILES}", flush=True)
    key = {k: spec.get(k) for k in ("channel", "version", "backend", "python", "torch_version", "source_url", "source_ref")}
    with open(os.path.join(tmp, MARKER), "w", encoding="utf-8") as fh:
        json.dump({"key": key, "verify": found, "built_at": time.time(), "install": spec["install"],
                   **({"source_dir": spec["source_dir"], "commit": commit} if commit else {})}, fh, indent=1)
    final_name = spec["name"]
    if spec["channel"] == "nightly":
        final_name = "vllm-" + re.sub(r"[^A-Za-z0-9._+-]", "_", found["vllm"]["version"])[:64] + "-" + spec["backend"]
    final = os.path.join(venvs_dir, final_name)
    if os.path.lexists(final):
        old = os.path.join(venvs_dir, ".old-" + final_name)
        _remove(old)
        os.rename(final, old)
        os.rename(tmp, final)
        _remove(old)
    else:
        os.rename(tmp, final)
    if final_name != spec["name"]:  # nightly: point the stable link at the new build, atomically
        link_tmp = os.path.join(venvs_dir, ".tmp-link-" + spec["name"])
        _remove(link_tmp)
        os.symlink(final_name, link_tmp)
        os.replace(link_tmp, os.path.join(venvs_dir, spec["name"]))
    result = {"path": final, "vllm": found["vllm"].get("version"), "torch": found["torch"].get("version"),
              "cuda": found["cuda"], "architecture": found.get("architecture")}
    print("built: " + json.dumps(result), flush=True)
    return result


def main(argv: list) -> int:
    """CLI entry (see the module docstring)."""
    if len(argv) != 2 or argv[0] not in ("state", "build", "verify"):
        print(__doc__, file=sys.stderr)
        return 2
    cmd, arg = argv
    if cmd == "state":
        print(json.dumps(state(json.loads(arg) if arg.startswith("{") else arg)))
    elif cmd == "verify":
        print(json.dumps(verify(json.loads(arg))))
    else:
        build(json.loads(arg))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
