"""Deterministic primality for 64-bit integers and the reference's prime search."""

from __future__ import annotations

from typing import Iterable

_SMALL_PRIMES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)
# Bases that make Miller-Rabin deterministic for every n < 2^64 (Sinclair, 2011).
_MR_BASES_64 = (2, 325, 9375, 28178, 450775, 9780504, 1795265022)


def is_prime(n: int) -> bool:
  """Exact primality for 0 <= n < 2^64 (deterministic Miller-Rabin)."""
  n = int(n)
  if n >= 1 << 64:
    raise ValueError(f"is_prime is exact only below 2^64, got {n}")
  if n < 2:
    return False
  for p in _SMALL_PRIMES:
    if n % p == 0:
      return n == p
  d, s = n - 1, 0
  while d % 2 == 0:
    d //= 2
    s += 1
  for a in _MR_BASES_64:
    a %= n
    if a == 0:
      continue
    x = pow(a, d, n)
    if x in (1, n - 1):
      continue
    for _ in range(s - 1):
      x = x * x % n
      if x == n - 1:
        break
    else:
      return False
  return True


def next_prime(start: int, taken: Iterable[int] | set[int] = ()) -> int:
  """Smallest prime strictly greater than `start` that is not in `taken`."""
  taken = taken if isinstance(taken, set) else set(taken)
  candidate = int(start) + 1
  while not (is_prime(candidate) and candidate not in taken):
    candidate += 1
  return candidate
