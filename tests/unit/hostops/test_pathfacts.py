"""Parsers of the one-round-trip path facts, on outputs of the commands themselves."""

from __future__ import annotations

import subprocess

from vllm_fleet.hostops.facts import (
    Account,
    PathState,
    PathStates,
    SystemAccount,
    TreeDigests,
    TreeFile,
    parse_account,
    parse_path_states,
    parse_tree,
)


def _sh(command: str) -> list[str]:
    return subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=True).stdout.splitlines()


def test_path_states_on_real_stat_output(tmp_path):
    d = tmp_path / "d"
    d.mkdir(mode=0o750)
    d.chmod(0o750)
    f = tmp_path / "f"
    f.write_text("x")
    f.chmod(0o640)
    missing = tmp_path / "nope"
    out = PathStates().process(_sh(PathStates().command([str(d), str(f), str(missing)])))
    assert out[str(d)].kind == "directory" and out[str(d)].mode == "750"
    assert out[str(f)].kind == "regular file" and out[str(f)].mode == "640"
    assert out[str(missing)] == PathState("missing")


def test_path_states_parser_ignores_noise():
    assert parse_path_states(["/a|directory|root|root|755", "garbage", "/b|missing"]) == {
        "/a": PathState("directory", "root", "root", "755"), "/b": PathState("missing")}


def test_account_present_and_absent():
    out = SystemAccount().process(_sh(SystemAccount().command("root")))
    assert out.user[0] == "root" and out.user[2] == "0" and out.group[0] == "root"
    assert parse_account(["passwd ", "group "]) == Account(None, None)


def test_tree_digests_on_real_output(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a b.json").write_text("{}")
    (tmp_path / "sub" / "w.safetensors").write_bytes(b"\0" * 10)
    out = TreeDigests().process(_sh(TreeDigests().command(str(tmp_path))))
    assert set(out) == {"a b.json", "sub/w.safetensors"}
    assert out["a b.json"].sha256 == "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
    assert TreeDigests().process(_sh(TreeDigests().command(str(tmp_path / "absent")))) is None
    assert parse_tree([]) == {}
    assert parse_tree(["abc root root 640 x y"]) == {"x y": TreeFile("abc", "root", "root", "640")}


def test_file_states_on_real_output(tmp_path):
    from vllm_fleet.hostops.facts import FileState, FileStates, parse_file_states

    f = tmp_path / "unit.service"
    f.write_text("[Unit]\n")
    f.chmod(0o644)
    out = FileStates().process(_sh(FileStates().command([str(f), str(tmp_path / "absent")])))
    import hashlib
    assert out[str(f)].sha256 == hashlib.sha256(b"[Unit]\n").hexdigest()
    assert out[str(f)].mode == "644"
    assert out[str(tmp_path / "absent")] is None
    assert parse_file_states(["/x|abc root vllm 640"]) == {"/x": FileState("abc", "root", "vllm", "640")}
