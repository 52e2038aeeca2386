"""From per-question yes-probabilities to one reward, with its audit record.

  semantic_mean = the semantic questions' effective scores combined   (empty list -> 1.0) by `semantic`:
                  "mean"     sum_i w_i s_i / sum_i w_i                   (the method's; w_i = 1 by default)
                  "product"  prod_i s_i ** w_i                           (a weighted geometric: one failed
                                                                          clause takes the whole prompt down)
                  "softmin"  -tau log( sum_i w_i exp(-s_i / tau) / sum_i w_i )   (-> min as tau -> 0,
                                                                          -> the mean as tau grows)
                  "min"      min_i s_i over questions with w_i > 0
                  w_i = category_weights[category of question i] (1 when not given; 0 drops the category)
  quality_mean  = mean of the quality questions' effective scores    (empty list -> 1.0)
  reward        = sqrt(semantic_mean * quality_mean)   mode="geometric" (the method's)
                  (semantic_mean + quality_mean) / 2    mode="mean"
                  min(semantic_mean, quality_mean)      mode="min"
Parent rule (DSG-style dependencies; the released code uses none):
  "none"   effective = raw score
  "zero"   effective = 0 when any parent's effective score is <= fail_below (DSG, DPG-Bench)
  "scale"  effective = raw * min over parents of their effective scores (a soft "zero")
Effective scores are computed parents first, so a failed grandparent propagates.

Verifier-side helpers: `yes_probability` turns a first token's top-k log-probs into
P(yes) / (P(yes) + P(no)), summing the variants of each word; `yes_from_text` reads generated text
when the log-probs hold neither word.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

from reward_service.schema import QuestionSet

MODES: tuple[str, ...] = ("geometric", "mean", "min")
SEMANTIC_RULES: tuple[str, ...] = ("mean", "product", "softmin", "min")
PARENT_RULES: tuple[str, ...] = ("none", "zero", "scale")
SCORE_TOLERANCE = 1e-6


@dataclass(frozen=True, kw_only=True)
class AuditRow:
    """One question's line in the audit record."""
    id: str
    text: str
    kind: str                    # "semantic" | "quality"
    category: str                # semantic category or quality aspect
    parents: tuple[str, ...]
    score: float                 # the verifier's raw yes-probability
    effective: float             # after the parent rule (what the means use)


@dataclass(frozen=True, kw_only=True)
class RewardResult:
    """A reward and everything needed to audit it."""
    # the reward
    reward: float
    semantic_mean: float
    quality_mean: float
    # how it was computed
    mode: str
    parent_rule: str
    semantic_rule: str = "mean"
    # what it was computed from
    prompt: str
    prompt_hash: str
    version: str                 # str(DecomposerVersion)
    rows: tuple[AuditRow, ...]

    def strict_pass(self, *, threshold: float = 0.5) -> bool:
        """Every semantic question's effective score > threshold (GenEval-style all-clauses-hold)."""
        return all(r.effective > threshold for r in self.rows if r.kind == "semantic")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rows"] = [asdict(r) | {"parents": list(r.parents)} for r in self.rows]
        return d

    def table(self) -> str:
        """The audit record as a fixed-width text table."""
        lines = [f"prompt: {self.prompt!r}   ({self.version}, mode={self.mode}, parent_rule={self.parent_rule})",
                 f"{'id':<4} {'kind':<8} {'category':<10} {'parents':<8} {'score':>6} {'eff':>6}  question"]
        for r in self.rows:
            lines.append(f"{r.id:<4} {r.kind:<8} {r.category:<10} {','.join(r.parents) or '-':<8} "
                         f"{r.score:6.3f} {r.effective:6.3f}  {r.text}")
        lines.append(f"semantic_mean={self.semantic_mean:.4f} quality_mean={self.quality_mean:.4f} "
                     f"reward={self.reward:.4f} strict_pass={self.strict_pass()}")
        return "\n".join(lines)


def _checked(qs: QuestionSet, scores: Sequence[float]) -> list[float]:
    if len(scores) != len(qs.questions):
        raise ValueError(f"aggregate: {len(scores)} scores for {len(qs.questions)} questions (prompt {qs.prompt!r})")
    out = []
    for q, s in zip(qs.questions, scores):
        s = float(s)
        if not (math.isfinite(s) and -SCORE_TOLERANCE <= s <= 1 + SCORE_TOLERANCE):
            raise ValueError(f"aggregate: score {s!r} of question {q.id!r} ({q.text!r}) is not in [0, 1]")
        out.append(min(1.0, max(0.0, s)))
    return out


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 1.0


def combine_semantic(scores: Sequence[float], categories: Sequence[str], *, rule: str = "mean",
                     temperature: float = 0.1, weights: Mapping[str, float] | None = None) -> float:
    """The semantic questions' effective scores as one number (see the module docstring); 1.0 for none."""
    if rule not in SEMANTIC_RULES:
        raise ValueError(f"aggregate: semantic={rule!r} is not one of {SEMANTIC_RULES}")
    w = [float(weights.get(c, 1.0)) if weights else 1.0 for c in categories]
    if any(x < 0 for x in w):
        raise ValueError(f"aggregate: category_weights must be >= 0, got {dict(weights or {})}")
    kept = [(s, x) for s, x in zip(scores, w) if x > 0]
    if not kept:
        return 1.0
    total = sum(x for _, x in kept)
    if rule == "mean":
        return sum(s * x for s, x in kept) / total
    if rule == "product":
        return math.prod(s ** x for s, x in kept)
    if rule == "min":
        return min(s for s, _ in kept)
    if not temperature > 0:
        raise ValueError(f"aggregate: softmin temperature must be > 0, got {temperature!r}")
    lo = min(s for s, _ in kept)                     # shift for a stable log-sum-exp
    return lo - temperature * math.log(sum(x * math.exp(-(s - lo) / temperature) for s, x in kept) / total)


def aggregate(qs: QuestionSet, scores: Sequence[float], *, mode: str = "geometric", parent_rule: str = "none",
              fail_below: float = 0.5, semantic: str = "mean", temperature: float = 0.1,
              category_weights: Mapping[str, float] | None = None) -> RewardResult:
    """The reward of one image from its per-question scores (aligned with `qs.questions`)."""
    if mode not in MODES:
        raise ValueError(f"aggregate: mode={mode!r} is not one of {MODES}")
    if parent_rule not in PARENT_RULES:
        raise ValueError(f"aggregate: parent_rule={parent_rule!r} is not one of {PARENT_RULES}")
    raw = _checked(qs, scores)
    index = {q.id: i for i, q in enumerate(qs.questions)}
    eff = list(raw)
    for i in qs.topological_order():
        parents = [eff[index[p]] for p in qs.questions[i].parents]
        if parents and parent_rule == "zero" and min(parents) <= fail_below:
            eff[i] = 0.0
        elif parents and parent_rule == "scale":
            eff[i] = raw[i] * min(parents)
    sem_rows = [(e, q.category) for q, e in zip(qs.questions, eff) if q.kind == "semantic"]
    sem = combine_semantic([e for e, _ in sem_rows], [c for _, c in sem_rows], rule=semantic, temperature=temperature,
                           weights=category_weights)
    qual = _mean([e for q, e in zip(qs.questions, eff) if q.kind == "quality"])
    reward = {"geometric": math.sqrt(sem * qual), "mean": (sem + qual) / 2, "min": min(sem, qual)}[mode]
    rows = tuple(AuditRow(id=q.id, text=q.text, kind=q.kind, category=q.category, parents=q.parents,
                          score=r, effective=e) for q, r, e in zip(qs.questions, raw, eff))
    return RewardResult(reward=reward, semantic_mean=sem, quality_mean=qual, mode=mode, parent_rule=parent_rule,
                        semantic_rule=semantic,
                        prompt=qs.prompt, prompt_hash=qs.prompt_hash, version=str(qs.version), rows=rows)


def _word(token: str) -> str:
    """'ĠYes.' / '▁yes' / ' YES!' -> 'yes' (tokenizer space markers, punctuation, case, space dropped).

    'Ġ' (byte-level BPE's space) is a letter to str.isalnum and is removed by name; '▁' (sentencepiece's)
    is not alphanumeric and drops with the punctuation."""
    return "".join(c for c in token.replace("Ġ", "") if c.isalnum()).lower()


def yes_probability(top_logprobs: Mapping[str, float] | Iterable[tuple[str, float]]) -> float | None:
    """P(yes) / (P(yes) + P(no)) from the first token's top-k log-probs, or None if neither word is there.

    Accepts {token: logprob} or (token, logprob) pairs (two token ids may decode to the same text)."""
    pairs = top_logprobs.items() if isinstance(top_logprobs, Mapping) else top_logprobs
    p = {"yes": 0.0, "no": 0.0}
    for token, logprob in pairs:
        w = _word(token)
        if w in p and logprob is not None and not math.isnan(logprob):
            p[w] += math.exp(min(float(logprob), 0.0))
    total = p["yes"] + p["no"]
    return p["yes"] / total if total > 0 else None


def yes_from_text(text: str) -> float:
    """1.0 / 0.0 from generated text: its first word if yes/no, else the only one of the two it contains.

    Anything else (empty, both, neither) is 0.0: an answer we cannot read earns no reward."""
    words = re.findall(r"[a-z]+", text.lower())
    if words and words[0] in ("yes", "no"):
        return 1.0 if words[0] == "yes" else 0.0
    has_yes, has_no = "yes" in words, "no" in words
    return 1.0 if has_yes and not has_no else 0.0
