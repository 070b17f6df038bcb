"""The allowed values of every setting that picks one of a fixed set, each written once, as a `Literal`.

The config dataclasses (deqlm.config) type their fields with these aliases, and OmegaConf refuses any other
value when a config loads, with the key and the choices in the message. `python -m deqlm.train --help` reads
the choices from the same annotations. Code downstream of a loaded config therefore never checks a name again.

Some choices name code that lives behind torch: solvers (deqlm.solvers), architectures and cores
(deqlm.models.build) and datasets (deqlm.data.dataset). Their registries cannot be the list the config reads,
because the config and every `--help` must answer without importing torch. So this module holds the names,
and each registry calls `check_registry` when it is imported: a name added to one side only fails loudly at
import (and in tests/test_choices.py), instead of surfacing as a KeyError in the middle of a run.

No imports beyond `typing`: config.py, and through it every `--help`, imports this module.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal, get_args, get_origin

SolverName = Literal["broyden", "anderson", "fixed_point", "reversible"]  # registry: deqlm.solvers.SOLVERS
StateDtype = Literal["float64", "float32"]  # the reversible solver's states (deqlm.solvers.reversible)
StopMode = Literal["rel", "abs"]  # how a solver measures a residual (deqlm.solvers.common.Tracker)
Arch = Literal["transformer", "trellisnet"]  # registry: deqlm.models.build.ARCHS
Core = Literal["deq", "unrolled"]  # registry: deqlm.models.build.CORES
Init = Literal["official", "normal"]  # Transformer weight initialisation (deqlm.models.transformer)
JacNorm = Literal["frobenius", "spectral"]  # norm of the Jacobian penalty (deqlm.deq.jacobian)
InputPath = Literal["qkv", "residual"]  # where x enters an injected Transformer cell
DatasetName = Literal["ptb", "wt103", "wt2", "synthetic", "copy"]  # registry: deqlm.data.dataset.BUILDERS
Tokenizer = Literal["word", "sentencepiece"]  # deqlm.data.tokenizers
OptimizerName = Literal["adam", "sgd"]  # deqlm.train.optim.build_optimizer
Schedule = Literal["cosine", "constant", "step"]  # deqlm.train.optim.lr_multiplier
Device = Literal["auto", "cpu", "cuda"]  # deqlm.infra.runtime.pick_device
Amp = Literal["none", "bf16", "fp16"]  # deqlm.infra.runtime.autocast_context
GradSync = Literal["ddp", "allreduce"]  # deqlm.infra.distributed.wrap_model
WandbMode = Literal["disabled", "offline", "online"]  # wandb's own modes (deqlm.infra.metrics.MetricLogger)

IMPLICIT = "implicit"  # deq.grad: the implicit-function-theorem gradient
# deq.grad: exact backprop through the reversible iteration (needs f_solver=reversible)
REVERSIBLE = "reversible"


def values(choice: Any) -> tuple[str, ...]:
    """The allowed values of a `Literal` alias above, in the order written; () for any other annotation."""
    return get_args(choice) if get_origin(choice) is Literal else ()


def check_registry(registry: Iterable[str], choice: Any, key: str) -> None:
    """Fail at import when a registry of code and its config choice disagree (an internal invariant: a name
    the config accepts must have code behind it, and code no config can reach is dead)."""
    held, allowed = set(registry), set(values(choice))
    if held != allowed:
        raise AssertionError(
            f"{key}: the registry holds {sorted(held)} but deqlm.choices lists {sorted(allowed)}; "
            "add or remove the name on both sides"
        )


def parse_grad(grad: str | int, key: str = "grad") -> str | int:
    """`deq.grad`: 'implicit', 'reversible', or a positive number K of unrolled steps (an int, or digits).

    OmegaConf cannot type a field as "a literal or an int", so the config keeps it a string, and both the
    config (when it loads) and the implicit layer (when it is built) read it through this one function."""
    if grad in (IMPLICIT, REVERSIBLE):
        return grad
    if isinstance(grad, int) and not isinstance(grad, bool) and grad > 0:
        return grad
    if isinstance(grad, str) and grad.isdigit() and int(grad) > 0:
        return int(grad)
    raise ValueError(f"{key}={grad!r} must be '{IMPLICIT}', '{REVERSIBLE}' or a positive integer")


def check_reversible_pair(f_solver: str, grad: str | int) -> None:
    """The reversible gradient walks back the reversible solver's own iteration, and that iteration is only
    worth running for it: either both name it or neither does."""
    if (f_solver == REVERSIBLE) != (grad == REVERSIBLE):
        raise ValueError(
            f"deq.f_solver={f_solver} with deq.grad={grad}: the reversible solver and the reversible "
            "gradient go together (set both deq.f_solver=reversible and deq.grad=reversible, or neither)"
        )


def check_beta(beta: float) -> None:
    """The reversible solver's relaxation: beta = 1 cannot be inverted (the reversal divides by 1 - beta), and
    outside (0, 2) the relaxed step does not shrink the plain iteration's error even for a contractive f."""
    if not (0.0 < beta < 2.0) or beta == 1.0:
        raise ValueError(
            f"beta={beta!r} must lie in (0, 2) and differ from 1 (the reversal divides by 1 - beta)"
        )
