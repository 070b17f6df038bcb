"""How far the reversible iteration gets, and what a training step costs, on a trained DEQ's own weights.

    python scripts/reversible_probe.py RUN_DIR [--out FILE.json]

RUN_DIR is a trained DEQ-Transformer or DEQ-TrellisNet run (its ckpt/). On the first validation segments
(with memory carried across them, as in evaluation) it measures, in training mode:

* the relative residual ||f(z) - z|| / ||f(z)|| after N reversible steps, for several beta and N, next to the
  run's own forward solver at its training cap (`ift`);
* the time of one training step (forward, backward) with the reversible gradient at each N (the time does not
  depend on beta), next to the run's solver with the implicit gradient at its own caps and no Jacobian
  regulariser (`ift`): medians of a few steps, interleaved so machine noise hits all alike.

This is what the reversible row's steps and beta were picked from (experiments/ptb/cpu/d128/
transformer_deq_reversible.yaml says which). One thread, as the training runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from deqlm.infra.run_folder import RunFolder

BETAS = (0.5, 0.8, 1.2)
STEPS = (2, 3, 4, 6, 8)


def _model(run_dir: Path, overrides: list[str], vocab: int, state: dict):
    """The run's model with its weights, its deq settings changed by `overrides`, in training mode."""
    from deqlm.models import build_model  # noqa: PLC0415 - torch-side, after --help has answered
    cfg = RunFolder(run_dir).resume_config(overrides)
    model = build_model(cfg.model, cfg.deq, vocab_size=vocab)
    model.load_state_dict(state)
    return model.train()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--segments", type=int, default=4, help="validation segments measured")
    ap.add_argument("--repeats", type=int, default=3, help="timed training steps per setting")
    args = ap.parse_args(argv)
    # torch-side imports after parsing, so that --help answers without torch (tests/test_cli.py)
    import torch  # noqa: PLC0415

    from deqlm.data.dataset import build_dataset  # noqa: PLC0415

    torch.set_num_threads(1)
    folder = RunFolder(args.run_dir)
    cfg = folder.config()
    state = folder.load_eval_checkpoint()[1]["model"]
    data = build_dataset(cfg.data)
    segments = data.eval_batches("valid", cfg.data.batch_size, cfg.data.tgt_len)
    batches = list(zip(range(args.segments), segments))
    settings = {"ift": ["deq.grad=implicit", "model.jac_weight=0"]}
    for beta in BETAS:
        for n in STEPS:
            settings[f"rev_b{beta}_n{n}"] = [
                "deq.f_solver=reversible", "deq.grad=reversible", f"deq.reversible_beta={beta}",
                f"deq.f_max_iter={n}", "deq.f_tol=0",
            ]
    out: dict = {"run": str(args.run_dir), "segments": args.segments, "settings": {}}
    models = {k: _model(args.run_dir, v, data.vocab_size, state) for k, v in settings.items()}
    for name, model in models.items():
        torch.manual_seed(0)
        mems, res = None, []
        with torch.no_grad():
            for _, (x, y) in batches:
                o = model(x, y, mems)
                mems = o.mems
                res.append(o.stats["f_rel_res"])
        out["settings"][name] = {"overrides": settings[name], "rel_res": statistics.fmean(res)}
    timed = ["ift"] + [f"rev_b{BETAS[0]}_n{n}" for n in STEPS]
    times: dict[str, list[float]] = {k: [] for k in timed}
    x, y = batches[0][1]
    for _ in range(args.repeats):
        for name in timed:
            model = models[name]
            t0 = time.perf_counter()
            model(x, y).loss.backward()
            times[name].append(time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)
    for name in timed:
        out["settings"][name]["train_step_s"] = round(statistics.median(times[name]), 3)
        ratio = statistics.median(times["ift"]) / statistics.median(times[name])
        out["settings"][name]["speed_vs_ift"] = round(ratio, 2)
    text = json.dumps(out, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
