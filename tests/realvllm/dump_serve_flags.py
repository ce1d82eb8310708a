"""Dump the REAL pinned vLLM's `vllm serve` options into vllm_fleet/planner/vllm_serve_flags.json.

Run by the real vLLM venv's python (it does not import vllm_fleet)::

    VLLM_PYTHON tests/realvllm/dump_serve_flags.py > vllm_fleet/planner/vllm_serve_flags.json

The toolkit reads the file to understand extra `vllm serve` arguments the way vLLM's
parser does (unique prefixes of long options, argparse's allow_abbrev): see
vllm_fleet/planner/serveargs.py. tests/realvllm/test_serve_flags_fixture.py runs this
script and checks the committed file still matches the pinned vLLM.

The parser is built as `vllm` builds it (tests/realvllm/check_argv.py: the top-level
FlexibleArgumentParser, the serve subcommand's subparser_init), with CpuPlatform
installed when no GPU platform is found.
"""

from __future__ import annotations

import contextlib
import json
import sys


def main() -> int:
    with contextlib.redirect_stdout(sys.stderr):  # whatever vLLM prints on import stays off the JSON
        from vllm import platforms

        if platforms.current_platform.is_unspecified():
            from vllm.platforms.cpu import CpuPlatform

            platforms.current_platform = CpuPlatform()
        import vllm
        from vllm.entrypoints.cli.serve import ServeSubcommand
        from vllm.reasoning import ReasoningParserManager
        from vllm.tool_parsers import ToolParserManager
        from vllm.utils.argparse_utils import FlexibleArgumentParser

        parser = FlexibleArgumentParser(prog="vllm", description="vLLM CLI")
        serve = ServeSubcommand().subparser_init(parser.add_subparsers(required=False, dest="subparser"))
        options = []
        for action in serve._actions:
            if not action.option_strings:
                continue  # the positional model tag
            nargs = action.nargs
            options.append({"flags": list(action.option_strings), "dest": action.dest,
                            "nargs": nargs if nargs is None or isinstance(nargs, int) else str(nargs)})
        doc = {
            "vllm_version": vllm.__version__,
            "allow_abbrev": serve.allow_abbrev,
            "regenerate": "VLLM_PYTHON tests/realvllm/dump_serve_flags.py > vllm_fleet/planner/vllm_serve_flags.json",
            "options": sorted(options, key=lambda o: o["flags"][0]),
            "reasoning_parsers": sorted(ReasoningParserManager.list_registered()),
            "tool_parsers": sorted(set(ToolParserManager.tool_parsers) | set(ToolParserManager.lazy_parsers)),
        }
    print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
