"""`python -m deqlm.bench <solver|memory|speed|allocator> [args]`: dispatch to
deqlm.bench.<name>.main(argv)."""

import importlib
import sys
import textwrap

from deqlm.bench.cli import PARSERS, summary
from deqlm.infra.allocator import tune_allocator
from deqlm.infra.exits import BAD_INPUT, OK, error

USAGE = f"usage: python -m deqlm.bench {{{','.join(PARSERS)}}} [args]   (SUBCOMMAND --help for its options)"


def overview() -> str:
    """The top-level help: each subcommand with what its module's docstring says it measures."""
    lines = [USAGE, "", "benchmarks (protocols: docs/benchmarks.md; figures: results/bench/README.md):"]
    for name in PARSERS:
        head = f"  {name:<11}"
        lines.append(textwrap.fill(summary(name), 110, initial_indent=head, subsequent_indent=" " * 13))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(overview())
        return OK
    if not argv or argv[0] not in PARSERS:
        got = repr(argv[0]) if argv else "nothing"
        return error(f"expected a subcommand ({', '.join(PARSERS)}), got {got}; --help lists them", BAD_INPUT)
    name, rest = argv[0], argv[1:]
    if any(a in ("-h", "--help") for a in rest):
        PARSERS[name]().print_help()  # before importing the benchmark: most of them load torch
        return OK
    module = importlib.import_module(f"deqlm.bench.{name}")
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    tune_allocator()
    sys.exit(main())
