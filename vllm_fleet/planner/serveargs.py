"""Extra `vllm serve` arguments, read the way the pinned vLLM's own parser reads them (pure).

vLLM 0.25's ``FlexibleArgumentParser`` (vllm/utils/argparse_utils.py) accepts many spellings
of one option before argparse sees them, and argparse then accepts more:

- ``--max_model_len`` for ``--max-model-len`` (underscores before the first ``.`` become dashes);
- ``--flag=value`` for ``--flag value``;
- ``--compilation-config.mode 3`` / ``-cc.mode=3`` for ``--compilation-config '{"mode": 3}'``
  (a dotted key sets the option before its first ``.``);
- ``-O3`` for ``--optimization-level 3``;
- ``--max-model`` for ``--max-model-len``: any unique prefix of a long option (argparse's
  ``allow_abbrev``, on in vLLM), ``--no-`` twins of boolean options included;
- ``--config FILE``: more options read from a YAML file.

`parse` applies vLLM's rewriting, then runs the words through a stdlib argparse parser built
from the option table of the pinned vLLM (vllm_serve_flags.json, dumped from the real parser by
tests/realvllm/dump_serve_flags.py and checked against it by tests/realvllm), so each word is
resolved to the option vLLM would set, with argparse's own prefix and value rules.
"""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FLAGS_FILE = Path(__file__).with_name("vllm_serve_flags.json")

CONFIG_FLAG = "--config"
HELP_FLAGS = ("-h", "--help")


class ServeArgsError(ValueError):
    """Words vLLM's parser would refuse (an ambiguous prefix, a missing value): ``problem|remedy``."""


@dataclass(frozen=True)
class Use:
    """One option the words set: every spelling of it (the pinned vLLM's), how it was written, its values."""

    flags: tuple[str, ...]
    dest: str
    written: str
    values: tuple[str, ...] = ()

    @property
    def flag(self) -> str:
        """The option's first spelling, as vLLM's help lists it (``--max-model-len``)."""
        return self.flags[0]


@dataclass(frozen=True)
class Parsed:
    """What a list of words sets in the pinned vLLM's parser."""

    uses: tuple[Use, ...]
    unknown: tuple[str, ...] = field(default=())
    """Words the parser does not know: options of no vLLM 0.25 flag, stray positional words."""


@functools.lru_cache(maxsize=1)
def table() -> dict[str, Any]:
    """The pinned vLLM's serve options (vllm_serve_flags.json)."""
    return json.loads(FLAGS_FILE.read_text())


def vllm_version() -> str:
    """The vLLM version the option table was dumped from."""
    return table()["vllm_version"]


def reasoning_parsers() -> tuple[str, ...]:
    """The reasoning parser names the pinned vLLM registers."""
    return tuple(table()["reasoning_parsers"])


def all_flags() -> tuple[str, ...]:
    """Every spelling of every serve option of the pinned vLLM."""
    return tuple(f for o in table()["options"] for f in o["flags"])


def spellings(flag: str) -> tuple[str, ...]:
    """Every spelling of the option ``flag`` is one of (``--enable-expert-parallel`` -> ``-ep``, ``--no-...``)."""
    for o in table()["options"]:
        if flag in o["flags"]:
            return tuple(o["flags"])
    return (flag,)


class _Seen(argparse.Action):
    """Records the option (and its values) instead of storing it."""

    def __call__(self, parser, namespace, values, option_string=None):
        vals = values if isinstance(values, list) else [] if values is None else [values]
        namespace.uses.append(Use(tuple(self.option_strings), self.dest, option_string or "", tuple(map(str, vals))))


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print and exit
        raise ServeArgsError(message)


@functools.lru_cache(maxsize=1)
def _parser() -> _Parser:
    doc = table()
    parser = _Parser(prog="vllm serve", add_help=False, allow_abbrev=doc.get("allow_abbrev", True))
    for o in doc["options"]:
        nargs = o["nargs"]
        parser.add_argument(*o["flags"], dest=o["dest"], nargs=nargs, action=_Seen, default=None)
    return parser


def rewrite(words: Sequence[str]) -> list[str]:
    """vLLM's own rewriting of the words before argparse (FlexibleArgumentParser.parse_args)."""
    out: list[str] = []
    for word in words:
        if word.startswith("--"):
            key, eq, value = word.partition("=")
            head, dot, rest = key[2:].partition(".")
            out.append("--" + head.replace("_", "-") + dot + rest + eq + value)
        elif word.startswith("-O") and word != "-O":
            out += ["--optimization-level", word[3:] if word[2:3] == "=" else word[2:]]
        else:
            out.append(word)
    done: list[str] = []
    skip = False
    for i, word in enumerate(out):
        if skip:
            skip = False
            continue
        if word.startswith("-") and "." in word:
            key, eq, _ = word.partition("=")
            if "." in key:
                # ``--x.y v`` / ``--x.y=v``: vLLM passes ``--x`` with a JSON document built from the keys
                # (the value is kept as it is: only which option it sets matters here).
                value = word.partition("=")[2] if eq else out[i + 1] if i + 1 < len(out) else ""
                done += [key.split(".", 1)[0], json.dumps(value) if value.startswith("-") else value]
                skip = not eq and i + 1 < len(out)
                continue
        done.append(word)
    return done


def resolve(word: str) -> tuple[str, ...] | None:
    """Every spelling of the option one (rewritten) word names by itself, or None (a value, an unknown
    or ambiguous name): the word's name before ``=``, exact, else the one long option it is a prefix of
    (argparse's rule for ``--`` words)."""
    if not word.startswith("-") or word == "-":
        return None
    name = word.split("=", 1)[0]
    options = table()["options"]
    exact = [o for o in options if name in o["flags"]]
    if not exact and name.startswith("--") and len(name) > 2 and table().get("allow_abbrev", True):
        exact = [o for o in options if any(f.startswith(name) for f in o["flags"] if f.startswith("--"))]
    return tuple(exact[0]["flags"]) if len(exact) == 1 else None


def parse(words: Iterable[str]) -> Parsed:
    """The options ``words`` set in the pinned vLLM's parser (after vLLM's rewriting).

    Raises `ServeArgsError` where vLLM's parser would fail (an ambiguous prefix, a missing value).
    """
    words = list(words)
    for word in words:  # vLLM reads the file before any other rule; the file itself is no concern of ours
        if word == CONFIG_FLAG:
            return Parsed((Use(spellings(CONFIG_FLAG), "config", word),))
    namespace = argparse.Namespace(uses=[])
    _, unknown = _parser().parse_known_args(rewrite(words), namespace)
    return Parsed(tuple(namespace.uses), tuple(unknown))


def masked(words: Sequence[str], secret_flags: Iterable[str]) -> list[str]:
    """``words`` with the values of secret options (and any word holding one) shown as ``***``."""
    secret = set(secret_flags)
    try:
        uses = parse(words).uses
    except ServeArgsError:
        return ["***" if "=" in w or not w.startswith("-") else w for w in words]
    values = [v for u in uses if secret & set(u.flags) for v in u.values if v]
    return ["***" if any(v in w for v in values) else w for w in words]
