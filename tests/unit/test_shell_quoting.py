"""No setting value reaches a shell unquoted (issue 14, item 4).

Every string setting (and every string inside a list, a dict or a weights source) is given shell
metacharacters: ``$(touch /tmp/pwned)``, backticks, ``;``, both quotes, a newline. Each value is
either refused by the settings (one clear error, before any host is touched) or deploy.py and
uninstall.py are planned for a fake host (tests/unit/fakerun.py: every fact answered, as a bare
host) and every command pyinfra would run is read: the facts' commands (what ``--dry`` runs) and
the operations' commands (what a deploy runs). In each, every character of every injected
fragment must be inert to ``sh``: inside single quotes, backslash-escaped, or a character that
double quotes make literal. Secrets must not appear in any command at all.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from pydantic import SecretStr
from pyinfra.api import FileUploadCommand, FunctionCommand, StringCommand

from tests.unit.fakerun import REPO, fake_run
from tests.unit.test_fact_reads import _answer, _snapshot  # noqa: F401 - the bare host's facts
from vllm_fleet.errors import FleetError
from vllm_fleet.hostops.abort import FleetAbort
from vllm_fleet.settings import Settings, load_settings

TINY = "tests/fixtures/tiny-minimax-m2"
# The fragments sh would execute if they were unquoted; none holds a single quote (shlex.quote splits there).
FRAGMENTS = ("$(touch /tmp/pwned)", "`touch /tmp/pwned`", ";touch /tmp/pwned", "|touch /tmp/pwned", "&touch /tmp/pwned")
# With a newline (refused by most settings and by the renderer) and without (so a path goes all the way).
PAYLOADS = {"newline": "a$(touch /tmp/pwned)b`touch /tmp/pwned`c;touch /tmp/pwned|touch /tmp/pwned&touch /tmp/pwned'd\"e\nf",
            "one-line": "a$(touch /tmp/pwned)b`touch /tmp/pwned`c;touch /tmp/pwned|touch /tmp/pwned&touch /tmp/pwned'd\"e"}
PAYLOAD = PAYLOADS["newline"]
BASE = {"vllm_model": TINY, "vllm_port": 8101, "vllm_gpus": [0, 1, 2, 3]}
SECRET = "sk-quoting-" + "$(touch /tmp/pwned)`x`;'\""


def inert(cmd: str) -> list[bool]:
    """For each character of ``cmd``: True when POSIX sh reads it literally (single-quoted, backslash-escaped,
    or double-quoted and not one of $ ` \\), False where it can be syntax."""
    out = [False] * len(cmd)
    i, state = 0, None  # None, "'", '"'
    while i < len(cmd):
        c = cmd[i]
        if state == "'":
            if c == "'":
                state = None
            else:
                out[i] = True
        elif state == '"':
            if c == '"':
                state = None
            elif c == "\\" and i + 1 < len(cmd) and cmd[i + 1] in '$`"\\\n':
                out[i + 1] = True
                i += 1
            elif c not in "$`\\":
                out[i] = True
        elif c == "'":
            state = "'"
        elif c == '"':
            state = '"'
        elif c == "\\" and i + 1 < len(cmd):
            out[i + 1] = True
            i += 1
        i += 1
    return out


def unquoted_fragments(cmd: str) -> list[str]:
    """The injected fragments found in ``cmd`` with a character sh would act on."""
    mask, bad = inert(cmd), []
    for frag in FRAGMENTS:
        start = cmd.find(frag)
        while start != -1:
            if not all(mask[start:start + len(frag)]):
                bad.append(frag)
            start = cmd.find(frag, start + 1)
    return bad


def test_the_checker_tells_quoted_from_unquoted():
    assert unquoted_fragments(f"ls {shlex.quote('/x' + PAYLOAD)}") == []
    assert unquoted_fragments('echo "$(touch /tmp/pwned)"') == ["$(touch /tmp/pwned)"]
    assert unquoted_fragments("ls /x;touch /tmp/pwned") == [";touch /tmp/pwned"]
    assert unquoted_fragments("echo \\$(touch /tmp/pwned)") == ["$(touch /tmp/pwned)"]  # only the $ is escaped
    assert unquoted_fragments("printf '%s' 'a`touch /tmp/pwned`'") == []


def _string_fields(PAYLOAD: str) -> dict[str, object]:  # noqa: N803 - the payload of the case
    """Every setting that holds text, with a hostile value of its shape (paths stay absolute, URLs stay URLs)."""
    out: dict[str, object] = {}
    for name, field in Settings.model_fields.items():
        ann = str(field.annotation)
        if name in ("api_key", "hf_token"):
            continue  # secrets: test_secrets_reach_no_command
        if name in ("base_dir", "data_dir", "wheelhouse"):
            out[name] = "/srv/" + PAYLOAD
        elif name.endswith("_url") or name in ("nightly_index_url",):
            out[name] = "https://example.invalid/" + PAYLOAD
        elif name in ("extra_index_urls", "find_links"):
            out[name] = ["https://example.invalid/" + PAYLOAD]
        elif name == "extra_args":
            out[name] = ["--enable-prefix-caching", PAYLOAD]
        elif name == "extra_env":
            out[name] = {"VLLM_FLEET_TEST": PAYLOAD}
        elif name == "supported_os":
            out[name] = {"debian": ["12", PAYLOAD], PAYLOAD: ["1"]}
        elif name == "weights_sources":
            continue  # the sources' fields: _source_cases
        elif "str" in ann and "Literal" not in ann:
            out[name] = PAYLOAD
    return out


def _source_cases(PAYLOAD: str) -> dict[str, list[dict]]:  # noqa: N803
    hf = {"kind": "hf", "repo": "test/tiny-minimax-m2", "endpoint": "http://127.0.0.1:9"}
    return {
        "weights_sources.repo": [{**hf, "repo": "test/" + PAYLOAD}],
        "weights_sources.endpoint": [{**hf, "endpoint": "http://127.0.0.1:9/" + PAYLOAD}],
        "weights_sources.revision": [{**hf, "revision": PAYLOAD}],
        "weights_sources.path": [{"kind": "local", "path": "/srv/" + PAYLOAD}],
    }


def _cases(payload: str) -> dict[str, dict]:
    return {**{k: {"vllm_" + k: v} for k, v in _string_fields(payload).items()},
            **{k: {"vllm_weights_sources": v} for k, v in _source_cases(payload).items()},
            "source_ref (channel=source)": {"vllm_channel": "source", "vllm_source_url": "https://example.invalid/vllm.git",
                                            "vllm_source_ref": payload},
            "source_url (channel=source)": {"vllm_channel": "source", "vllm_source_url": "https://example.invalid/" + payload}}


CASES = {f"{name} [{kind}]": data for kind, payload in PAYLOADS.items() for name, data in _cases(payload).items()}


def _commands(data: dict, playbook: str, names: list[str] | None = None) -> tuple[list[str], list[str], list[str], str | None]:
    """(fact commands, operation commands, upload targets, error) of ``playbook`` planned for a bare fake host with
    ``data``: the error is the clear message that ended the planning (then the facts read before it ran, and no
    operation). An upload is no shell command (pyinfra quotes its target where it copies it with sudo)."""
    facts: list[str] = []

    def answer(cls, args, kwargs):
        fact_args = {k: v for k, v in kwargs.items() if not k.startswith("_")}  # _sudo etc. are pyinfra's
        facts.append(str(cls().command(*args, **fact_args)))
        if cls.__name__ == "DebPackages":
            return {}  # apt.packages (git for the source channel): nothing installed
        return _answer(cls, args, kwargs)

    run = fake_run(data, answer)
    try:
        run.run_file(playbook)
    except (FleetAbort, FleetError) as exc:
        return facts, [], [], str(exc)
    ops: list[str] = []
    uploads: list[str] = []
    if names is not None:
        names += [n for op_hash in run.state.get_op_order() for n in run.state.get_op_meta(op_hash).names]
    for c in run.execute():
        if isinstance(c, StringCommand):
            ops.append(c.get_raw_value())
        elif isinstance(c, str):
            ops.append(c)
        elif isinstance(c, FunctionCommand):
            ops += [a for a in (*c.args, *c.kwargs.values()) if isinstance(a, str)]
        elif isinstance(c, FileUploadCommand):
            uploads += [str(c.dest), str(c.remote_temp_filename)]
    return facts, ops, uploads, None


@pytest.fixture
def bare_host(monkeypatch, tmp_path):
    from vllm_fleet.preflight import checks

    monkeypatch.setattr(checks, "check", lambda *a, **k: [])
    monkeypatch.setattr(checks, "check_disk", lambda *a, **k: [])
    monkeypatch.setattr(checks, "check_stack", lambda *a, **k: [])
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("VLLM_FLEET_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_hostile_setting_is_refused_or_reaches_every_shell_quoted(bare_host, case):
    data = {**BASE, **CASES[case]}
    try:
        load_settings(data, host="fake")
    except FleetError as exc:  # refused clearly: one message naming the setting, no host touched
        assert "vllm_" in str(exc) and "Traceback" not in str(exc)
        return
    for playbook in ("deploy.py", "uninstall.py"):
        facts, ops, _, error = _commands(data, playbook)
        assert error is None or "Traceback" not in error  # a clear error while planning: only the facts before it ran
        for kind, commands in (("fact (runs under --dry)", facts), ("operation", ops)):
            for cmd in commands:
                assert not unquoted_fragments(cmd), f"{case}: {playbook} {kind} command leaves {unquoted_fragments(cmd)} to the shell:\n{cmd}"


def test_secrets_reach_no_command_no_operation_name_and_no_log(bare_host, caplog, capsys):
    """The API key and the HF token (of the service and of the download unit) are in no fact or operation command,
    no upload path, no operation name and nothing logged while planning (what pyinfra prints at any verbosity)."""
    import logging

    caplog.set_level(logging.DEBUG)
    data = {**BASE, "vllm_api_key": SecretStr(SECRET), "vllm_hf_token": SecretStr("hf_" + SECRET),
            "vllm_weights_sources": [{"kind": "hf", "repo": "test/tiny-minimax-m2", "endpoint": "http://127.0.0.1:9"}]}
    load_settings(data, host="fake")
    names: list[str] = []
    facts, ops, uploads, error = _commands(data, "deploy.py", names=names)
    assert error is None and ops and facts and uploads and names
    assert any("secrets file" in n for n in names) and any("EnvironmentFile" in n for n in names)
    out = capsys.readouterr()
    for text in facts + ops + uploads + names + [caplog.text, out.out, out.err]:
        assert SECRET not in text


def test_the_cases_cover_every_string_setting():
    covered = {c.split(" ")[0].split(".")[0] for c in _cases(PAYLOAD)}
    text = {n for n, f in Settings.model_fields.items() if "str" in str(f.annotation) and "Literal" not in str(f.annotation)}
    assert text - covered <= {"api_key", "hf_token"}, text - covered  # the secrets: test_secrets_reach_no_command


WRITES = re.compile(r"\b(rm|mkdir|chown|chmod|mv|cp|tee|touch|install|useradd|usermod|groupadd|systemd-run|apt|apt-get|"
                    r"systemctl (start|stop|restart|enable|disable|daemon-reload)|pip install)\b(?!-)|>\s*[/$]")


@pytest.mark.parametrize("extra", [{}, {"vllm_weights_sources": [{"kind": "hf", "repo": "test/tiny-minimax-m2",
                                                                   "endpoint": "http://127.0.0.1:9"}]}],
                         ids=["mirrored-model-dir", "download"])
def test_dry_runs_only_facts_that_change_nothing(bare_host, extra):
    """What --dry runs is the facts: none of their commands writes, starts or installs anything (the venv and
    weights programs they call are sent inline or run their read-only `state`/`check`)."""
    assert WRITES.search("rm -f /x") and WRITES.search("echo a > /etc/x") and WRITES.search("systemctl restart vllm")
    assert not WRITES.search("test -d /run/systemd/system; echo systemd-running")
    facts, ops, _, error = _commands({**BASE, **extra}, "deploy.py")
    assert error is None and facts
    for cmd in facts:
        script = cmd.replace(_venv_program_source(), "PROGRAM")  # the venv program's text, sent inline, is data
        found = [m.group(0) for m in WRITES.finditer(script.replace("2>/dev/null", "").replace("2>&1", ""))]
        assert not found, f"a fact writes ({found}):\n{cmd[:400]}"


def _venv_program_source() -> str:
    from vllm_fleet.pyenv.facts import PROGRAM_SOURCE

    return shlex.quote(PROGRAM_SOURCE.read_text())
