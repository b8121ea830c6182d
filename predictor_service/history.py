"""History baselines: forecasts from the loads of earlier passes only, as a
history-based balancer (DeepSeek's EPLB in vLLM / SGLang) would see them.

Pure and tiny: per sparse layer a list of past load vectors. A forecast is a load
distribution (sums to 1), scaled by the caller to the upcoming pass's token count.
"""

from __future__ import annotations

from collections import deque

import numpy as np

METHODS = ("last", "window", "ema")


class History:
    """Per-layer history of actual loads, and the three baselines computed from it.

    last   = the previous pass's loads of that layer;
    window = the mean of the last `window` passes' load distributions;
    ema    = exponential moving average of load distributions with weight `alpha` on the newest.
    Before any history: the uniform distribution.
    """

    def __init__(self, num_layers: int, num_experts: int, window: int = 16, alpha: float = 0.3):
        if window < 1 or not 0 < alpha <= 1:
            raise ValueError("window must be >= 1 and alpha in (0, 1]")
        self.num_experts = num_experts
        self.alpha = alpha
        self._recent = [deque(maxlen=window) for _ in range(num_layers)]
        self._ema: list[np.ndarray | None] = [None] * num_layers

    def update(self, layer: int, load: np.ndarray) -> None:
        """Record the actual load [E] (token counts) of `layer` for the pass just run."""
        dist = normalize(load)
        self._recent[layer].append(dist)
        prev = self._ema[layer]
        self._ema[layer] = dist if prev is None else self.alpha * dist + (1 - self.alpha) * prev

    def forecast(self, method: str, layer: int) -> np.ndarray:
        """Load distribution [E] forecast for the next pass of `layer`."""
        recent = self._recent[layer]
        if not recent:
            return np.full(self.num_experts, 1.0 / self.num_experts)
        if method == "last":
            return recent[-1]
        if method == "window":
            return np.mean(recent, axis=0)
        if method == "ema":
            return self._ema[layer]
        raise ValueError(f"unknown history method {method!r}; methods are {METHODS}")


def normalize(v: np.ndarray) -> np.ndarray:
    """v / sum(v); uniform when v sums to 0."""
    v = np.asarray(v, dtype=np.float64)
    total = v.sum()
    return v / total if total > 0 else np.full(v.shape, 1.0 / v.size)


def load_l1(forecast: np.ndarray, actual: np.ndarray) -> float:
    """L1 distance between the two load vectors normalized to sum 1 (0 = perfect, 2 = disjoint)."""
    return float(np.abs(normalize(forecast) - normalize(actual)).sum())


def top_k(v: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest entries; ties go to the lower index."""
    return np.argsort(-np.asarray(v), kind="stable")[:k]


def hot_k(num_experts: int) -> int:
    return max(1, num_experts // 8)


def hot_recall(forecast: np.ndarray, actual: np.ndarray) -> float | None:
    """Share of the truly top-k loaded experts that the forecast also puts in its top-k, k = max(1, E/8).

    "Truly hot" are the experts with load > 0 and at least the k-th largest load (ties
    included): with few tokens (a decoder step) most of a top-k would otherwise be
    zero-load experts picked by index. The share is of min(k, how many are truly hot);
    None when nothing was routed.
    """
    actual = np.asarray(actual)
    k = hot_k(len(actual))
    kth = np.sort(actual)[::-1][k - 1]
    hot = set(np.flatnonzero((actual > 0) & (actual >= kth)).tolist())
    if not hot:
        return None
    return min(len(set(top_k(forecast, k).tolist()) & hot), k) / min(k, len(hot))
