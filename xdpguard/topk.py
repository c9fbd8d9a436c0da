"""Heavy hitters in bounded memory: Space-Saving with forward decay.

Space-Saving (Metwally, Agrawal, El Abbadi, 2005) keeps k counters: a key
that has one adds its weight there; a key that has none takes the smallest
counter over, keeping its count as the new key's error bound. Every key
whose share of the total is above 1/k is held, whatever the number of
distinct keys: a flood from a million sources costs k rows.

Counts decay exponentially with time constant ``tau`` (forward decay,
Cormode et al., 2009: a weight arriving at t is stored as w·e^((t-t0)/tau),
and read back as of now), so a count over tau is a rate, and an attack that
stopped fades out of the list.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable
from typing import Any

import numpy as np

# Renormalise the stored counts before e^((t-t0)/tau) grows near float's reach.
_RENORM = 1e100


class TopK:
    def __init__(self, k: int, tau: float, now: float) -> None:
        self.k = k
        self.tau = tau
        self.start = now
        self._t0 = now
        self._keys: list[Hashable | None] = [None] * k
        self._index: dict[Hashable, int] = {}
        self._count = np.zeros(k)
        self._err = np.zeros(k)
        self._n = 0

    def _scale(self, now: float) -> float:
        g = math.exp((now - self._t0) / self.tau)
        if g > _RENORM:
            self._count /= g
            self._err /= g
            self._t0 = now
            g = 1.0
        return g

    def add(self, items: Iterable[tuple[Hashable, float]], now: float) -> None:
        """Count each (key, weight); weights are frames (a sample of 1 in N weighs N)."""
        g = self._scale(now)
        for key, w in items:
            i = self._index.get(key)
            if i is None:
                if self._n < self.k:
                    i = self._n
                    self._n += 1
                    self._err[i] = 0.0
                else:
                    i = int(self._count.argmin())
                    del self._index[self._keys[i]]
                    self._err[i] = self._count[i]
                self._keys[i] = key
                self._index[key] = i
            self._count[i] += w * g

    def top(self, n: int, now: float) -> list[dict[str, Any]]:
        """The ``n`` heaviest keys: rate (per second) and its error bound."""
        if not self._n:
            return []
        decay = math.exp(-(now - self._t0) / self.tau)
        # A key counted since the start has had (1 - e^(-age/tau)) of the steady state.
        age = max(now - self.start, 1e-3)
        norm = self.tau * (1.0 - math.exp(-age / self.tau))
        counts = self._count[: self._n] * decay / norm
        errs = self._err[: self._n] * decay / norm
        order = np.argsort(-counts, kind="stable")[:n]
        return [
            {"key": self._keys[i], "rate": float(counts[i]), "error": float(errs[i])}
            for i in order
            if counts[i] > 0
        ]

    def __len__(self) -> int:
        return self._n
