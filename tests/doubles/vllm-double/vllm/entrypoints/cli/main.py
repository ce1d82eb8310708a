"""`vllm` console script of the vLLM TEST DOUBLE (same module path as real vLLM's CLI).

Run from source with `python -m vllm.entrypoints.cli.main serve MODEL ...`.
"""

from __future__ import annotations

import sys

from vllm.test_double.cli import run


def main() -> None:
    """Parse argv and exit with the command's status."""
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
