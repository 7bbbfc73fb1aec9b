"""Mean loss with a clustered standard error, and paired differences of two models.

A validation set is a list of clusters (here: sequences, one validation row each). Cluster
i holds n_i scored tokens with summed loss L_i. The token-weighted mean loss is the ratio
estimator m = sum L_i / sum n_i; its standard error is the cluster-robust (linearised,
"sandwich") one, which treats clusters, not tokens, as the independent units:

    SE(m)^2 = C / (C - 1) * sum_i (L_i - m n_i)^2 / (sum_i n_i)^2,    C = number of clusters.

Two models scored on the same tokens give per-cluster differences D_i = L_i^a - L_i^b over
the same n_i; their mean difference sum D_i / sum n_i has the same form of standard error,
which is much smaller than the SE of either mean (the clusters' difficulty cancels).

Over independent replicates (seeds), `mean_se` is the plain mean and standard error of the
per-replicate values; `clears(mean, se)` is the claim rule (|mean| > 2 SE) and
`minimum_detectable_effect(se)` the smallest true effect such a design finds with 80%
power at the 2-SE threshold (2.8 SE).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

CLAIM_SE = 2.0  # claim an effect only where |mean| > CLAIM_SE * SE
MDE_SE = 2.0 + 0.84  # two-sided 2-SE test, 80% power: the effect must be ~2.84 SE


def clustered_mean_se(loss_sums: np.ndarray, counts: np.ndarray) -> tuple[float, float]:
  """(mean, SE) of the token-weighted mean loss, clustered by the given units.

  Args:
    loss_sums: float [C], summed loss of each cluster.
    counts: float [C], scored tokens of each cluster (clusters with 0 tokens are ignored).
  Returns:
    (sum L / sum n, cluster-robust SE); SE is nan with fewer than 2 scored clusters.
  """
  loss_sums = np.asarray(loss_sums, np.float64).reshape(-1)
  counts = np.asarray(counts, np.float64).reshape(-1)
  if loss_sums.shape != counts.shape:
    raise ValueError(f"loss_sums {loss_sums.shape} and counts {counts.shape} differ in shape")
  keep = counts > 0
  loss_sums, counts = loss_sums[keep], counts[keep]
  total = counts.sum()
  if total == 0:
    raise ValueError("no scored tokens: every cluster has count 0")
  mean = float(loss_sums.sum() / total)
  c = len(counts)
  if c < 2:
    return mean, float("nan")
  resid = loss_sums - mean * counts
  se = math.sqrt(c / (c - 1) * float(np.sum(resid**2)) / total**2)
  return mean, se


def paired_difference(loss_sums_a: np.ndarray, loss_sums_b: np.ndarray, counts: np.ndarray) -> tuple[float, float]:
  """(mean, SE) of loss(a) - loss(b) per token, two models scored on the same clusters.

  Args:
    loss_sums_a, loss_sums_b: float [C], each model's summed loss per cluster.
    counts: float [C], the (shared) scored tokens per cluster.
  """
  a = np.asarray(loss_sums_a, np.float64).reshape(-1)
  b = np.asarray(loss_sums_b, np.float64).reshape(-1)
  if a.shape != b.shape:
    raise ValueError(f"the two models were scored on different sets: {a.shape} vs {b.shape} clusters")
  return clustered_mean_se(a - b, counts)


def mean_se(values: Sequence[float]) -> tuple[float, float]:
  """(mean, standard error of the mean) of independent replicate values (SE nan if n < 2)."""
  x = np.asarray(list(values), np.float64)
  if x.size == 0:
    raise ValueError("mean_se of no values")
  if x.size < 2:
    return float(x[0]), float("nan")
  return float(x.mean()), float(x.std(ddof=1) / math.sqrt(x.size))


def clears(mean: float, se: float, k: float = CLAIM_SE) -> bool:
  """The claim rule: the effect clears k standard errors (False when SE is unknown)."""
  return bool(np.isfinite(se) and abs(mean) > k * se)


def minimum_detectable_effect(se: float) -> float:
  """Smallest true effect detected with 80% power by the 2-SE rule at this SE."""
  return MDE_SE * se


def fit_slope(xs: Sequence[float], ys: Sequence[float]) -> float | None:
  """Least-squares slope of ys on xs (None with fewer than two distinct xs)."""
  x = np.asarray(list(xs), np.float64)
  y = np.asarray(list(ys), np.float64)
  if x.size < 2 or np.ptp(x) == 0:
    return None
  xc = x - x.mean()
  return float(np.sum(xc * (y - y.mean())) / np.sum(xc**2))


def format_pm(mean: float, se: float, digits: int = 4) -> str:
  """'+0.0123 ± 0.0045' (the SE part dropped when unknown)."""
  if se is None or not np.isfinite(se):
    return f"{mean:+.{digits}f}"
  return f"{mean:+.{digits}f} ± {se:.{digits}f}"
