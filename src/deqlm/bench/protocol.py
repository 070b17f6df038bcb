"""What the memory and speed benchmarks measure, as plain data: the paper's rows, its protocol, the sizes.

- The paper's rows (docs/paper.md §1, Tables 2 and 3) with their memory figures and the pairs they belong to,
  and the experiment YAML that builds each (`find_experiment`).
- The protocol (batch 15, sequence 150, memory 150), the sizes (`full`, `reduced`, `quick`) and the memory
  sweep's grids.

No torch here: the benchmarks' command lines (cli.py) list rows, sizes and defaults in `--help` without
loading it. A row is built into a model by rows.py; memory.py and speed.py measure it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from deqlm.config import ConfigError, load_config

REPO_ROOT = Path(__file__).resolve().parents[3]
EXPERIMENTS_DIR = REPO_ROOT / "experiments"

# The paper's memory protocol (docs/paper.md §1): sequence length 150, batch 15, word embeddings excluded.
PAPER_BATCH = 15
PAPER_TGT_LEN = 150
PAPER_MEM_LEN = 150
# `--quick` (CI): the same protocol at seconds-long sizes
QUICK_BATCH = 2
QUICK_TGT_LEN = 8
QUICK_MEM_LEN = 8


@dataclass(frozen=True)
class PaperRow:
    """One row of docs/paper.md §1 with a memory figure; `key` is its command-line name."""

    key: str  # --row name
    row: str  # the model column of docs/paper.md §1, verbatim
    corpus: str  # ptb | wt103 (experiments/<corpus>/)
    core: str  # deq | unrolled
    paper_mem_gib: float  # the paper's memory column ("GB" in the paper)
    pairs: tuple[str, ...]  # comparisons this row takes part in (one DEQ and one unrolled row per pair)
    overrides: tuple[str, ...] = ()  # dotlist applied on top of the experiment YAML (after the protocol)
    fallback_row: str = ""  # row whose YAML (plus `overrides`) stands in when no YAML has this paper_row


PAPER_ROWS: tuple[PaperRow, ...] = (
    PaperRow("ptb-trellisnet-60l", "60-layer TrellisNet (aux loss, no MoS)", "ptb", "unrolled", 8.5,
             ("ptb-trellisnet",)),
    PaperRow("ptb-deq-trellisnet", "DEQ-TrellisNet", "ptb", "deq", 1.2, ("ptb-trellisnet",)),
    PaperRow("wt103-trellisnet-70l", "70-layer TrellisNet (aux loss)", "wt103", "unrolled", 24.7,
             ("wt103-trellisnet",)),
    PaperRow("wt103-trellisnet-70l-ckpt", "70-layer TrellisNet + gradient checkpointing", "wt103", "unrolled",
             5.2, ("wt103-trellisnet-ckpt",), ("model.grad_checkpoint=true",), "wt103-trellisnet-70l"),
    PaperRow("wt103-deq-trellisnet", "DEQ-TrellisNet", "wt103", "deq", 3.3,
             ("wt103-trellisnet", "wt103-trellisnet-ckpt")),
    PaperRow("wt103-txl-medium-16l", "Transformer-XL medium, 16 layers", "wt103", "unrolled", 8.5,
             ("wt103-transformer-medium",)),
    PaperRow("wt103-deq-transformer-medium", "DEQ-Transformer medium", "wt103", "deq", 2.7,
             ("wt103-transformer-medium",)),
    PaperRow("wt103-txl-medium-18l-adaptive", "Transformer-XL medium, 18 layers, adaptive embedding", "wt103",
             "unrolled", 9.0, ("wt103-transformer-medium-adaptive",)),
    PaperRow("wt103-deq-transformer-medium-adaptive", "DEQ-Transformer medium, adaptive embedding", "wt103",
             "deq", 3.7, ("wt103-transformer-medium-adaptive",)),
    PaperRow("wt103-txl-small-4l", "Transformer-XL small, 4 layers", "wt103", "unrolled", 4.8,
             ("wt103-transformer-small",)),
    PaperRow("wt103-txl-small-tied-16l", "Transformer-XL small, weight-tied 16 layers", "wt103", "unrolled",
             6.8, ("wt103-transformer-small-tied",)),
    PaperRow("wt103-deq-transformer-small", "DEQ-Transformer small", "wt103", "deq", 1.1,
             ("wt103-transformer-small", "wt103-transformer-small-tied")),
)
ROWS = {r.key: r for r in PAPER_ROWS}

# docs/paper.md §1 "Time" (Table 4): DEQ / unrolled time on WT103; keyed by the memory pair it compares.
PAPER_SPEED = {
    "wt103-transformer-medium-adaptive": {"train": 2.82, "infer": 1.76},  # vs 18-layer Transformer-XL
    "wt103-trellisnet": {"train": 2.40, "infer": 1.64},  # vs 70-layer TrellisNet
}


def pairs() -> dict[str, tuple[PaperRow, PaperRow]]:
    """pair name -> (DEQ row, unrolled row), in table order."""
    out: dict[str, list[PaperRow | None]] = {}
    for r in PAPER_ROWS:
        for p in r.pairs:
            slot = out.setdefault(p, [None, None])
            slot[0 if r.core == "deq" else 1] = r
    for p, (d, e) in out.items():
        assert d is not None and e is not None, f"pair {p} lacks a DEQ or an unrolled row"
    return {p: (d, e) for p, (d, e) in out.items()}  # type: ignore[misc]


def get_row(key: str) -> PaperRow:
    if key not in ROWS:
        raise ValueError(f"--row {key!r} is not one of {', '.join(ROWS)}")
    return ROWS[key]


def _norm(text: str) -> str:
    return " ".join(text.lower().replace("-", " ").replace(",", " ").split())


def find_experiment(row: PaperRow, experiments_dir: Path = EXPERIMENTS_DIR) -> tuple[Path, tuple[str, ...]]:
    """The experiment YAML whose `paper_row` names this row (and the overrides that make it this row).

    A row without a YAML of its own (e.g. gradient checkpointing) falls back to its `fallback_row`'s YAML plus
    its `overrides`. Raises FileNotFoundError with the reason when neither exists.
    """

    def scan(target: PaperRow) -> list[Path]:
        hits = []
        for path in sorted((experiments_dir / target.corpus).glob("*.yaml")):
            try:
                cfg = load_config(path)
            except ConfigError:
                continue
            # paper_row reads "CORPUS | model column | params"; the model column must match exactly
            parts = [_norm(p) for p in cfg.paper_row.split("|")]
            if _norm(target.row) in parts and cfg.model.core == target.core:
                hits.append(path)
        return hits

    hits = scan(row)
    if hits:
        return hits[0], row.overrides if not row.fallback_row else ()
    if row.fallback_row:
        base = scan(ROWS[row.fallback_row])
        if base:
            return base[0], row.overrides
    raise FileNotFoundError(f"no experiments/{row.corpus}/*.yaml has paper_row {row.row!r} (core {row.core})")


# ---------------------------------------------------------------------------------------------------------
# Sizes. `full` is the experiment YAML as the paper ran it; `reduced` keeps depth, solver limits and the
# protocol (B, L, M) but shrinks widths so a CPU finishes; `quick` is a seconds-long CI smoke size.

SIZES = ("full", "reduced", "quick")


def size_overrides(cfg, size: str) -> list[str]:
    """Dotlist that turns a full-size row config into `size` (widths only; depth and solver limits kept)."""
    if size not in SIZES:
        raise ValueError(f"--size {size!r} is not one of {', '.join(SIZES)}")
    m = cfg.model
    if size == "full":
        return []
    if size == "reduced":
        div = 4
        d_head = max(8, m.d_head // 2)
        n_head = max(1, min(m.n_head, (m.d_model // div) // d_head))
        return [f"model.d_model={max(32, m.d_model // div)}", f"model.d_embed={max(32, m.d_embed // div)}",
                f"model.d_out={max(32, m.d_out // div)}", f"model.d_inner={max(64, m.d_inner // div)}",
                f"model.n_head={n_head}", f"model.d_head={d_head}"]
    return ["model.d_model=16", "model.d_embed=16", "model.d_out=16", "model.d_inner=32", "model.n_head=2",
            "model.d_head=8", f"model.n_layer={min(m.n_layer, 3)}", "model.pretrain_depth=1",
            "deq.f_max_iter=4", "deq.b_max_iter=4"]


def protocol_overrides(batch: int, tgt_len: int, mem_len: int) -> list[str]:
    """The paper's memory protocol on any row: DEQ mode from step 0 (no unrolled pretraining), B, L, M."""
    return [f"data.batch_size={batch}", f"data.tgt_len={tgt_len}", f"model.mem_len={mem_len}",
            "data.seq_splits=1", "model.pretrain_steps=0"]


# The memory sweep's grids (`python -m deqlm.bench memory --sweep`).
SWEEP_DEPTHS = (1, 2, 4, 8, 16, 32, 48, 70)
SWEEP_SOLVER_STEPS = (5, 10, 20, 30, 40, 60)
SWEEP_SEQ_LENS = (50, 100, 150, 200, 300)
