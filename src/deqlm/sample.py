"""Text from a trained language model, and what each generated token costs the DEQ's solver.

    python -m deqlm.sample RUN [--prompt TEXT] [--tokens N] [--temperature T] [--top-k K] [--seed S]
                           [--warm-start] [--device cpu|cuda]

The run's evaluated checkpoint (best, else last) runs in its own mode (unrolled, pretraining or DEQ) with the
evaluation settings (`deqlm.eval.settings`: memory, clamp, forward solver cap and tolerance). Tokens go in one
at a time and the Transformer-XL memory is carried from token to token, so scoring a text here gives the
evaluator's per-token log-probabilities at `eval.tgt_len=1`. A DEQ solves one fixed point per token; with
`--warm-start` each solve starts from the previous position's equilibrium instead of the cell's own initial
state (zeros), which can save solver steps when neighbouring equilibria are close (docs/evaluation.md,
`python -m deqlm.sample`, measures it).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field

from deqlm.infra.allocator import tune_allocator
from deqlm.infra.exits import BAD_INPUT, OK, error, warn
from deqlm.infra.run_folder import RunError, RunFolder

UNK = "<unk>"


@dataclass
class Decoded:
    """What one pass over a token sequence produced: log-probabilities of the tokens that were fed or drawn,
    the solver steps of each position, and the seconds the generated part took."""

    ids: list[int]
    logp: list[float] = field(default_factory=list)  # log p(ids[t + 1] | ids[:t + 1])
    f_nstep: list[float] = field(default_factory=list)  # forward solver steps of each position (DEQ only)
    gen_s: float = 0.0  # wall seconds of the generated tokens


def encode_prompt(vocab, text: str) -> tuple[list[int], list[str]]:
    """The prompt's ids after a leading <eos> (a sentence boundary), and the words the vocabulary lacks
    (mapped to <unk>). A subword vocabulary has no unknown words."""
    if vocab.kind == "sentencepiece":
        return [vocab.eos_id, *vocab.sp.encode(text)], []
    ids, unknown = [vocab.eos_id], []
    for word in text.split():
        if word not in vocab.stoi:
            unknown.append(word)
            if vocab.unk_id is None:
                raise ValueError(f"prompt word {word!r} is not in the vocabulary, which has no {UNK}")
        ids.append(vocab.stoi.get(word, vocab.unk_id))
    return ids, unknown


def decode(vocab, ids: list[int]) -> str:
    """Text of `ids`: words joined by spaces (subword pieces as the tokenizer joins them), <eos> a newline."""
    lines, line = [], []
    for i in ids:
        if i == vocab.eos_id:
            lines.append(line)
            line = []
        else:
            line.append(i)
    lines.append(line)
    if vocab.kind == "sentencepiece":
        return "\n".join(vocab.sp.decode(piece_ids) for piece_ids in lines)
    return "\n".join(" ".join(vocab.symbols[i] for i in words) for words in lines)


def run_tokens(run, ids: list[int], n_new: int = 0, *, temperature: float = 1.0, top_k: int = 0,
               seed: int = 0, warm_start: bool = False) -> Decoded:
    """Feed `ids` one token at a time, then draw `n_new` more (temperature, top-k), the memory carried
    throughout; `run` is a `deqlm.eval.perplexity.LoadedRun`."""
    import torch

    model, s, device = run.model, run.settings, run.device
    gen = torch.Generator().manual_seed(seed)
    out = Decoded(list(ids))
    mems, z, t = model.init_mems(1), None, 0
    call = s.model_kwargs()
    positions = len(ids) - 1 + n_new  # each predicts the token after it
    with torch.no_grad():
        while t < positions:
            if t == len(ids) - 1:
                t0 = time.perf_counter()
            x = torch.tensor([[out.ids[t]]], device=device)
            solver = dict(call["solver"] or {}, **({"z0": z} if warm_start and z is not None else {}))
            logp_V, core = model.next_token_logp(x, mems, run.step, mem_len=s.mem_len, clamp_len=s.clamp_len,
                                                 solver=solver or None)
            logp_V, mems, z = logp_V[0, -1].float().cpu(), core.mems, core.z
            if "f_nstep" in core.stats:
                out.f_nstep.append(float(core.stats["f_nstep"]))
            if t + 1 >= len(out.ids):
                out.ids.append(_draw(logp_V, temperature, top_k, gen))
            out.logp.append(float(logp_V[out.ids[t + 1]]))
            t += 1
    out.gen_s = time.perf_counter() - t0 if n_new else 0.0
    return out


def _draw(logp_V, temperature: float, top_k: int, gen) -> int:
    """One token from softmax(logp / temperature), kept to the `top_k` most likely (0: all); temperature 0
    takes the most likely."""
    import torch

    if temperature == 0:
        return int(logp_V.argmax())
    scores = logp_V / temperature
    if 0 < top_k < scores.numel():
        kth = torch.topk(scores, top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    return int(torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=gen))


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m deqlm.sample", description=__doc__.splitlines()[0])
    p.add_argument("run", help="a run folder with a checkpoint (results/runs/<corpus>/<experiment>/<stamp>)")
    p.add_argument("--prompt", default="", help="text to continue (default: start of a sentence)")
    p.add_argument("--tokens", type=int, default=50, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (0: the most likely)")
    p.add_argument("--top-k", type=int, default=0, help="draw among the k most likely tokens (0: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws")
    p.add_argument("--warm-start", action="store_true", help="start each solve from the previous equilibrium")
    p.add_argument("--device", default="", help="cpu or cuda (default: the run's train.device)")
    args = p.parse_args(argv)
    if args.tokens < 1 or args.temperature < 0 or args.top_k < 0:
        p.error("--tokens must be positive, --temperature and --top-k non-negative")
    return args


def _summary(d: Decoded, n_new: int, warm_start: bool) -> str:
    speed = f"{n_new / d.gen_s:.1f} tokens/s" if d.gen_s > 0 else "-"
    if not d.f_nstep:
        return f"{n_new} tokens, {speed}; no solver (unrolled model)"
    mean = sum(d.f_nstep) / len(d.f_nstep)
    return (f"{n_new} tokens, {speed}; {mean:.2f} forward solver steps per token "
            f"({'warm start' if warm_start else 'cold start'}, {len(d.f_nstep)} solves)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # torch-side imports after the arguments are understood, so that --help answers at once
    from deqlm.eval.perplexity import load_run  # noqa: PLC0415
    from deqlm.eval.settings import EvalRequest  # noqa: PLC0415

    try:
        run = load_run(RunFolder(args.run), EvalRequest(device=args.device))
        vocab = getattr(run.dataset, "vocab", None)
        if vocab is None:
            raise RunError(args.run, "not a language model (a classifier such as copy memory has no text)")
        ids, unknown = encode_prompt(vocab, args.prompt)
    except (RunError, ValueError) as exc:
        return error(str(exc), BAD_INPUT)
    if unknown:
        warn(f"{len(unknown)} prompt word(s) not in the vocabulary, read as {UNK}: {' '.join(unknown[:5])}")
    out = run_tokens(run, ids, args.tokens, temperature=args.temperature, top_k=args.top_k, seed=args.seed,
                     warm_start=args.warm_start)
    print(decode(vocab, out.ids[1:]))
    print(_summary(out, args.tokens, args.warm_start), file=sys.stderr)
    return OK


if __name__ == "__main__":
    tune_allocator()
    raise SystemExit(main())
