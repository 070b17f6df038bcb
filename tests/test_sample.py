"""`python -m deqlm.sample`: deterministic with a seed, its per-token log-probabilities are the evaluator's,
unknown prompt words become <unk> with one warning, and it reports the solver steps each token cost."""

from __future__ import annotations

import dataclasses
import math

import pytest

from deqlm.data.tokenizers import WordVocab
from deqlm.eval.loop import evaluate
from deqlm.eval.perplexity import load_run
from deqlm.eval.settings import EvalRequest
from deqlm.infra.run_folder import RunFolder
from deqlm.sample import decode, encode_prompt, main, run_tokens
from test_eval_perplexity import make_trained_run


@pytest.fixture(scope="module", params=["unrolled", "deq"])
def loaded(request, tmp_path_factory):
    run, _ = make_trained_run(tmp_path_factory.mktemp(request.param), request.param)
    return run, load_run(RunFolder(run), EvalRequest())


def test_the_same_seed_draws_the_same_text_and_another_seed_other_text(loaded):
    _, run = loaded
    first = run_tokens(run, [0], 30, seed=3)
    assert run_tokens(run, [0], 30, seed=3).ids == first.ids
    assert run_tokens(run, [0], 30, seed=4).ids != first.ids
    assert len(first.ids) == 31 and len(first.logp) == 30


def test_per_token_log_probabilities_are_the_evaluators_at_one_token_per_segment(loaded):
    _, run = loaded
    n = 40
    ids = [int(i) for i in run.dataset.ids("test")[: n + 1]]
    scored = run_tokens(run, ids)
    settings = dataclasses.replace(run.settings, batch_size=1, tgt_len=1)
    ref = evaluate(run.model, run.dataset, "test", settings, run.step, run.device, max_tokens=n)
    assert ref["n_tokens"] == n == len(scored.logp)
    assert -sum(scored.logp) == pytest.approx(ref["nll_sum"], rel=1e-5)


def test_a_deq_reports_its_solver_steps_per_token_and_an_unrolled_model_none(loaded):
    _, run = loaded
    out = run_tokens(run, [0], 5, seed=0, warm_start=True)
    if run.cfg.model.core == "deq":
        assert len(out.f_nstep) == 5 and all(1 <= s <= run.settings.f_max_iter for s in out.f_nstep)
    else:
        assert out.f_nstep == []


def test_top_k_one_and_temperature_zero_both_take_the_most_likely_token(loaded):
    _, run = loaded
    greedy = run_tokens(run, [0], 10, temperature=0)
    assert run_tokens(run, [0], 10, top_k=1, seed=7).ids == greedy.ids
    assert all(lp <= 0 for lp in greedy.logp) and not any(math.isnan(lp) for lp in greedy.logp)


def test_unknown_prompt_words_are_read_as_unk_and_named():
    vocab = WordVocab(["<eos>", "<unk>", "the", "cat", "sat"])
    ids, unknown = encode_prompt(vocab, "the dog sat")
    assert ids == [0, 2, 1, 4] and unknown == ["dog"]
    assert decode(vocab, [2, 3, 0, 4]) == "the cat\nsat"


def test_a_vocabulary_without_unk_refuses_an_unknown_prompt_word_in_one_line(loaded, capsys):
    run_dir, _ = loaded
    assert main([str(run_dir), "--prompt", "zzzz", "--tokens", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'zzzz' is not in the vocabulary" in err[0]


def test_the_command_prints_text_and_its_speed_and_solver_figures(loaded, capsys):
    run_dir, run = loaded
    assert main([str(run_dir), "--tokens", "6", "--seed", "1"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() and "6 tokens" in err and "tokens/s" in err
    assert ("forward solver steps per token" in err) == (run.cfg.model.core == "deq")
