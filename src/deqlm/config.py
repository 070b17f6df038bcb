"""Every configuration of deqlm: structured dataclasses, YAML with `base:` inheritance, dotlist overrides.

This is the only module that imports OmegaConf. Components take their own sub-config (`cfg.model`, `cfg.deq`,
`cfg.data`, ...) or plain arguments; only entry points see `ExperimentConfig`.

An experiment YAML holds only its differences from a base file:

    base: ../base/wt103.yaml      # path relative to this file; bases may chain
    name: transformer_deq_small
    model: {d_model: 410}

Unknown keys and values of the wrong type raise `ConfigError` with a one-line message naming the key. A
setting that picks one of a fixed set is typed with its `Literal` from deqlm.choices, so OmegaConf itself
refuses any other value; a numeric setting carries the interval it must lie in next to its default
(`ranged`). A setting left to another's value is None ("not set"), and only the code that uses it reads the
fallback (the eval settings for `eval.*`). Run folders written before a setting changed meaning still load
(`upgrade_saved`).
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from deqlm.choices import (
    Amp,
    Arch,
    Core,
    DatasetName,
    Device,
    GradSync,
    Init,
    InputPath,
    JacNorm,
    OptimizerName,
    Schedule,
    SolverName,
    StateDtype,
    StopMode,
    Tokenizer,
    WandbMode,
    check_beta,
    check_reversible_pair,
    parse_grad,
    values,
)
from deqlm.infra.io import atomic_write_text

WANDB_MODE_ENV = "WANDB_MODE"  # wandb's own switch, read by load_config


class ConfigError(ValueError):
    """A user-facing configuration problem (unknown key, bad value, missing file)."""


def ranged(default: Any, interval: str) -> Any:
    """A numeric field with its default and the interval it must lie in: "[" / "]" include the bound, "("
    / ")" exclude it. Infinite ends are always open, so NaN and infinities are refused everywhere; None
    passes (a setting left unset). A bad value would otherwise surface only deep inside a run."""
    return field(default=default, metadata={"range": interval})


@dataclass
class DEQConfig:
    """The implicit layer and its solvers (deqlm.deq.DEQFixedPoint)."""

    f_solver: SolverName = "broyden"  # forward root solver
    b_solver: SolverName = "broyden"  # backward (adjoint) solver
    f_max_iter: int = ranged(30, "[1, inf)")  # forward solver step cap ("f_thres" in the official scripts)
    b_max_iter: int = ranged(40, "[1, inf)")  # backward solver step cap ("b_thres" in the official scripts)
    # tolerance 0: the solver takes every step its cap allows (the benchmarks' "cap" setting)
    f_tol: float = ranged(1e-3, "[0, inf)")  # forward stopping tolerance, per sample, in stop_mode units
    b_tol: float = ranged(1e-3, "[0, inf)")  # backward stopping tolerance
    stop_mode: StopMode = "rel"  # rel: ||f(z)-z||/||f(z)||, abs: ||f(z)-z||
    # a string: OmegaConf types no "literal or int", so deqlm.choices.parse_grad reads it
    grad: str = "implicit"  # implicit (IFT adjoint solve) or an integer K: K phantom (unrolled) steps
    # low-rank updates Broyden keeps (oldest dropped; see docs/solvers.md)
    broyden_rank: int = ranged(30, "[1, inf)")
    anderson_m: int = ranged(6, "[1, inf)")  # Anderson history size
    anderson_beta: float = ranged(1.0, "(0, 1]")  # Anderson mixing
    # Anderson Tikhonov term, relative to the residual Gram matrix's scale
    anderson_lam: float = ranged(1e-2, "[0, inf)")
    # reversible solver (f_solver=reversible with grad=reversible): f_max_iter counts its steps, 2 f each
    reversible_beta: float = 0.5  # relaxation; the reversal divides by |1 - beta| (the paper's LM: 0.5)
    reversible_dtype: StateDtype = "float64"  # its two states' dtype; f still computes in the model's


@dataclass
class ModelConfig:
    """A SequenceLM: embedding -> core(cell) -> softmax (deqlm.models.build_model)."""

    arch: Arch = "transformer"  # the cell
    core: Core = "deq"  # deq: equilibrium solve, unrolled: a fixed stack of n_layer cells (see weight_tied)
    n_layer: int = ranged(16, "[1, inf)")  # depth of an unrolled core (ignored by deq)
    weight_tied: bool = False  # unrolled core: one cell applied n_layer times (True) or n_layer cells
    grad_checkpoint: bool = False  # unrolled core: recompute each layer in backward (gradient checkpointing)
    # deq core: the first this many steps train an unrolled weight-tied stack
    pretrain_steps: int = ranged(0, "[0, inf)")
    pretrain_depth: int = ranged(2, "[1, inf)")  # deq core: depth of that pretraining stack
    # Transformer DEQ / weight-tied cores: untied layers inside one application of f (1: the paper's single
    # layer; more is our departure, docs/models.md "Layers per cell")
    cell_layers: int = ranged(1, "[1, inf)")
    mem_len: int = ranged(150, "[0, inf)")  # Transformer memory kept across segments in training
    # sizes shared by both cells
    d_embed: int = ranged(410, "[1, inf)")  # word embedding size (TrellisNet: emsize / ninp)
    # hidden size (Transformer d_model; TrellisNet nhid: h has nhid + nout channels)
    d_model: int = ranged(410, "[1, inf)")
    # N(0, std) of embeddings, injection, head (and every weight with init=normal)
    init_std: float = ranged(0.01, "(0, inf)")
    # Transformer weights: official (as the official code really ran: attention/FFN keep PyTorch's default
    # U(+-1/sqrt(fan_in)), the injection N(0, init_std)), normal (every weight N(0, init_std))
    init: Init = "official"
    ln_affine: bool = False  # Transformer LayerNorms learn a scale and shift (official DEQ-Transformer: none)
    # injected Transformer cell: qkv (official: x enters only through q/k/v), residual (the layer's input is
    # z + x; our departure, docs/models.md)
    input_path: InputPath = "qkv"
    # residual input path: the injected layer reads z + residual_input_scale * x. The embedding enters at a
    # fraction of the post-LN state's unit scale; a larger factor weights the tokens more against the state
    residual_input_scale: float = ranged(1.0, "(0, inf)")
    weight_norm: bool = True  # weight normalisation on attention/FFN/conv weights
    # variational dropout on hidden states (mask fixed across solver steps)
    dropout: float = ranged(0.1, "[0, 1)")
    dropouti: float = ranged(0.0, "[0, 1)")  # dropout on the embedded input
    dropout_out: float = ranged(0.0, "[0, 1)")  # dropout before the softmax
    # word-level embedding dropout (whole rows), TrellisNet PTB recipe
    emb_dropout: float = ranged(0.0, "[0, 1)")
    # Transformer cell
    n_head: int = ranged(10, "[1, inf)")  # attention heads
    d_head: int = ranged(41, "[1, inf)")  # size of one head
    d_inner: int = ranged(2100, "[1, inf)")  # FFN inner size
    dropatt: float = ranged(0.0, "[0, 1)")  # attention-probability dropout
    pre_ln: bool = False  # pre-LayerNorm instead of the paper's post-LN
    # relative positions beyond this share one embedding (-1: no clamp)
    clamp_len: int = ranged(-1, "[-1, inf)")
    same_length: bool = False  # every query attends to the same number of keys
    # TrellisNet cell
    d_out: int = ranged(410, "[1, inf)")  # TrellisNet nout: the part of h fed to the softmax
    dropouth: float = ranged(0.0, "[0, 1)")  # dropout between TrellisNet layers (variational)
    wdrop: float = ranged(0.0, "[0, 1)")  # DropConnect on the TrellisNet conv weight
    # TrellisNet: row norm of the layer-to-layer conv at init (null: as drawn)
    rec_gain: float | None = ranged(None, "(0, inf)")
    # TrellisNet: row norm of the injection conv at init (null: as drawn)
    inject_gain: float | None = ranged(None, "(0, inf)")
    emb_scale: bool = False  # TrellisNet: multiply embedded inputs by sqrt(d_embed), as the Transformer does
    aux_weight: float = ranged(0.0, "[0, inf)")  # untied TrellisNet: weight of auxiliary losses
    aux_every: int = ranged(0, "[0, inf)")  # untied TrellisNet: an auxiliary loss every k layers (0: none)
    # softmax
    adaptive: bool = False  # adaptive embedding + projected adaptive log-softmax
    cutoffs: list[int] = field(default_factory=list)  # adaptive cluster boundaries (vocab ids)
    div_val: int = ranged(1, "[1, inf)")  # embedding size divisor per cluster
    tie_weight: bool = True  # tie input and output embeddings
    tie_projs: bool = True  # tie adaptive projections (except the head's, as in the official configs)
    # >0: classifier head with this many classes (copy memory) instead of an LM softmax
    n_classes: int = ranged(0, "[0, inf)")
    # Jacobian regularisation (Bai et al. 2021)
    # weight of the Jacobian penalty (jac_norm) in the loss
    jac_weight: float = ranged(0.0, "[0, inf)")
    jac_freq: float = ranged(0.0, "[0, 1]")  # probability of computing that term in a training step
    # which norm of J_f(z*) the term penalises: frobenius, the follow-up paper's ||J||_F^2 / numel
    # (Hutchinson), or spectral, the squared spectral radius per sample (power iteration; deqlm.deq.jacobian)
    jac_norm: JacNorm = "frobenius"
    jac_samples: int = ranged(1, "[1, inf)")  # Hutchinson probe vectors (frobenius)
    jac_power_iters: int = ranged(4, "[1, inf)")  # power-iteration steps, the last differentiated (spectral)


@dataclass
class DataConfig:
    """Where the tokens come from and how they are batched (deqlm.data.dataset.build_dataset)."""

    dataset: DatasetName = "synthetic"  # the corpus (or copy memory), data/<name>/ under data_dir
    data_dir: str = "data"  # root holding data/<name>/ (a corpus folder of its own when it has the files)
    tokenizer: Tokenizer = "word"  # word-level vocabulary or a sentencepiece model trained on the train split
    sp_vocab_size: int = ranged(16000, "[1, inf)")  # sentencepiece vocabulary size
    batch_size: int = ranged(16, "[1, inf)")  # global training batch (split over DDP ranks)
    tgt_len: int = ranged(150, "[1, inf)")  # training segment length
    # train a segment as this many subsequences (forward + backward each, memory passed)
    seq_splits: int = ranged(1, "[1, inf)")
    # synthetic corpus (make demo / tests)
    synth_seed: int = 1234  # seed of the embedded stochastic language
    synth_vocab: int = ranged(200, "[1, inf)")  # its vocabulary size (without <eos>)
    synth_train_tokens: int = ranged(200000, "[1, inf)")  # words in its train split
    # copy memory (docs/paper.md §1)
    copy_T: int = 400  # blank length T (sequence length T+20)
    copy_n_train: int = ranged(20000, "[1, inf)")  # training samples
    copy_n_test: int = ranged(2000, "[1, inf)")  # test samples
    # validation samples (own stream: checkpoints are chosen on them, not on test)
    copy_n_valid: int = ranged(2000, "[1, inf)")
    copy_seed: int = 1111  # data seed


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    name: OptimizerName = "adam"  # the optimizer
    lr: float = ranged(2.5e-4, "(0, inf)")  # peak learning rate
    # L2 penalty added to the gradient (torch Adam / SGD weight_decay)
    weight_decay: float = ranged(0.0, "[0, inf)")
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # Adam betas
    schedule: Schedule = "cosine"  # learning-rate schedule (docs/training.md)
    warmup_steps: int = ranged(0, "[0, inf)")  # linear warm-up steps
    min_lr: float = ranged(0.0, "[0, inf)")  # cosine floor
    decay_steps: list[int] = field(default_factory=list)  # step schedule: divide lr by 10 at these steps
    clip: float = ranged(0.25, "(-inf, inf)")  # gradient-norm clip (<=0: none)


@dataclass
class TrainConfig:
    """The training loop (deqlm.train.trainer.Trainer)."""

    max_steps: int = ranged(1000, "[1, inf)")  # optimizer steps
    log_every: int = ranged(50, "[1, inf)")  # steps between train/* log events
    eval_every: int = ranged(500, "[0, inf)")  # steps between validations (0: only at the end)
    # cap validation during training at this many tokens (0: whole split)
    eval_max_tokens: int = ranged(0, "[0, inf)")
    ckpt_every: int = ranged(500, "[0, inf)")  # steps between checkpoints (0: only at the end)
    seed: int = 1111  # global seed
    run_dir: str = "results/runs"  # run directories go under <run_dir>/<corpus>/<name>/<stamp>/
    device: Device = "auto"  # auto: CUDA when present, else the CPU
    amp: Amp = "none"  # mixed-precision autocast (CUDA only)
    compile: bool = False  # torch.compile the cell
    max_bad_steps: int = ranged(10, "[1, inf)")  # stop after this many non-finite steps in a row
    threads: int | None = ranged(None, "[1, inf)")  # torch.set_num_threads (null: leave PyTorch's default)
    grad_sync: GradSync = "ddp"  # gradient sync: ddp (DistributedDataParallel), allreduce (one flat buffer)


@dataclass
class EvalConfig:
    """Evaluation settings (training-time validation and deqlm.eval)."""

    batch_size: int = ranged(10, "[1, inf)")  # evaluation batch columns
    tgt_len: int = ranged(150, "[1, inf)")  # evaluation segment length
    mem_len: int = ranged(150, "[0, inf)")  # evaluation memory length
    clamp_len: int | None = ranged(None, "[0, inf)")  # evaluation clamp_len (null: model.clamp_len)
    # forward solver step cap in evaluation (null: deq.f_max_iter)
    f_max_iter: int | None = ranged(None, "[1, inf)")
    f_tol: float | None = ranged(None, "[0, inf)")  # forward tolerance in evaluation (null: deq.f_tol)


@dataclass
class LogConfig:
    """Where metrics go (deqlm.infra.metrics.MetricLogger)."""

    # wandb's mode; WANDB_MODE in the environment overrides the experiment file, and log.wandb_mode=... on the
    # command line overrides both
    wandb_mode: WandbMode = "disabled"
    wandb_project: str = "deqlm"  # wandb project
    progress: bool = True  # progress bar on a terminal (plain lines when not a TTY)


@dataclass
class ExperimentConfig:
    name: str = "experiment"  # experiment name (run directories and reports)
    pair: str = ""  # name shared by a DEQ run and its unrolled baseline in comparisons
    paper_row: str = ""  # the row of docs/paper.md §1 this experiment reproduces ("" if none)
    paper_test: float | None = None  # the paper's test figure for that row (ppl, or loss for copy memory)
    note: str = ""  # the experiment file's free text: where sizes come from, deviations from the paper
    # the key=value overrides the run was started (then resumed) with, in order; they may make `note` untrue
    overrides: list[str] = field(default_factory=list)
    model: ModelConfig = field(default_factory=ModelConfig)
    deq: DEQConfig = field(default_factory=DEQConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)


_BETA_RANGE = "[0, 1)"  # each of optim.betas


def _in_range(value: float, interval: str) -> bool:
    """Whether `value` lies in `interval`, written as in `ranged` ("[0, 1)", "(0, inf)")."""
    low, high = (float(end) for end in interval[1:-1].split(","))
    above = value >= low if interval[0] == "[" else value > low
    below = value <= high if interval[-1] == "]" else value < high
    return above and below


def _validate(cfg: ExperimentConfig) -> None:
    """What the field types cannot say: numeric ranges, deq.grad, optim.betas (choices OmegaConf checks)."""
    for section in dataclasses.fields(cfg):
        sub = getattr(cfg, section.name)
        for f in dataclasses.fields(sub) if dataclasses.is_dataclass(sub) else ():
            value, interval = getattr(sub, f.name), f.metadata.get("range")
            if interval and value is not None and not _in_range(value, interval):
                unset = " or null" if "None" in str(f.type) else ""
                raise ConfigError(f"{section.name}.{f.name}={value!r} must lie in {interval}{unset}")
    try:
        check_reversible_pair(cfg.deq.f_solver, parse_grad(cfg.deq.grad, "deq.grad"))
        check_beta(cfg.deq.reversible_beta)
    except ValueError as exc:
        raise ConfigError(str(exc).replace("beta=", "deq.reversible_beta=", 1)) from None
    m = cfg.model
    if m.cell_layers > 1 and (m.arch != "transformer" or (m.core == "unrolled" and not m.weight_tied)):
        raise ConfigError(
            f"model.cell_layers={m.cell_layers} needs model.arch=transformer with a deq or weight-tied core"
        )
    betas = list(cfg.optim.betas)
    if len(betas) != 2 or not all(_in_range(b, _BETA_RANGE) for b in betas):
        raise ConfigError(f"optim.betas={betas!r} must hold two numbers in {_BETA_RANGE}")


# What settings saved by older code mean now, so that every run folder's saved config loads and means what it
# meant: a "not set" marker that is now None, a setting folded into another, a setting no code read. A saved
# config is in the older form exactly when it holds data.mem_len (every older save has it, no newer one can),
# so a value that is legal now (eval.f_tol 0) is never mistaken for an older marker.
_UNSET_MARKERS = {("eval", "f_max_iter"): 0, ("eval", "f_tol"): 0, ("eval", "clamp_len"): -1,
                  ("train", "threads"): 0, ("model", "rec_gain"): 0, ("model", "inject_gain"): 0}
_FOLDED = {("deq", "eval_f_max_iter"): ("eval", "f_max_iter")}  # the old key's value, unless the new is set
_REMOVED = (("data", "mem_len"),)  # model.mem_len is the training memory


def upgrade_saved(tree: dict) -> dict:
    """A saved config (as `to_dict` wrote it) in today's form: an older one rewritten as above, a newer one
    returned as it is."""
    if "mem_len" not in (tree.get("data") or {}):
        return tree
    tree = copy.deepcopy(tree)
    for (section, key), marker in _UNSET_MARKERS.items():
        if isinstance(tree.get(section), dict) and tree[section].get(key, None) == marker:
            tree[section][key] = None
    for (section, key), (new_section, new_key) in _FOLDED.items():
        old = tree.get(section, {}).pop(key, None) if isinstance(tree.get(section), dict) else None
        if old is not None and tree.setdefault(new_section, {}).get(new_key) is None:
            tree[new_section][new_key] = old
    for section, key in _REMOVED:
        if isinstance(tree.get(section), dict):
            tree[section].pop(key, None)
    return tree


def _read_yaml_chain(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: circular 'base:' chain")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        node = OmegaConf.load(path)
    except Exception as exc:  # yaml errors come in many types
        raise ConfigError(f"{path}: cannot parse YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    if not node:  # empty, comments only or {}: training the dataclass defaults is never what was meant
        raise ConfigError(f"{path}: the file holds no settings (empty, comments only or {{}})")
    base = node.pop("base", None)
    if base is None:
        return node
    parent = _read_yaml_chain((path.parent / str(base)), seen + (path,))
    return OmegaConf.merge(parent, node)


def _merge(schema: DictConfig, *layers: Any) -> ExperimentConfig:
    try:
        merged = OmegaConf.merge(schema, *layers)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or getattr(exc, "key", None)
        msg = str(exc).splitlines()[0]
        raise ConfigError(f"bad config key {key!r}: {msg}" if key else f"bad config: {msg}") from None
    assert isinstance(cfg, ExperimentConfig)
    _validate(cfg)
    return cfg


def _environment_layer(env: Mapping[str, str]) -> dict:
    """Settings the environment asks for: wandb's own WANDB_MODE (so `WANDB_MODE=offline python -m
    deqlm.train ...` turns wandb on, and WANDB_MODE=disabled turns off what a file turned on)."""
    mode = env.get(WANDB_MODE_ENV, "").strip()
    if not mode:
        return {}
    choices = values(WandbMode)
    if mode not in choices:
        raise ConfigError(f"{WANDB_MODE_ENV}={mode!r} (environment) is not one of {', '.join(choices)}")
    return {"log": {"wandb_mode": mode}}


def _parse_saved(text: str) -> DictConfig:
    """A resolved config already read from a run folder: one YAML mapping, no ``base:`` chain."""
    try:
        node = OmegaConf.create(text)
    except Exception as exc:  # yaml errors come in many types
        raise ConfigError(f"cannot parse YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(node, DictConfig) or not node:
        raise ConfigError("expected a mapping of settings at the top level")
    return OmegaConf.create(upgrade_saved(OmegaConf.to_container(node, resolve=False)))


def load_config(
    path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = (),
    env: Mapping[str, str] | None = None, *, text: str | None = None,
) -> ExperimentConfig:
    """Load an experiment: defaults <- YAML chain (``base:``) at `path`, or a saved config's `text` <-
    environment (``env``, default os.environ) <- dotlist overrides (``key=value``): what is typed on the
    command line wins."""
    schema = OmegaConf.structured(ExperimentConfig)
    layers: list[Any] = []
    if path is not None:
        layers.append(_read_yaml_chain(Path(path)))
    if text is not None:
        layers.append(_parse_saved(text))
    from_env = _environment_layer(os.environ if env is None else env)
    if from_env:
        layers.append(OmegaConf.create(from_env))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
    if overrides:
        try:
            layers.append(OmegaConf.from_dotlist(list(overrides)))
        except OmegaConfBaseException as exc:
            raise ConfigError(f"bad override: {str(exc).splitlines()[0]}") from None
    cfg = _merge(schema, *layers)
    cfg.overrides = [*cfg.overrides, *overrides]
    return cfg


def changed_settings(saved: Mapping[str, Any], cfg: ExperimentConfig, section: str) -> list[str]:
    """'model.d_model 64 -> 128' for each setting of `section` whose value in `cfg` differs from `saved` (a
    config as `to_dict` wrote it, e.g. into a checkpoint)."""
    old, new = upgrade_saved(dict(saved)).get(section) or {}, to_dict(getattr(cfg, section))
    return [f"{section}.{key} {old[key]!r} -> {value!r}" for key, value in new.items()
            if key in old and old[key] != value]


def to_dict(cfg: Any) -> dict:
    """A plain, YAML-safe dict of a config dataclass (or DictConfig)."""
    if dataclasses.is_dataclass(cfg):
        cfg = OmegaConf.structured(cfg)
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    raise TypeError(f"cannot convert {type(cfg).__name__} to a dict")


def to_yaml(cfg: ExperimentConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: ExperimentConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically."""
    atomic_write_text(path, to_yaml(cfg))
