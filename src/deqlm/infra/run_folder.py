"""The run folder: the one module that knows every file a run keeps, reads each at most once, writes each
atomically.

    <train.run_dir>/<corpus>/<experiment>/<stamp>/
        config.yaml          the resolved experiment (what `deqlm.config.load_config` returns, as YAML)
        env.json             the process and the code that made the run (`deqlm.infra.provenance`);
        env-resume-<N>.json  one more per resume at step N, each with its code.patch / code-resume-<N>.patch
                             when the checkout was dirty
        metrics.jsonl        one event per line (`deqlm.infra.metrics.MetricLogger`)
        wandb_id.txt         the wandb run a resume continues, when wandb is on
        ckpt/last.pt         the latest state, what a resume continues from
        ckpt/best.pt         the state with the best validation perplexity so far
        eval.json            the evaluator's record, the run's result (`deqlm.eval.perplexity`)
        solver_caps.json     a DEQ's test figures at several forward solver caps (`deqlm.eval.solver_caps`)
        train.lock           held (flock) by the one process training the folder; holds its process id

Every other module asks a `RunFolder` for a file's path or content and never spells a name. A `RunFolder`
caches what it reads, so one evaluation reads the config and the eval record once however many of its steps
look at them; what it writes replaces the cached copy. Importing this module does not load torch (each
entry point's `--help` answers first); reading or writing a checkpoint does.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
import pickle
import shutil
from collections import Counter
from pathlib import Path

from deqlm.config import ConfigError, ExperimentConfig, load_config, to_yaml
from deqlm.infra.exits import warn
from deqlm.infra.io import (
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    read_jsonl,
    remove_stale_temps,
)

CONFIG = "config.yaml"
ENV = "env.json"
METRICS = "metrics.jsonl"
WANDB_ID = "wandb_id.txt"
EVAL = "eval.json"
CAPS = "solver_caps.json"
LOCK = "train.lock"
CKPT_DIR = "ckpt"
LAST = "last.pt"  # the latest state: what a resume continues from
BEST = "best.pt"  # the state with the best validation perplexity so far
EVAL_ORDER = (BEST, LAST)  # what an evaluation reads: the best-validation weights when there are some
MARKERS = (CONFIG, METRICS, ENV, CKPT_DIR)  # what makes a folder look like a run
CODE_NOT_RECORDED = "code not recorded"


class RunError(Exception):
    """A problem with one run folder, reported as one line ``error: <run>: <what>``."""

    def __init__(self, run: str | os.PathLike, what: str):
        super().__init__(f"{run}: {what}")
        self.run = str(run)
        self.what = what


class WriteFailed(RunError):
    """A file of a run that could not be written mid-run (a full disk, a file-size limit): the run failed,
    and what was written before is intact."""


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read: cut short (a full disk, an interrupted copy), not a checkpoint,
    or holding objects other than tensors and plain data. The message names the file, then says what to do."""

    def __init__(self, path: Path, reason: str, advice: str = ""):
        super().__init__(f"{path} is damaged ({reason})" + (f"; {advice}" if advice else ""))
        self.path, self.reason = path, reason


def env_name(resume_step: int | None = None) -> str:
    """The env record of a fresh run, or of a resume at `resume_step` (each process start keeps its own)."""
    return ENV if resume_step is None else f"env-resume-{resume_step}.json"


def patch_name(env: str) -> str:
    """The patch saved beside an env record: env.json -> code.patch, env-resume-400.json ->
    code-resume-400.patch."""
    return "code" + env.removeprefix("env").removesuffix(".json") + ".patch"


def code_label(env: dict | None, patch_saved: bool) -> str:
    """The report's ``code`` cell: the short commit, ``+patch`` when the checkout was dirty and its patch is
    in the run folder (`patch_saved`), ``+partial patch`` when untracked files were left out of it; a run
    from outside git is named by its source hash (``src:<hash>``). A dirty checkout without its patch, or no
    record at all, is CODE_NOT_RECORDED: nobody can rebuild it."""
    env = env or {}
    sha, dirty = env.get("git_sha"), env.get("git_dirty")
    if sha and (dirty is False or (dirty and patch_saved)):
        partial = dirty and env.get("git_untracked_skipped")  # untracked files too large for the patch
        return sha[:7] + ("+partial patch" if partial else "+patch" if dirty else "")
    if not sha and env.get("source_sha256"):
        return "src:" + env["source_sha256"][:7]
    return CODE_NOT_RECORDED


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / m).exists() for m in MARKERS)


def discover_runs(root: Path) -> list[Path]:
    """Run folders at or below ``root``, sorted; a run folder's own sub-folders are not searched."""
    if is_run_dir(root):
        return [root]
    found: list[Path] = []
    for dirpath, dirnames, _ in os.walk(root):
        here = Path(dirpath)
        if is_run_dir(here):
            found.append(here)
            dirnames[:] = []
        else:
            dirnames.sort()
    return sorted(found)


def make_run_dir(root: str | os.PathLike, corpus: str, experiment: str) -> Path:
    """Create `<root>/<corpus>/<experiment>/<stamp>/`; a numeric suffix keeps same-second runs apart. A root
    that cannot hold it (a file in the way, no permission, a read-only disk) is a RunError naming the root."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    parent = Path(root) / corpus / experiment
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        why = f"cannot create run folders under it ({exc.strerror}); set train.run_dir"
        raise RunError(root, why) from None
    for i in range(1000):
        path = parent / (stamp if i == 0 else f"{stamp}-{i}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
        except OSError as exc:
            raise RunError(parent, f"cannot create a run folder in it ({exc.strerror})") from None
    raise RuntimeError(f"cannot create a fresh run directory under {parent}")


def _why_unreadable(exc: Exception, path: Path) -> str:
    """What went wrong, in words a user can act on (torch's own messages run to several sentences)."""
    if isinstance(exc, EOFError) or path.stat().st_size == 0:
        return "empty or cut short"
    if isinstance(exc, pickle.UnpicklingError):
        return "not a checkpoint of tensors and plain data"
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return first.split(". ")[0]


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load with weights_only=True (a checkpoint can hold data, never code); CheckpointError if unreadable."""
    # torch loads here, not at the top: the command lines import this module before their --help answers
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a truncated or foreign file
        raise CheckpointError(path, _why_unreadable(exc, path)) from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(path, "no model state in it")
    return state


def _json_object(path: Path) -> dict | None:
    """A JSON object file; None when absent; ValueError (one line) when it is not a JSON object."""
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data


class RunFolder:
    """One run's folder. `reads` counts the files read from disk, by name (each at most once)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.reads: Counter[str] = Counter()
        self._cache: dict[str, object] = {}
        self._lock = None  # the open lock file while this process holds the folder

    def __str__(self) -> str:
        return str(self.path)

    # -- where things are --------------------------------------------------------------------------------
    @property
    def ckpt_dir(self) -> Path:
        return self.path / CKPT_DIR

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS

    @property
    def wandb_id_path(self) -> Path:
        return self.path / WANDB_ID

    def checkpoint_path(self, name: str = LAST) -> Path:
        """`ckpt/<name>`, for `name` one of LAST, BEST."""
        return self.ckpt_dir / name

    def checkpoint_label(self, name: str = LAST) -> str:
        return f"{CKPT_DIR}/{name}"

    # -- reading, each file once --------------------------------------------------------------------------
    def _once(self, name: str, read):
        if name not in self._cache:
            self.reads[name] += 1
            self._cache[name] = read(self.path / name)
        return self._cache[name]

    def config(self, overrides: tuple[str, ...] = (), device: str = "") -> ExperimentConfig:
        """The run's resolved config plus ``eval.*`` overrides (only eval settings may change after training);
        `device` ("": the run's own) takes the place of ``train.device``, checked like it."""
        text = self._once(CONFIG, lambda p: p.read_text() if p.is_file() else None)
        if text is None:
            raise RunError(self.path, f"missing {CONFIG}")
        for item in overrides:
            if not item.startswith("eval."):
                raise RunError(self.path, f"override {item!r}: only eval.* settings can be changed at "
                               "evaluation time")
        try:
            device_override = [f"train.device={device}"] if device else []
            return load_config(text=text, overrides=[*overrides, *device_override])
        except ConfigError as exc:
            raise RunError(self.path, str(exc)) from None

    def resume_config(self, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
        """The saved config with `overrides` of any setting (a resume may change any; the trainer then checks
        that the checkpoint still fits the model); ConfigError, one line, when it is missing or bad."""
        text = self._once(CONFIG, lambda p: p.read_text() if p.is_file() else None)
        if text is None:
            raise ConfigError(f"{self.path}: missing {CONFIG}")
        return load_config(text=text, overrides=list(overrides))

    def has_config(self) -> bool:
        return (self.path / CONFIG).is_file()

    def eval_record(self) -> dict | None:
        """The evaluator's record, None when absent; a file that is not a JSON object is a RunError."""
        try:
            return self._once(EVAL, _json_object)
        except (OSError, ValueError) as exc:
            raise RunError(self.path, f"corrupt {EVAL} ({str(exc).splitlines()[0]})") from None

    def env(self) -> dict | None:
        """The first env record, None when absent or unreadable (older runs may lack one)."""
        try:
            return self._once(ENV, _json_object)
        except (OSError, ValueError):
            return None

    def solver_caps(self) -> dict | None:
        """The solver-cap sweep's record, None when absent or unreadable."""
        try:
            return self._once(CAPS, _json_object)
        except (OSError, ValueError):
            return None

    def metrics(self) -> list[dict]:
        """The training log's events; a torn last line is dropped (the trainer may be mid-write), any other
        bad line is a JsonlError; a missing log is an empty list."""
        return self._once(METRICS, lambda p: read_jsonl(p) if p.is_file() else [])

    def has_metrics(self) -> bool:
        return self.metrics_path.is_file()

    def code(self) -> str:
        """`code_label` of the run's env record and its patch."""
        env = self.env()
        patch = (env or {}).get("git_patch")
        return code_label(env, bool(patch) and (self.path / str(patch)).is_file())

    def wandb_id(self) -> str | None:
        path = self.wandb_id_path
        return path.read_text().strip() if path.exists() else None

    # -- checkpoints ---------------------------------------------------------------------------------------
    def has_checkpoint(self) -> bool:
        return any(self.checkpoint_path(name).is_file() for name in EVAL_ORDER)

    def find_checkpoint(self) -> Path:
        """The checkpoint an evaluation reads: the first of EVAL_ORDER that exists."""
        for name in EVAL_ORDER:
            if self.checkpoint_path(name).is_file():
                return self.checkpoint_path(name)
        looked = " and ".join(self.checkpoint_label(name) for name in EVAL_ORDER)
        raise RunError(self.path, f"no checkpoint (looked for {looked})")

    def load_eval_checkpoint(self) -> tuple[Path, dict]:
        """The first readable checkpoint of EVAL_ORDER. A damaged best checkpoint falls back to an intact last
        one, said in one line: the last weights still give a result where stopping gives none, and the eval
        record names the file."""
        first = self.find_checkpoint()
        damaged: list[str] = []
        for name in EVAL_ORDER[EVAL_ORDER.index(first.name) :]:
            path = self.checkpoint_path(name)
            if not path.is_file():
                continue
            try:
                ckpt = load_checkpoint(path)
            except CheckpointError as exc:
                damaged.append(f"{self.checkpoint_label(name)} is damaged ({exc.reason})")
                continue
            if damaged:
                warn(f"{self.path}: {damaged[0]}; evaluating {self.checkpoint_label(name)} instead")
            return path, ckpt
        raise RunError(self.path, "; ".join(damaged))

    def load_resume_checkpoint(self) -> dict:
        """The last checkpoint; when it is damaged, the one-line error says whether the best can stand in."""
        last, best = self.checkpoint_path(LAST), self.checkpoint_path(BEST)
        try:
            return load_checkpoint(last)
        except CheckpointError as exc:
            try:
                step = load_checkpoint(best).get("step")
            except (FileNotFoundError, CheckpointError):
                raise CheckpointError(last, exc.reason, f"no intact {BEST} either: start a new run") from None
            raise CheckpointError(last, exc.reason, f"{BEST} (step {step}) is intact: resume from it with "
                                  f"`cp {best} {last}` and --resume again (later steps are redone), or start "
                                  "a new run") from None

    def checkpoint_record(self, path: Path, step: int | None) -> dict:
        """What the eval record keeps to tell whether it still describes this checkpoint."""
        return {"file": path.relative_to(self.path).as_posix(), "step": step, "mtime": path.stat().st_mtime}

    def recorded_step(self, path: Path) -> int | None:
        """The step the eval record holds for this exact checkpoint file (an up-to-date check need not load
        it); None when the record describes another file or none."""
        old = (self.eval_record() or {}).get("checkpoint") or {}
        same_file = old.get("file") == path.relative_to(self.path).as_posix()
        same = same_file and old.get("mtime") == path.stat().st_mtime
        return old.get("step") if same else None

    def save_checkpoint(self, name: str, state: dict) -> None:
        """Write a checkpoint atomically (a refused write is an OSError, `atomic_torch_save`)."""
        atomic_torch_save(state, self.checkpoint_path(name))

    def remove_checkpoint_temps(self) -> tuple[int, int]:
        """Temp files an interrupted checkpoint write left in ckpt/: (files, bytes) removed."""
        return remove_stale_temps(self.ckpt_dir)

    # -- writing, atomically -------------------------------------------------------------------------------
    def write_config(self, cfg: ExperimentConfig) -> None:
        text = to_yaml(cfg)
        atomic_write_text(self.path / CONFIG, text)
        self._cache[CONFIG] = text

    def write_env(self, info: dict, patch: bytes | None, resume_step: int | None = None) -> dict:
        """The env record of this process start; a dirty checkout's patch is written first, so an env record
        that names a patch always has it beside it."""
        name = env_name(resume_step)
        if patch is not None:
            atomic_write_bytes(self.path / patch_name(name), patch)
        info = {**info, "git_patch": None if patch is None else patch_name(name)}
        atomic_write_json(self.path / name, info)
        if name == ENV:
            self._cache[ENV] = info
        return info

    def write_eval_record(self, record: dict) -> None:
        atomic_write_json(self.path / EVAL, record)
        self._cache[EVAL] = record

    def write_solver_caps(self, record: dict) -> None:
        atomic_write_json(self.path / CAPS, record)
        self._cache[CAPS] = record

    def write_wandb_id(self, run_id: str) -> None:
        atomic_write_text(self.wandb_id_path, run_id + "\n")

    def truncate_metrics(self, max_step: int) -> None:
        """Drop events logged after `max_step` (a resumed run repeats them from its checkpoint)."""
        if self.metrics_path.exists():
            kept = [e for e in read_jsonl(self.metrics_path) if int(e.get("step", 0)) <= max_step]
            atomic_write_text(self.metrics_path, "".join(json.dumps(e) + "\n" for e in kept))
        self._cache.pop(METRICS, None)

    # -- one writer ------------------------------------------------------------------------------------------
    def claim(self) -> None:
        """Hold the folder for this training process (until `release` or the process ends) and check that it
        and its checkpoint folder take a write, before anything is built or written. A second trainer is
        refused in one line naming the holder's process id; a lock left by a killed process is no lock (the
        kernel drops it with the process), so a resume after a crash goes ahead."""
        try:
            fh = open(self.path / LOCK, "a+")  # noqa: SIM115 (held open for the process's life)
        except OSError as exc:
            raise RunError(self.path, f"cannot write to the run folder ({exc.strerror})") from None
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            pid = fh.read().strip() or "unknown"
            fh.close()
            raise RunError(self.path, f"process {pid} is training this run folder; one writer at a time "
                           "(wait for it to end, or stop it, then resume)") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        self._lock = fh
        for where in (self.path, self.ckpt_dir):
            self._test_write(where)

    def _test_write(self, where: Path) -> None:
        probe = where / f".write-test-{os.getpid()}"
        try:
            where.mkdir(exist_ok=True)
            probe.write_bytes(b"0" * 4096)
        except OSError as exc:
            self.release()
            raise RunError(where, f"cannot write there ({exc.strerror})") from None
        finally:
            probe.unlink(missing_ok=True)

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def discard_if_unused(self) -> None:
        """Remove a folder this process created but never wrote a run into (a start that failed before its
        first file), so it does not pose as a run; a folder with anything else in it is left alone."""
        if not self.path.is_dir():
            return
        extra = [p for p in self.path.iterdir() if p.name not in (LOCK, CKPT_DIR)]
        if not extra and not any(self.ckpt_dir.glob("*")):
            self.release()
            shutil.rmtree(self.path, ignore_errors=True)
