"""Every experiment YAML loads, counts the paper's parameters, and builds and runs at tiny sizes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deqlm.config import load_config
from deqlm.models import build_model
from deqlm.params import count_experiment, main

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p for d in ("ptb", "wt103", "copy") for p in (ROOT / "experiments" / d).glob("*.yaml"))

# (file, params_total, params_nonembedding or None, relative tolerance): docs/paper.md §1-2
EXPECTED = [
    ("wt103/transformer_deq_medium_adaptive.yaml", 98e6, 70e6, 0.03),
    ("wt103/transformer_unrolled_base.yaml", 151e6, None, 0.01),
    ("wt103/trellisnet_deq.yaml", 174e6, None, 0.02),
    ("wt103/trellisnet_unrolled.yaml", 180e6, 45e6, 0.06),
    ("ptb/trellisnet_deq.yaml", 24e6, 20e6, 0.05),
    ("ptb/trellisnet_unrolled.yaml", 24e6, 20e6, 0.05),
    ("wt103/transformer_deq_small.yaml", 138e6, 4.5e6, 0.02),
    ("wt103/transformer_unrolled_small.yaml", 139e6, 4.9e6, 0.02),
    ("wt103/transformer_deq_medium.yaml", 172e6, 43e6, 0.02),
    ("wt103/transformer_unrolled_medium.yaml", 165e6, 44e6, 0.02),
    ("copy/transformer_deq.yaml", 14e3, None, 0.05),
]


def _tiny_overrides(cfg) -> tuple[list[str], int]:
    m = cfg.model
    vocab = 10 if cfg.data.dataset == "copy" else 30
    ov = [
        "model.n_layer=3",
        "model.pretrain_depth=2",
        "deq.f_max_iter=4",
        "deq.b_max_iter=4",
        "model.mem_len=4",
        "model.aux_every=2",
    ]
    if m.arch == "transformer":
        ov += [
            "model.d_model=16",
            "model.d_embed=64" if m.adaptive else "model.d_embed=16",
            "model.n_head=2",
            "model.d_head=8",
            "model.d_inner=24",
        ]
    else:
        ov += ["model.d_model=8", "model.d_embed=8", "model.d_out=6"]
    if m.adaptive:
        ov.append("model.cutoffs=[5,10,15]")
    return ov, vocab


def test_every_paper_row_has_an_experiment_file():
    names = {p.relative_to(ROOT / "experiments").as_posix() for p in EXPERIMENTS}
    expected = {f for f, *_ in EXPECTED} | {
        "wt103/transformer_unrolled_small_tied.yaml",
        "wt103/transformer_unrolled_medium_adaptive.yaml",
        "wt103/trellisnet_unrolled_ckpt.yaml",
        "copy/transformer_unrolled.yaml",
    }
    assert expected <= names


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_experiment_loads_and_a_tiny_version_trains_one_step(path):
    cfg = load_config(path, env={})
    assert cfg.name and cfg.log.wandb_mode == "disabled"  # wandb only when asked (WANDB_MODE, log.wandb_mode)
    ov, vocab = _tiny_overrides(cfg)
    tiny = load_config(path, ov)
    torch.manual_seed(0)
    model = build_model(tiny.model, tiny.deq, vocab_size=vocab)
    x = torch.randint(0, vocab, (2, 6))
    out = model(x, x, model.init_mems(2), step=0)
    out.loss.backward()
    out = model(x, x, out.mems, step=10**9)
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("rel,total,nonemb,tol", EXPECTED, ids=[e[0] for e in EXPECTED])
def test_parameter_count_matches_the_paper(rel, total, nonemb, tol):
    counts = count_experiment(str(ROOT / "experiments" / rel))
    assert abs(counts["params_total"] / total - 1) < tol, counts
    if nonemb is not None:
        assert abs(counts["params_nonembedding"] / nonemb - 1) < tol, counts


def test_params_cli_prints_one_json_line_and_rejects_bad_keys(capsys):
    assert main([str(ROOT / "experiments/copy/transformer_unrolled.yaml"), "model.n_layer=1"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("{") and '"params_total"' in line and "\n" not in line
    assert main([str(ROOT / "experiments/copy/transformer_unrolled.yaml"), "model.nope=1"]) == 2
    assert "model.nope" in capsys.readouterr().err


# the pair of record (experiments/ptb/cpu/), the d_model 128 family kept beside it (d128/) and the GPU width
# study (gpu/, scripts/gpu_width_study.sh); a folder's files pair among themselves
PTB_PAIRS = {
    p: load_config(p, env={})
    for folder in ("experiments/ptb/cpu", "experiments/ptb/cpu/d128", "experiments/ptb/gpu")
    for p in sorted((ROOT / folder).glob("*.yaml"))
    if not p.stem.endswith("base")
}


PTB_PAIR_DEQS = [p for p, c in PTB_PAIRS.items() if c.model.core == "deq"]


def _baselines(path: Path) -> list[Path]:
    """The unrolled runs sharing a DEQ's folder and pair name."""
    deq = PTB_PAIRS[path]
    return [
        p for p, c in PTB_PAIRS.items()
        if p.parent == path.parent and c.pair == deq.pair and c.model.core == "unrolled"
    ]


def _nonembedding(path: Path) -> int:
    return count_experiment(str(path))["params_nonembedding"]


@pytest.mark.parametrize("path", PTB_PAIR_DEQS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_ptb_deq_and_its_unrolled_baseline_are_a_fair_pair(path):
    """Same token budget as every baseline it pairs with, and exactly one of them with non-embedding
    parameters within 5% (issues 16, 19): its fair baseline. Others (the GPU study's 8-layer baseline) are
    deeper stacks the report also compares it with."""
    deq = PTB_PAIRS[path]
    baselines = _baselines(path)
    assert baselines, deq.pair

    def budget(c):
        return c.train.max_steps, c.data.batch_size, c.data.tgt_len

    assert all(budget(deq) == budget(PTB_PAIRS[b]) for b in baselines)
    ratios = [_nonembedding(path) / _nonembedding(b) for b in baselines]
    assert sum(abs(r - 1) <= 0.05 for r in ratios) == 1, dict(zip(baselines, ratios, strict=True))


GPU_PTB_DEQS = [p for p in PTB_PAIR_DEQS if p.parent.name == "gpu"]


@pytest.mark.parametrize("path", GPU_PTB_DEQS, ids=lambda p: p.stem)
def test_gpu_width_study_pairs_differ_only_in_core_depth_and_ffn(path):
    """No sweep on the GPU: a DEQ and its baselines share data, optimiser, training, evaluation, width and
    every dropout, the settings of the CPU pair of record."""
    record = load_config(ROOT / "experiments/ptb/cpu/transformer_deq.yaml", env={})
    deq = PTB_PAIRS[path]
    assert deq.train.device == "cuda" and deq.pair.startswith("ptb_gpu_transformer_d")
    dropouts = ("dropout", "dropouti", "dropout_out", "dropatt")
    same_model = (*dropouts, "arch", "d_model", "d_embed", "n_head", "d_head", "mem_len", "weight_norm",
                  "tie_weight", "init_std", "pre_ln")  # fmt: skip
    for b in _baselines(path):
        base = PTB_PAIRS[b]
        for section in ("data", "optim", "train", "eval"):
            assert getattr(deq, section) == getattr(base, section), (b.stem, section)
        assert all(getattr(deq.model, k) == getattr(base.model, k) for k in same_model), b.stem
        assert deq.model.d_model == 32 * deq.model.n_head == int(deq.pair.rsplit("_d", 1)[1])
    for section in ("data", "optim", "deq"):
        assert getattr(deq, section) == getattr(record, section), section
    assert deq.train.max_steps == record.train.max_steps
    for k in (*dropouts, "input_path", "pretrain_steps", "pretrain_depth"):
        assert getattr(deq.model, k) == getattr(record.model, k), k
