"""Stop requests: SIGTERM or Ctrl-C end a training run at the next step boundary, with a checkpoint.

Schedulers (SLURM, Kubernetes, most batch systems) send SIGTERM some time before SIGKILL; Python's default is
to die at once, silently, losing every step since the last periodic checkpoint. While the loop runs, the
handler here only records the request; the trainer finishes the step in flight, saves the last checkpoint and
raises `Stopped`, and the command line exits with 128 + the signal number (the shell's convention: 143, 130).
A second signal of the same kind gets the previous handler back and stops at once.
"""

from __future__ import annotations

import signal
import threading

from deqlm.infra.run_folder import RunFolder

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(Exception):
    """Training stopped on request after saving a checkpoint; `exit_code` follows the shell's convention."""

    def __init__(self, signum: int | None, step: int, folder: RunFolder):
        signum = signum or signal.SIGTERM  # a DDP rank the signal missed stops along with the others
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} after step {step}; checkpoint saved in {folder.ckpt_dir} "
                         f"(resume with --resume {folder})")
        self.exit_code = 128 + int(signum)


class StopRequest:
    """Records SIGTERM / SIGINT instead of dying, from `install()` until `restore()`.

    Signal handlers can only be set from the main thread; elsewhere (a trainer driven from a worker thread)
    nothing is installed and the signals keep their usual effect."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._record) or signal.SIG_DFL for s in STOP_SIGNALS}
        return self

    def _record(self, signum: int, frame) -> None:
        self.signum = signum
        signal.signal(signum, self._previous[signum])  # a second one is not postponed

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
