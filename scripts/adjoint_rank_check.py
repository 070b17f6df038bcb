"""Forward and adjoint solves of a trained DEQ run at several Broyden ranks, on the same training batches.

    python scripts/adjoint_rank_check.py RUN_DIR [--ranks 10 30] [--batches 6] [--out FILE.json]

Loads RUN_DIR's checkpoint and config, and for each rank rebuilds the model from the checkpoint and runs
`--batches` training steps' forward and backward (same seed, same batches, gradients discarded), recording
per step the forward and adjoint solver steps and final relative residuals. The question it answers: does a
smaller rank (less solver memory) cost this model accuracy in either solve? (On the solver benchmark's
Transformer block it does in the adjoint solve: docs/solvers.md, "Choosing the rank".)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from deqlm.infra.io import atomic_write_json
from deqlm.infra.run_folder import RunFolder

_LATE_STEP = 10**9  # past any pretraining: DEQ mode


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--ranks", type=int, nargs="+", default=[10, 30])
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    # torch and the model code load only now, once the arguments are understood: `--help` answers at once
    import torch

    from deqlm.data.dataset import build_dataset
    from deqlm.models import build_model

    torch.set_num_threads(args.threads)
    folder = RunFolder(args.run_dir)
    cfg = folder.config()
    dataset = build_dataset(cfg.data)
    _, ckpt = folder.load_eval_checkpoint()
    lines = []
    for rank in args.ranks:
        torch.manual_seed(0)
        model = build_model(cfg.model, cfg.deq, vocab_size=dataset.vocab_size)
        model.load_state_dict(ckpt["model"])
        model.train()
        deq = model.core.deq
        deq.solver_kwargs.setdefault("broyden", {})["rank"] = rank
        batches = dataset.train_iterator(cfg.data.batch_size, cfg.data.tgt_len)
        mems = model.init_mems(cfg.data.batch_size)
        steps = []
        for _ in range(args.batches):
            x_BL, y_BL = next(batches)
            out = model(x_BL, y_BL, mems, step=_LATE_STEP)
            out.loss.backward()
            model.zero_grad(set_to_none=True)
            mems = out.mems
            steps.append({k: out.stats.get(k) for k in ("f_nstep", "f_rel_res", "b_nstep", "b_rel_res")})
        line = {"run": str(args.run_dir), "rank": rank, "f_solver": deq.f_solver, "b_solver": deq.b_solver,
                "f_max_iter": deq.f_max_iter, "b_max_iter": deq.b_max_iter, "f_tol": deq.f_tol,
                "b_tol": deq.b_tol, "steps": steps}
        print(json.dumps(line), flush=True)
        lines.append(line)
    if args.out is not None:
        atomic_write_json(args.out, lines, indent=1)


if __name__ == "__main__":
    main()
