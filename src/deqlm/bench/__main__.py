"""`python -m deqlm.bench <solver|memory|speed|allocator> [args]`: dispatch to
deqlm.bench.<name>.main(argv)."""

import importlib
import sys

from deqlm.allocator import tune_allocator

SUBCOMMANDS = ("solver", "memory", "speed", "allocator")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in SUBCOMMANDS:
        got = repr(argv[0]) if argv else "nothing"
        print(f"error: expected a subcommand ({', '.join(SUBCOMMANDS)}), got {got}", file=sys.stderr)
        return 2
    name = f"deqlm.bench.{argv[0]}"
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise
        print(f"error: benchmark {argv[0]!r} is not available ({name} is missing)", file=sys.stderr)
        return 1
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    tune_allocator()
    sys.exit(main())
