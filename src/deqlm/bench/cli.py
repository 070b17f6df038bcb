"""The benchmarks' command lines: `python -m deqlm.bench SUBCOMMAND [args]` and each subcommand's `--help`.

memory.py, speed.py and solver.py load torch when imported; their parsers live here, with the module
docstrings read from the source, so that `--help` answers at once. allocator.py loads nothing heavy and keeps
its own parser. Memory and speed share their protocol options and defaults (`_protocol_args`,
`fill_protocol_defaults`): a row measured by either reads the same command line.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

from deqlm.bench import allocator
from deqlm.bench import protocol as P


def summary(name: str) -> str:
    """The first paragraph of deqlm.bench.<name>'s docstring on one line, without the command's name."""
    first = " ".join(module_doc(name).split("\n\n")[0].split())
    return first.split(": ", 1)[-1]


def module_doc(name: str) -> str:
    """The docstring of deqlm.bench.<name>, read from its source without importing it."""
    spec = importlib.util.find_spec(f"deqlm.bench.{name}")
    assert spec is not None and spec.origin is not None, name
    return ast.get_docstring(ast.parse(Path(spec.origin).read_text())) or ""


def _parser(name: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=f"python -m deqlm.bench {name}", description=module_doc(name),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def _protocol_args(p: argparse.ArgumentParser, *, row_help: str, size_help: str) -> None:
    """The options memory and speed share: one row in this process, the device and size, the protocol
    (B, L, M, overrides, tolerances) and how each row's fresh process is run."""
    p.add_argument("--row", choices=list(P.ROWS), metavar="ROW", help=f"{row_help}: {', '.join(P.ROWS)}")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--size", default=None, choices=list(P.SIZES), help=size_help)
    p.add_argument("--batch", type=int, default=None, help=f"batch (default {P.PAPER_BATCH})")
    p.add_argument("--tgt-len", type=int, default=None, help=f"segment length (default {P.PAPER_TGT_LEN})")
    p.add_argument("--mem-len", type=int, default=None,
                   help=f"Transformer memory (default {P.PAPER_MEM_LEN})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (--row)")
    p.add_argument("--tol", default="cap", choices=["cap", "config"],
                   help="DEQ rows: cap = tolerance 0, both solvers run to their step limits (worst case); "
                        "config = the YAML's tolerances")
    p.add_argument("--row-timeout", type=float, default=None, help="seconds per fresh process")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's)")
    p.add_argument("--inprocess", action="store_true",
                   help="run rows in this process, not fresh ones (implied by --quick; CI only)")
    p.add_argument("--out", default="results/bench", help="output folder")
    p.add_argument("--json", action="store_true", help="print one JSON line per record")


def fill_protocol_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """The protocol options left unset: the paper's B, L, M (the CI sizes under --quick) and a row timeout
    that fits the device."""
    quick = args.quick
    args.batch = args.batch or (P.QUICK_BATCH if quick else P.PAPER_BATCH)
    args.tgt_len = args.tgt_len or (P.QUICK_TGT_LEN if quick else P.PAPER_TGT_LEN)
    if args.mem_len is None:
        args.mem_len = P.QUICK_MEM_LEN if quick else P.PAPER_MEM_LEN
    if args.row_timeout is None:
        args.row_timeout = 120.0 if quick else (300.0 if args.device == "cuda" else 3600.0)
    return args


def progress(args: argparse.Namespace) -> Callable[[str], None]:
    """Progress lines go to stdout, or to stderr when stdout carries the JSON records (`--json`)."""

    def say(msg: str) -> None:
        print(msg, file=sys.stderr if args.json else sys.stdout, flush=True)

    return say


def memory_parser() -> argparse.ArgumentParser:
    p = _parser("memory")
    what = p.add_argument_group("what to measure")
    what.add_argument("--paper", action="store_true", help="every paper row with a memory figure")
    what.add_argument("--sweep", action="store_true", help="memory against depth, solver steps, length")
    what.add_argument("--rows", nargs="*", default=None, help="--paper: only these row keys")
    what.add_argument("--depths", type=int, nargs="*", default=None,
                      help=f"--sweep: unrolled depths (default {' '.join(map(str, P.SWEEP_DEPTHS))})")
    what.add_argument("--solver-steps", type=int, nargs="*", default=None,
                      help=f"--sweep: solver caps (default {' '.join(map(str, P.SWEEP_SOLVER_STEPS))})")
    what.add_argument("--seq-lens", type=int, nargs="*", default=None,
                      help=f"--sweep: sequence lengths (default {' '.join(map(str, P.SWEEP_SEQ_LENS))})")
    _protocol_args(p, row_help="one row in this process (what --paper runs)",
                   size_help="full (paper widths) | reduced (widths / 4) | quick (CI); default: --paper "
                             "full, --sweep reduced on CPU and full on CUDA")
    p.add_argument("--quick", action="store_true", help="tiny sizes and few points, seconds (CI)")
    p.add_argument("--prime", default="step", choices=["step", "light"],
                   help="step: one full training step; light: graph-free forward + optimizer state")
    p.add_argument("--no-project", dest="project", action="store_false",
                   help="do not extrapolate unrolled rows that do not fit")
    return p


def speed_parser() -> argparse.ArgumentParser:
    p = _parser("speed")
    p.add_argument("--pairs", nargs="*", default=None, help="only these pairs (default: all)")
    _protocol_args(p, row_help="one row in this process (what the pairs run)",
                   size_help="default: full on CUDA, reduced on CPU (widths / 4)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, two pairs, seconds (CI)")
    p.add_argument("--steps", type=int, default=3, help="timed training steps and inference forwards")
    p.add_argument("--untimed-steps", type=int, default=1)
    return p


def solver_parser() -> argparse.ArgumentParser:
    p = _parser("solver")
    p.add_argument("--json", action="store_true", help="print one JSON line per configuration")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (CI)")
    p.add_argument("--out", type=Path, help="also write the list of lines as JSON to this file")
    p.add_argument("--no-torchdeq", action="store_true", help="skip TorchDEQ even if installed")
    p.add_argument(
        "--rank-sweep",
        metavar="R,R,...",
        help="instead: Broyden by rank: forward residual at the step cap, adjoint steps of 4 training steps",
    )
    return p


PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "solver": solver_parser,
    "memory": memory_parser,
    "speed": speed_parser,
    "allocator": allocator.build_parser,
}
