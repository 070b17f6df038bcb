"""An embedded stochastic language in the WikiText file format, with a known entropy rate.

For ``make demo`` and tests: generated offline in seconds, deterministic in its seed, and built so that memory
and attention pay off. A file is a sequence of documents; each document is

    " \\n"  " = S = \\n"  " \\n"  then P >= 1 paragraphs, each a line of sentences followed by " \\n"

and a sentence is ``w1 .. wn .`` (n >= 1). The generating process, token by token (every line ends in <eos>):

* document: subject S uniform over the N_ent entity names; the document's entity set is S plus E-1 other
  entities drawn uniformly without replacement (latent; only mentions reveal it). Topic k0 uniform over K.
* each sentence start: the hidden topic stays with prob 1-rho, else jumps uniformly to one of the other K-1.
* each word, given topic k and previous word u: an entity mention, uniform over the document's set (prob
  gamma); the successor succ(u) of a content word u, a fixed random map (prob beta, only after a content
  word); else a content word from the topic's Zipfian distribution p_k (a mix of a shared and a topic Zipf).
* after each word "." ends the sentence with prob q; after "." the line ends with prob p_line; after a
  paragraph's blank line the document ends with prob p_doc.

Long-range structure: the topic persists over ~1/rho sentences (~100 tokens), and entities recur across a
whole document (hundreds of tokens), first mentioned by name in the heading.

Entropy rate: the exact predictive distribution p(w_t | w_<t) of this process is computable: the structure
(line kinds, sentence boundaries) is visible in the text; the entity set is exchangeable, so given the d
distinct entities seen so far a mention is a given seen one with prob 1/E and a given unseen one with prob
(E-d)/(E(N_ent-d)); the hidden topic is tracked exactly by a K-state forward filter. ``oracle_nll`` therefore
scores a text with the true conditional probabilities, and -1/n log p(w_1..n) converges to the entropy rate
(Shannon-McMillan-Breiman), so its value on the generated splits (all three together, ~1.2x the train size) is
a sound estimate of the rate, and its value on a split is the best expected NLL any model can get there.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from deqlm.data.errors import DataError
from deqlm.data.tokenizers import count_file

SPLIT_SEEDS = {"train": 1, "valid": 2, "test": 3}
FORMAT_VERSION = 1  # bump when the generating process changes (regenerates existing folders)
_CONS, _VOWELS = "bdfgklmnprstvz", "aeiou"
# line-level states of the oracle: what a blank line moves each state to
_AFTER_BLANK = {"start": "doc_blank", "heading": "heading_blank", "para_line": "para_blank",
                "para_blank": "doc_blank"}


@dataclass(frozen=True)
class SynthParams:
    seed: int = 1234  # everything below is drawn from this seed
    vocab: int = 200  # word types without <eos>: "=", ".", entities and content words
    train_tokens: int = 200000  # the train split is cut at the first document end past this many tokens
    n_topics: int = 8  # K hidden topics
    rho: float = 0.1  # topic switch probability per sentence
    zipf_s: float = 1.1  # Zipf exponent of the content-word distributions
    topic_share: float = 0.6  # weight of the topic-specific Zipf in p_k (the rest is shared by all topics)
    gamma: float = 0.1  # probability that a word is an entity mention
    beta: float = 0.3  # probability that a word after a content word is its successor
    n_entity_frac: float = 0.2  # N_ent = this fraction of vocab
    doc_entities: int = 4  # E entities per document (subject included)
    q: float = 0.125  # sentence end probability after each word (mean 8 words)
    p_line: float = 0.3  # paragraph (line) end probability after a sentence
    p_doc: float = 0.2  # document end probability after a paragraph

    @property
    def n_entities(self) -> int:
        return max(self.doc_entities + 1, int(self.vocab * self.n_entity_frac))

    @property
    def n_content(self) -> int:
        return self.vocab - 2 - self.n_entities


class SynthLanguage:
    """The fixed parameters of the language (names, topic distributions, successor map) for one seed."""

    def __init__(self, p: SynthParams):
        if p.n_content < 10:
            raise DataError(f"data.synth_vocab={p.vocab} is too small (need at least {p.n_entities + 12})")
        self.p = p
        rng = np.random.default_rng([p.seed, 0])
        names = _unique_names(rng, p.n_entities + p.n_content)
        self.entities = [n.capitalize() for n in names[: p.n_entities]]
        self.content = names[p.n_entities :]
        Vc, K = p.n_content, p.n_topics
        zipf = 1.0 / np.arange(1, Vc + 1) ** p.zipf_s
        zipf /= zipf.sum()
        shared = zipf[np.argsort(rng.permutation(Vc))]  # shared[w] = zipf[rank of w]
        self.topic_VK = np.empty((Vc, K))
        for k in range(K):
            own = zipf[np.argsort(rng.permutation(Vc))]
            self.topic_VK[:, k] = (1 - p.topic_share) * shared + p.topic_share * own
        offset = rng.integers(1, Vc, size=Vc)
        self.succ = (np.arange(Vc) + offset) % Vc  # never a word's own successor
        self.topic_cdf = [np.cumsum(self.topic_VK[:, k]).tolist() for k in range(K)]
        self.entity_id = {w: i for i, w in enumerate(self.entities)}
        self.content_id = {w: i for i, w in enumerate(self.content)}


def _unique_names(rng: np.random.Generator, n: int) -> list[str]:
    seen: dict[str, None] = {}
    while len(seen) < n:
        n_syl = int(rng.integers(1, 4)) + len(seen) // 2000  # longer names once short ones run out
        name = "".join(_CONS[rng.integers(len(_CONS))] + _VOWELS[rng.integers(len(_VOWELS))]
                       for _ in range(n_syl))
        seen.setdefault(name, None)
    return list(seen)


class _Uniforms:
    """Uniform draws from a seeded generator, fetched in blocks (one numpy call per 64K draws)."""

    def __init__(self, rng: np.random.Generator):
        self.rng, self.buf, self.i = rng, [], 0

    def __call__(self) -> float:
        if self.i >= len(self.buf):
            self.buf, self.i = self.rng.random(1 << 16).tolist(), 0
        self.i += 1
        return self.buf[self.i - 1]


def generate_lines(lang: SynthLanguage, split: str, n_tokens: int) -> list[str]:
    """The lines of one split (WikiText format), whole documents until at least ``n_tokens`` tokens."""
    p = lang.p
    rng = np.random.default_rng([p.seed, SPLIT_SEEDS[split]])
    u = _Uniforms(rng)
    K, n_ent = p.n_topics, p.n_entities
    lines: list[str] = []
    total = 0
    while total < n_tokens:
        subject = int(rng.integers(n_ent))
        others = rng.choice(np.delete(np.arange(n_ent), subject), size=p.doc_entities - 1, replace=False)
        doc_ents = [subject] + others.tolist()
        topic = int(rng.integers(K))
        lines += [" \n", f" = {lang.entities[subject]} = \n", " \n"]
        total += 1 + 4 + 1
        while True:  # paragraphs
            words: list[str] = []
            while True:  # sentences
                if u() < p.rho:
                    topic = (topic + 1 + int(u() * (K - 1))) % K
                prev = -1  # content id of the previous word, -1 if none or an entity
                while True:  # words
                    r = u()
                    if r < p.gamma:
                        words.append(lang.entities[doc_ents[int(u() * p.doc_entities)]])
                        prev = -1
                    else:
                        if prev >= 0 and r < p.gamma + p.beta:
                            prev = int(lang.succ[prev])
                        else:
                            prev = min(bisect.bisect(lang.topic_cdf[topic], u()), p.n_content - 1)
                        words.append(lang.content[prev])
                    if u() < p.q:
                        break
                words.append(".")
                if u() < p.p_line:
                    break
            lines += [" " + " ".join(words) + " \n", " \n"]
            total += len(words) + 2
            if u() < p.p_doc:
                break
    return lines


def oracle_nll(lang: SynthLanguage, lines: Iterable[str]) -> tuple[float, int]:
    """(total NLL in nats, tokens incl. <eos>) of a text under the true predictive distribution."""
    p = lang.p
    nll, n_tok = 0.0, 0
    state = "start"  # start | doc_blank | heading | heading_blank | para_line | para_blank
    doc = _DocState(np.full(p.n_topics, 1.0 / p.n_topics), set())
    for line in lines:
        toks = line.split()
        n_tok += len(toks) + 1
        if not toks:  # a blank line: its <eos> is certain, except where it starts a new document
            if state == "para_blank":
                nll -= math.log(p.p_doc)
            elif state not in ("start", "heading", "para_line"):
                raise _not_in_language(line)
            state = _AFTER_BLANK[state]
            continue
        if state == "doc_blank":  # heading " = S = "
            if len(toks) != 3 or toks[0] != "=" or toks[2] != "=" or toks[1] not in lang.entity_id:
                raise _not_in_language(line)
            nll += math.log(p.n_entities)
            doc = _DocState(np.full(p.n_topics, 1.0 / p.n_topics), {lang.entity_id[toks[1]]})
            state = "heading"
            continue
        if state == "para_blank":
            nll -= math.log(1.0 - p.p_doc)
        elif state != "heading_blank":
            raise _not_in_language(line)
        nll = _paragraph_nll(lang, doc, toks, line, nll)
        state = "para_line"
    return nll, n_tok


@dataclass
class _DocState:
    """What the oracle knows inside a document: the topic belief (K,) and the entities mentioned so far."""

    belief: np.ndarray
    seen: set[int]


def _not_in_language(line: str) -> DataError:
    return DataError(f"synthetic oracle: line {line!r} is not in the language")


def _paragraph_nll(lang: SynthLanguage, doc: _DocState, toks: list[str], line: str, nll: float) -> float:
    """`nll` plus that of one paragraph line (sentences "w .. w ." then <eos>), added term by term as the text
    is read; updates the document's topic belief and mentioned entities."""
    p = lang.p
    E, stay, jump = p.doc_entities, 1.0 - p.rho, p.rho / (p.n_topics - 1)
    if toks[-1] != ".":
        raise _not_in_language(line)
    prev = -2  # -2: sentence start, -1: after an entity, >=0: content id
    for tok in toks:
        if tok == ".":
            if prev == -2:
                raise _not_in_language(line)
            nll -= math.log(p.q)
            prev = -2
            continue
        if prev == -2:
            doc.belief = stay * doc.belief + jump * (1.0 - doc.belief)  # topic transition at a sentence start
        else:
            nll -= math.log(1.0 - p.q)
        beta = p.beta if prev >= 0 else 0.0
        if tok in lang.entity_id:
            e, d = lang.entity_id[tok], len(doc.seen)
            pw = p.gamma * (1.0 / E if e in doc.seen else (E - d) / (E * (p.n_entities - d)))
            if pw <= 0:
                raise _not_in_language(line)
            nll -= math.log(pw)
            doc.seen.add(e)
            prev = -1
            continue
        if tok not in lang.content_id:
            raise _not_in_language(line)
        c = lang.content_id[tok]
        succ_p = beta if prev >= 0 and lang.succ[prev] == c else 0.0
        lik_K = (1.0 - p.gamma - beta) * lang.topic_VK[c] + succ_p
        pw = float(doc.belief @ lik_K)
        nll -= math.log(pw)
        doc.belief = doc.belief * lik_K / pw
        prev = c
    # after the last ".": the line ends (p_line); after every other ".": a sentence follows (1 - p_line)
    n_sent = toks.count(".")
    return nll - (math.log(p.p_line) + (n_sent - 1) * math.log(1.0 - p.p_line))


def unigram_entropy(lines: Iterable[str]) -> float:
    """Entropy (nats/token incl. <eos>) of a text's own unigram distribution: no unigram model does better."""
    counts: Counter[str] = Counter()
    for line in lines:
        counts.update(line.split())
        counts["<eos>"] += 1
    n = sum(counts.values())
    return -sum(c / n * math.log(c / n) for c in counts.values())


def synthetic_dir(data_dir: str | os.PathLike, seed: int) -> Path:
    return Path(data_dir) / f"synthetic-{seed}"


def _holds(out: Path, wanted: dict) -> bool:
    """Whether the corpus folder was generated with exactly these settings."""
    try:
        return json.loads((out / "SOURCE.json").read_text())["params"] == wanted
    except (OSError, ValueError, KeyError):
        return False


def _install(tmp: Path, out: Path, wanted: dict) -> None:
    """Rename the finished folder into place. A folder of other settings is replaced (its cache goes with it);
    one a concurrent run has just written with the same settings is kept (it may be caching into it)."""
    if _holds(out, wanted):
        return
    if out.exists():
        trash = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-old-"))
        os.rename(out, trash / "old")
        shutil.rmtree(trash, ignore_errors=True)
    try:
        os.rename(tmp, out)
    except OSError:
        if not (out / "SOURCE.json").is_file():  # a concurrent writer of the same folder won the race
            raise


def ensure_synthetic(data_dir: str | os.PathLike, seed: int = 1234, vocab: int = 200,
                     train_tokens: int = 200000) -> Path:
    """``<data_dir>/synthetic-<seed>/`` with wiki.{train,valid,test}.tokens and SOURCE.json, generated on
    first use (or again when the size settings differ); written to a temp folder and renamed into place."""
    if train_tokens < 1000:
        raise DataError(f"data.synth_train_tokens={train_tokens} is too small (at least 1000)")
    params = SynthParams(seed=seed, vocab=vocab, train_tokens=train_tokens)
    out = synthetic_dir(data_dir, seed)
    wanted = {**asdict(params), "format_version": FORMAT_VERSION}
    if _holds(out, wanted):
        return out
    lang = SynthLanguage(params)
    n_eval = max(train_tokens // 10, 2000)
    sizes = {"train": train_tokens, "valid": n_eval, "test": n_eval}
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=data_dir, prefix=f".{out.name}-"))
    os.chmod(tmp, 0o755)
    try:
        files, oracle, total_nll, total_tok = {}, {}, 0.0, 0
        train_words: set[str] = set()
        for split, n in sizes.items():
            lines = generate_lines(lang, split, n)
            words = {w for line in lines for w in line.split()}
            if split == "train":
                train_words = words
            elif not words <= train_words:  # the word vocabulary is built from train (no <unk> here)
                raise DataError(
                    f"data.synth_train_tokens={train_tokens} is too small for data.synth_vocab={vocab}: "
                    f"the {split} split uses {len(words - train_words)} word type(s) that train never shows; "
                    "raise synth_train_tokens or lower synth_vocab")
            data = "".join(lines).encode("utf-8")
            path = tmp / f"wiki.{split}.tokens"
            path.write_bytes(data)
            nll, n_tok = oracle_nll(lang, lines)
            n_lines, n_words = count_file(path)
            assert n_tok == n_lines + n_words
            files[path.name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                                "lines": n_lines, "words": n_words, "tokens": n_tok}
            oracle[split] = nll / n_tok
            total_nll, total_tok = total_nll + nll, total_tok + n_tok
            if split == "train":
                uni = unigram_entropy(lines)
        source = {
            "origin": "synthetic", "generator": "deqlm.data.synthetic", "params": wanted,
            "entropy_rate": total_nll / total_tok,  # nats/token incl. <eos>: the estimate over all splits
            "oracle_nll": oracle,  # nats/token of the true model on each split: the best expected test NLL
            "oracle_ppl": {s: math.exp(v) for s, v in oracle.items()},
            "unigram_entropy_train": uni,  # nats/token: the best any unigram model could do on train
            "files": files,
        }
        (tmp / "SOURCE.json").write_text(json.dumps(source, indent=2) + "\n")
        _install(tmp, out, wanted)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_entropy_rate(corpus_dir: Path) -> float:
    return float(json.loads((corpus_dir / "SOURCE.json").read_text())["entropy_rate"])
