"""docs/settings.md, generated from the settings classes: each setting's type, default, bounds and what is refused.

    python -m vllm_fleet.settingsdoc > docs/settings.md

Type, default, numeric bounds and the description come from the fields themselves (the
sections of vllm_fleet/settings.py and the options table); why the bounds are what they are
from each field's ``bounds`` text; what a field's checks refuse from its options-table row's
``refused`` text (the row's own check) and from `REFUSED` below (the settings outside the table,
and the checks of the whole Settings that involve a row), joined by "; " (`refused`).
tests/unit/test_settings_doc.py requires one for every field that has a validator, and the file
to be current.
"""

from __future__ import annotations

import re
import sys
from typing import Any

from vllm_fleet.errors import SECRET_PARAMS
from vllm_fleet.layout import SHARED_PARENTS, SYSTEM_TREES
from vllm_fleet.planner import options as serve_options
from vllm_fleet.planner.plan import MIN_USEFUL_MAX_MODEL_LEN
from vllm_fleet.service.settings import OWNED_ENV, SECRET_ENV
from vllm_fleet.settings import PREFIX, SECTIONS, Settings

_DIRS = (f"not absolute, with `..`; `/`; the system trees {', '.join(f'`{t}`' for t in SYSTEM_TREES)} and anything under "
         f"them (`/home`, `/root`: hidden by ProtectHome); the shared parents {', '.join(f'`{p}`' for p in SHARED_PARENTS)} "
         "themselves and any top-level directory (a toolkit directory goes below one: `/opt/vllm-fleet`, `/data/vllm`)")
_SECRET_PARAMS = "/".join(SECRET_PARAMS) + " (or ending in _NAME, -NAME or .NAME; any case) with a value"
_URL = "anything but an `http(s)://`, `file://`, `git+https://` or `ssh://` URL; a URL holding credentials: a password, a token as the user, or a query parameter named " + _SECRET_PARAMS + " (put credentials in root's .netrc on the host)"

#: What each setting's checks refuse, beyond its type and numeric bounds (the rules for every setting are in the header);
#: for an options-table row, only what the row's own ``refused`` text does not say (checks across settings).
REFUSED: dict[str, str] = {
    "cluster": "anything but lower-case letters, digits and `_ . -` (up to 63, starting with a letter or digit); "
               "members that disagree, a missing head, a duplicate rank or a router replica: the fleet's error names the host",
    "cluster_address": "anything but an IP address; the unspecified or a loopback address",
    "cluster_ifname": "anything but an interface name of up to 15 characters, a comma list of them, or one with "
                      "NCCL's `^` / `=` prefix",
    "router_bind_host": "anything but an IP address; an address that is not loopback when the router host has no "
                        "key for clients (vllm_router_api_key or vllm_api_key): the fleet's error names the host",
    "router_api_key": "anything but a bearer token of 8-512 characters (RFC 6750 b64token: letters, digits, "
                      "`- . _ ~ + /`, `=` only at the end)",
    "router_version": "anything but a release version X.Y.Z",
    "router_model": "a name starting with `-` (vLLM's parser would read an option); whitespace or a control character",
    "model": "an empty name or one longer than 1024; a name that is no profile in models/*.yaml and no directory "
             "holding config.json",
    "gpus": "an empty list; negative or duplicate indices; an index above 63 or more than 64 GPUs; a count not "
            "divisible by PP x DP; with vllm_tensor_parallel_size set, TP x PP x DP other than the count",
    "version": "anything but a version such as 0.25.0 (at most 64 characters)",
    "service_name": "characters other than letters, digits and `:_.-` (a backslash among them: systemd unescapes it); "
                    "a first character other than a letter or digit (`-rf`: systemctl reads an option); a `.service` "
                    "suffix; more than 200 characters. "
                    "Preflight: a unit of this name, or of a companion's (NAME-fetch, -watchdog, -devices, "
                    "-router, -router-prober, -router-front, vllm-fleet-gate-NAME: HostLayout.units), that "
                    "vllm-fleet did not render, unless "
                    "vllm_adopt_existing_unit = True",
    "base_dir": _DIRS,
    "data_dir": _DIRS,
    "advertise_address": "neither an IP address nor a host name (no scheme, no port); a wildcard (0.0.0.0, ::); "
                         "a non-loopback address while vllm_bind_host is loopback; an IP other than a specific vllm_bind_host",
    "bind_host": "an address other than loopback without vllm_api_key",
    "max_model_len": "above the model's max_position_embeddings (checked before any host fact). A warning in the plan "
                     f"(not an error) below the useful minimum of {MIN_USEFUL_MAX_MODEL_LEN} tokens (MAX_LEN_SHORT; "
                     "\"auto\" refuses a fit that short)",
    "reasoning_parser": "a parser not among the profile's; for a model without a list (a local directory), a parser "
                        "the pinned vLLM does not register",
    "api_key": "missing while vllm_bind_host is not loopback",
    "service_user": "anything but a user name of up to 31 lower-case letters, digits, `_` and `-` starting with a "
                    "letter; root. Preflight: an existing "
                    "account vllm-fleet did not create, unless vllm_adopt_existing_user = True; a uid-0 account always",
    "python_version": "anything but 3.10, 3.11, 3.12 or 3.13",
    "source_url": _URL + "; unset while vllm_channel = \"source\"; set while it is not",
    "index_url": _URL,
    "torch_index_url": _URL,
    "nightly_index_url": _URL,
    "extra_index_urls": "an entry that is neither an `http(s)://`/`file://` URL nor an absolute path; a URL holding credentials (as vllm_index_url)",
    "find_links": "an entry that is neither an `http(s)://`/`file://` URL nor an absolute path; a URL holding credentials (as vllm_index_url)",
    "torch_backend": "anything but auto or a known backend (cu126, cu128, cu130, cpu, ...)",
    "torch_version": "anything but a release such as 2.11.0 (the build comes from vllm_torch_backend)",
    "wheelhouse": "a path that is not a directory of *.whl files on the control machine",
    "weights_sources": "an unknown kind; a hub source without a repo id like Org/Name; a local source whose path is "
                       "not absolute, holds `..`, or lies under /home, /root, /tmp, /var/tmp, /run/user, /proc, /sys "
                       "or /dev (hidden from the units); an endpoint that is not an http(s) URL, or holds credentials "
                       "(user:password@, a secret query parameter as for vllm_index_url). Warnings (not errors): a hub "
                       "source with no revision (its own or the profile's) or one that is a branch or tag (`main`, "
                       "`master`, `v1.0`) rather than a commit id (40 lower-case hex digits), a repo other "
                       "than the profile's hf_repo / modelscope_repo",
    "extra_args": "every word is read as vLLM 0.25's parser reads it (underscores for dashes, `--flag=value`, dotted "
                  "keys, unique prefixes of long options): a secret flag (--api-key, --hf-token); a flag the plan owns "
                  "(every options-table row, -tp, --no- twins, --model, --trust-remote-code), in any spelling; "
                  "--config FILE; -h/--help; words vLLM's parser refuses (an ambiguous prefix, a missing value); "
                  "for the pinned release, options and positional words vLLM 0.25 does not have; non-strings; a URL "
                  "holding credentials (as for vllm_index_url)",
    "extra_env": "a name that is no POSIX variable name (`[A-Za-z_][A-Za-z0-9_]*`: not `A=B`, `1X`, `A-B`); a secret "
                 f"variable ({', '.join(SECRET_ENV)}); a variable the toolkit sets itself: "
                 f"{', '.join(k for k, (s, _) in OWNED_ENV.items() if s == 'vllm_gpus')} (set vllm_gpus), "
                 f"{', '.join(k for k, (s, _) in OWNED_ENV.items() if s == 'vllm_data_dir')} (set vllm_data_dir); a "
                 "control character in a value; a URL with credentials in a value. The plan's own variables and "
                 "HF_HUB_OFFLINE may be overridden",
}

HEADER = """# Settings

Generated from the settings classes by `python -m vllm_fleet.settingsdoc > docs/settings.md`
(tests/unit/test_settings_doc.py fails when it is not current). Every setting is a `vllm_`-prefixed
key of host data; defaults are in group_data/all.py. Settings are validated before any host is
touched: each problem is one message naming the host, the key, the value and the remedy.

Refused in every setting, before its own checks:

- a key that is no setting (the closest one is suggested);
- a value of the wrong type, NaN or an infinity;
- a control character anywhere, in any string, list item, dict key or value (Unicode categories Cc, Cf,
  Cs, Zl, Zp: newlines, NUL, escapes, bidi marks, U+2028);
- whitespace in any name or path, that is in every setting but the words of vllm_extra_args and the
  values of vllm_extra_env.

Checks that need the host run in preflight, from the snapshot read in one round trip (units and
accounts that vllm-fleet did not create; GPUs, disk, port, OS); checks of the plan (the KV cache
against the GPUs, the length that fits, at least 2048 tokens for "auto") in the plan's errors.
"""


def _type(annotation: Any) -> str:
    text = re.sub(r"\btyping\.|\bpydantic\.types\.|<class '([^']+)'>", lambda m: m.group(1) or "", str(annotation))
    text = text.replace("vllm_fleet.weights.settings.", "").replace("NoneType", "None")
    return text


def _default(field) -> str:
    value = field.default_factory() if field.default_factory is not None else field.default
    return repr(value)


def _bounds(field) -> str:
    parts = []
    signs = {"Ge": ">=", "Gt": ">", "Le": "<=", "Lt": "<"}  # annotated_types' bounds, as pydantic keeps them
    for m in field.metadata:
        kind = type(m).__name__
        if kind in signs:
            parts.append(f"{signs[kind]} {getattr(m, kind.lower())}")
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    why = extra.get("bounds")
    return ", ".join(parts) + (f" ({why})" if why and parts else why or "")


def refused(name: str) -> str:
    """What setting ``name``'s checks refuse: its options-table row's ``refused`` text, then `REFUSED`'s ("": nothing)."""
    try:
        own = serve_options.row(name).refused
    except KeyError:
        own = ""
    return "; ".join(text for text in (own, REFUSED.get(name, "")) if text)


def render() -> str:
    """The text of docs/settings.md."""
    lines = [HEADER]
    for section, model in SECTIONS.items():
        lines.append(f"## {section}\n")
        for name in model.model_fields:
            field = Settings.model_fields[name]
            lines.append(f"### {PREFIX}{name}\n")
            lines.append(f"{field.description}\n")
            lines.append(f"- type: `{_type(field.annotation)}`")
            lines.append(f"- default: `{_default(field)}`")
            bounds = _bounds(field)
            if bounds:
                lines.append(f"- bounds: {bounds}")
            if refused(name):
                lines.append(f"- refused: {refused(name)}")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
