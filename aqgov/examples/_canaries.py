"""A generated corpus with planted canary secrets, and the exposure of a secret (Carlini et al. 2019).

Ordinary text is templated English-like sentences from a seeded generator (no downloads). The
sensitive source holds canaries "the secret code of NAME is DDDDDDDD."; a second, disjoint set of
canaries is never trained on and gives exposure's chance baseline. `training_stream` fixes the data
order of a run: which slots of which step hold a canary, and which ordinary sentence fills the slot
when sensitive data is filtered out.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy import stats

CODE_DIGITS = 8
_ADJ = (
  "old",
  "quiet",
  "green",
  "small",
  "bright",
  "heavy",
  "narrow",
  "warm",
  "cold",
  "busy",
  "empty",
  "wooden",
  "distant",
  "gentle",
  "broken",
  "sudden",
)
_NOUN = (
  "river",
  "garden",
  "teacher",
  "market",
  "window",
  "village",
  "farmer",
  "bridge",
  "letter",
  "kitchen",
  "harbor",
  "forest",
  "painter",
  "engine",
  "station",
  "library",
  "mountain",
  "child",
)
_VERB = (
  "watched",
  "carried",
  "found",
  "painted",
  "followed",
  "opened",
  "cleaned",
  "visited",
  "remembered",
  "crossed",
  "repaired",
  "described",
)
_PLACE = ("the hill", "the square", "the old road", "the coast", "the school", "the mill", "town")
_TIME = ("at dawn", "in the evening", "after lunch", "on monday", "every winter", "at night")
_SYLLABLES = (
  "ka",
  "lo",
  "mi",
  "ra",
  "te",
  "vo",
  "si",
  "da",
  "el",
  "bo",
  "no",
  "ta",
  "qu",
  "ze",
  "pa",
  "ru",
)


def _sentence(rng: np.random.Generator) -> str:
  pick = lambda xs: xs[rng.integers(len(xs))]  # noqa: E731
  kind = rng.integers(4)
  if kind == 0:
    return f"the {pick(_ADJ)} {pick(_NOUN)} {pick(_VERB)} the {pick(_NOUN)} {pick(_TIME)}."
  if kind == 1:
    return f"a {pick(_NOUN)} near {pick(_PLACE)} {pick(_VERB)} a {pick(_ADJ)} {pick(_NOUN)}."
  if kind == 2:
    return f"the {pick(_NOUN)} at {pick(_PLACE)} costs {rng.integers(2, 999)} coins."
  return f"{pick(_TIME)} the {pick(_NOUN)} was {pick(_ADJ)} and {pick(_ADJ)}."


def ordinary_sentences(rng: np.random.Generator, n: int) -> list[str]:
  """`n` ordinary sentences drawn from the templates."""
  return [_sentence(rng) for _ in range(n)]


class Canary(NamedTuple):
  """One planted secret: `prefix + code + "."` is its sentence."""

  name: str
  code: str

  @property
  def prefix(self) -> str:
    return f"the secret code of {self.name} is "

  @property
  def text(self) -> str:
    return f"{self.prefix}{self.code}."


def make_canaries(
  seed: int, trained: int = 20, held_out: int = 20
) -> tuple[list[Canary], list[Canary]]:
  """Trained and never-seen canaries with distinct names and uniformly random codes."""
  rng = np.random.default_rng([seed, 1])
  names: list[str] = []
  while len(names) < trained + held_out:
    name = "".join(rng.choice(_SYLLABLES, size=3))
    if name not in names:
      names.append(name)
  codes = ["".join(map(str, rng.integers(0, 10, CODE_DIGITS))) for _ in names]
  canaries = [Canary(n, c) for n, c in zip(names, codes)]
  return canaries[:trained], canaries[trained:]


def encode(texts: list[str], seq_len: int) -> np.ndarray:
  """Byte tokens [N, seq_len + 1], truncated or zero-padded."""
  out = np.zeros((len(texts), seq_len + 1), np.int32)
  for i, t in enumerate(texts):
    row = np.frombuffer(t.encode()[: seq_len + 1], np.uint8)
    out[i, : len(row)] = row
  return out


class Stream(NamedTuple):
  """The data order of a run: tokens [S, B, T+1] with canaries, the same with them filtered out, and
  per slot whether it is sensitive [S, B] and which trained canary it holds (-1 for none)."""

  tokens: np.ndarray
  filtered: np.ndarray
  sensitive: np.ndarray
  canary: np.ndarray


def training_stream(
  seed: int, steps: int, batch_size: int, canaries: list[Canary], seq_len: int, share: float = 0.07
) -> Stream:
  """Each slot holds a trained canary with probability `share`, else an ordinary sentence."""
  rng = np.random.default_rng([seed, 2])
  slots = steps * batch_size
  ordinary = encode(ordinary_sentences(rng, slots), seq_len)
  replacement = encode(ordinary_sentences(rng, slots), seq_len)
  sensitive = rng.random(slots) < share
  which = np.where(sensitive, rng.integers(0, len(canaries), slots), -1)
  planted = encode([c.text for c in canaries], seq_len)
  tokens = np.where(sensitive[:, None], planted[np.maximum(which, 0)], ordinary)
  filtered = np.where(sensitive[:, None], replacement, ordinary)
  shape = (steps, batch_size)
  return Stream(
    tokens.reshape(shape + (-1,)),
    filtered.reshape(shape + (-1,)),
    sensitive.reshape(shape),
    which.reshape(shape),
  )


def held_out_text(seed: int, n: int, seq_len: int) -> np.ndarray:
  """Ordinary sentences [n, T+1] from a generator no training stream uses."""
  return encode(ordinary_sentences(np.random.default_rng([seed, 3]), n), seq_len)


def candidate_codes(seed: int, n: int) -> np.ndarray:
  """`n` uniformly random codes as digit bytes [n, CODE_DIGITS] (the comparison set of exposure)."""
  digits = np.random.default_rng([seed, 4]).integers(0, 10, (n, CODE_DIGITS))
  return (digits + ord("0")).astype(np.int32)


def exposure(secret_nll: float, candidate_nll: np.ndarray) -> float:
  """log2(#candidates + 1) - log2(rank of the secret), the secret ranked among candidates by NLL.

  Ties count against the secret; a secret scored like a random candidate gets about 1 bit.
  """
  rank = 1 + int(np.sum(np.asarray(candidate_nll) <= secret_nll))
  return float(np.log2(len(candidate_nll) + 1) - np.log2(rank))


def extrapolated_exposure(secret_nll: float, candidate_nll: np.ndarray) -> float:
  """-log2 P(NLL <= secret's) under a skew-normal fitted to the candidates (moment estimates), as
  Carlini et al. do to estimate exposure beyond what the candidate count can resolve."""
  x = np.asarray(candidate_nll, np.float64)
  mean, std = x.mean(), x.std()
  if std == 0:
    return 0.0 if secret_nll > mean else float("inf")
  gamma = float(np.clip(stats.skew(x), -0.99, 0.99))
  r = np.cbrt(2 * abs(gamma) / (4 - np.pi))
  delta = np.sign(gamma) * np.sqrt(np.pi / 2 * r**2 / (1 + r**2))
  alpha = delta / np.sqrt(1 - delta**2)
  scale = std / np.sqrt(1 - 2 * delta**2 / np.pi)
  loc = mean - scale * delta * np.sqrt(2 / np.pi)
  log_cdf = stats.skewnorm.logcdf(secret_nll, alpha, loc, scale)
  return float(max(-log_cdf / np.log(2), 0.0))
