"""glibc malloc settings for CPU training: keep freed tensor memory in the process instead of returning it.

With glibc's defaults a tensor above the mmap threshold (128 KiB at start, raised dynamically to at most
32 MiB) is served by its own `mmap` and unmapped on free, and the heap top is trimmed back to the kernel
whenever more than twice that threshold lies free. A training step allocates and frees the same large
activations (logits, FFN inputs, every solver iterate) again and again, so every step faults the same pages in
afresh: minor page faults and kernel time, with system time above user time on the copy-memory DEQ. The three
settings below serve requests up to 1 GiB from the heap (a fixed mmap threshold, which also switches the
dynamic adjustment off; 32 MiB, the most older glibc versions accept, where 1 GiB is refused), make the heap
grow in large steps (top pad) and keep up to the pad's worth of freed memory mapped (trim threshold).
Numerics are untouched: only where the bytes live changes. The cost is a higher resident set (freed memory
stays mapped for reuse). results/bench/README.md has the measurements.

Mechanism: `tune_allocator()` calls `mallopt` in the process itself, first thing in each entry point's
`__main__`. glibc applies mallopt settings to later allocations at any time, so no re-exec is needed; each
entry point (and each torchrun worker, which runs `python -m deqlm.train` itself) tunes its own process.
Importing deqlm as a library changes nothing.

Who wins, in order (`decide`, a pure function of the environment):
  1. `DEQLM_ALLOCATOR=system` turns it off (`tuned`, the default, turns it on; other values: off, warned);
  2. an allocator preloaded through LD_PRELOAD (jemalloc, tcmalloc, mimalloc) is left alone;
  3. any of MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_, MALLOC_TOP_PAD_ or a glibc.malloc.* entry in
     GLIBC_TUNABLES means the user has set the allocator: glibc already applied it, we add nothing;
  4. not glibc (macOS, musl): nothing to do, silently;
  5. otherwise mallopt with SETTINGS.

mallopt takes a C `int`: values must stay below 2 GiB. (Passed through ctypes without argtypes, 16 GiB is
masked to 0 and mallopt still reports success.) Each call's return value is checked and reported.

This module imports nothing heavy (no torch) so that it costs nothing at start-up.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass

SWITCH = "DEQLM_ALLOCATOR"
ON, OFF = "tuned", "system"
MIB = 2**20
GIB = 2**30

# (mallopt parameter name, its number in glibc's malloc.h, values to try in order, the environment variable)
SETTINGS = (
    # Older glibc refuses thresholds above HEAP_MAX_SIZE / 2 (32 MiB on 64-bit); newer ones take 1 GiB, which
    # also keeps the copy-memory DEQ's larger-than-32-MiB attention and solver buffers on the heap.
    ("M_MMAP_THRESHOLD", -3, (1 * GIB, 32 * MIB), "MALLOC_MMAP_THRESHOLD_"),
    ("M_TRIM_THRESHOLD", -1, (1 * GIB,), "MALLOC_TRIM_THRESHOLD_"),
    ("M_TOP_PAD", -2, (1 * GIB,), "MALLOC_TOP_PAD_"),
)
USER_VARIABLES = tuple(s[3] for s in SETTINGS)
USER_TUNABLES = ("glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold", "glibc.malloc.top_pad")
PRELOADED = ("jemalloc", "tcmalloc", "mimalloc")


@dataclass(frozen=True)
class Decision:
    """What to do with this process's allocator: mode is 'tune', 'system', 'environment', 'preloaded' or
    'unsupported'; reason says why, in words a user can act on."""

    mode: str
    reason: str


def glibc_version() -> str | None:
    """'glibc 2.36' on glibc systems, None elsewhere (macOS, musl, Windows lack this confstr name)."""
    try:
        version = os.confstr("CS_GNU_LIBC_VERSION")
    except (AttributeError, ValueError, OSError):
        return None
    return version if version and version.startswith("glibc") else None


def decide(environ: Mapping[str, str], libc: str | None) -> Decision:
    """The allocator decision for a process with this environment and C library (see the module doc)."""
    switch = environ.get(SWITCH, ON).strip().lower() or ON
    if switch == OFF:
        return Decision("system", f"{SWITCH}={OFF}")
    if switch != ON:
        return Decision("system", f"{SWITCH}={environ[SWITCH]!r} is neither {ON!r} nor {OFF!r}")
    preload = environ.get("LD_PRELOAD", "")
    found = [name for name in PRELOADED if name in preload]
    if found:
        return Decision("preloaded", f"{found[0]} preloaded (LD_PRELOAD)")
    user = [name for name in USER_VARIABLES if name in environ]
    tunables = environ.get("GLIBC_TUNABLES", "")
    user += [name for name in USER_TUNABLES if name in tunables]
    if user:
        return Decision("environment", "set by the environment: " + ", ".join(user))
    if libc is None:
        return Decision("unsupported", "not glibc: the system allocator")
    return Decision("tune", libc)


_applied: dict | None = None


def apply_settings(mallopt, settings=SETTINGS) -> dict[str, int | None]:
    """Each setting's first value `mallopt(param, value)` accepts (returns 1), or None if it refused all."""
    return {name: next((v for v in values if mallopt(param, v) == 1), None)
            for name, param, values, _ in settings}


def _mallopt(settings=SETTINGS) -> dict[str, int | None]:
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return apply_settings(libc.mallopt, settings)


def tune_allocator(environ: Mapping[str, str] | None = None) -> dict:
    """Apply `decide`'s answer to this process (entry points only) and remember it for `allocator_info`."""
    global _applied
    environ = os.environ if environ is None else environ
    decision = decide(environ, glibc_version())
    if decision.mode == "system" and decision.reason != f"{SWITCH}={OFF}":
        print(f"warning: {decision.reason}; using the system allocator", file=sys.stderr)
    info = {"mode": decision.mode, "detail": decision.reason}
    if decision.mode == "tune":
        try:
            accepted = _mallopt()
        except (OSError, AttributeError) as exc:  # no loadable libc or no mallopt in it
            accepted = {}
            info = {"mode": "unsupported", "detail": f"mallopt unavailable: {exc}"}
        if accepted:
            refused = [name for name, value in accepted.items() if value is None]
            note = f"; mallopt refused {', '.join(refused)}" if refused else ""
            info = {"mode": "partly tuned" if refused else "tuned", "detail": decision.reason + note,
                    "settings": {name: value for name, value in accepted.items() if value is not None}}
    _applied = info
    return info


def allocator_info() -> dict:
    """The allocator state of this process, for the env record: what `tune_allocator` did, or, when it did not
    run (deqlm imported as a library), what the environment says."""
    if _applied is not None:
        return dict(_applied)
    decision = decide(os.environ, glibc_version())
    if decision.mode == "tune":
        return {"mode": "system", "detail": "not tuned: only deqlm's entry points call tune_allocator()"}
    return {"mode": decision.mode, "detail": decision.reason}


def _size(n: int) -> str:
    return f"{n // GIB} GiB" if n % GIB == 0 else f"{n // MIB} MiB"


def summary_line(info: Mapping | None = None) -> str:
    """One line for a run header: what the allocator is and how to change it."""
    info = allocator_info() if info is None else info
    mode = info["mode"]
    if mode in ("tuned", "partly tuned"):
        values = ", ".join(f"{name[2:].lower().replace('_', ' ')} {_size(v)}"
                           for name, v in info.get("settings", {}).items())
        return f"allocator: glibc {mode} by deqlm ({values}); {SWITCH}={OFF} turns it off"
    return f"allocator: {mode} ({info['detail']})"


def environment_equivalent() -> dict[str, str]:
    """The environment variables that give glibc the preferred settings at start-up (by-hand comparisons)."""
    return {env: str(values[0]) for _, _, values, env in SETTINGS}
