"""The predictor's domain object: one method answering forecasts, history kept for
the baselines, and live error figures. No gRPC here."""

from __future__ import annotations

import collections
import threading
import time

import numpy as np
import torch

from moe_common.errors import FailedPrecondition, InvalidArgument
from moe_common.traces import DECODER, ENCODER, TraceInfo
from predictor_service.forecaster import Forecaster
from predictor_service.history import METHODS, History, hot_k, load_l1, top_k


class Predictor:
    def __init__(self, info: TraceInfo, method: str, forecaster: Forecaster | None = None,
                 window: int = 16, alpha: float = 0.3, vocab_size: int | None = None):
        if method == "sru" and forecaster is None:
            raise ValueError("--method sru needs a trained checkpoint (--checkpoint)")
        if method not in ("sru", *METHODS):
            raise ValueError(f"unknown method {method!r}")
        self.info = info
        self.method = method
        self.forecaster = forecaster
        self.vocab_size = forecaster.cfg.vocab_size if forecaster is not None else vocab_size
        self.history = History(info.num_layers, info.num_experts, window, alpha)
        self._lock = threading.Lock()
        self._last_forecast: dict[int, np.ndarray] = {}
        self._l1_sum = 0.0
        self._l1_count = 0
        self.forecasts = 0
        self.reports = 0
        self._times_ms: collections.deque = collections.deque(maxlen=1000)

    @property
    def note(self) -> str:
        if self.forecaster is None:
            return f"no forecaster checkpoint: forecasting with the history method {self.method!r}"
        sru = "sru's C++ kernel" if self.forecaster.sru_impl == "kernel" else "the pure-PyTorch SRU"
        return f"trained SRU forecaster loaded ({sru}); forecasting with {self.method!r}"

    def check_model(self, model_id: str) -> None:
        if model_id and model_id != self.info.model_id:
            raise FailedPrecondition(f"predictor serves model {self.info.model_id}, request is for model {model_id}")

    def forecast(self, kind: int, tokens: np.ndarray) -> list[tuple[int, np.ndarray, list[int]]]:
        """tokens [B, S] -> [(layer, expected load [E], hot experts)] for the pass's layers."""
        if kind not in (ENCODER, DECODER):
            raise InvalidArgument("pass kind must be encoder or decoder")
        if tokens.ndim != 2 or tokens.size == 0:
            raise InvalidArgument(f"token ids must form a non-empty [batch, seq] matrix, got shape {list(tokens.shape)}")
        if self.vocab_size is not None and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise InvalidArgument(f"token ids must be in [0, {self.vocab_size})")
        t0 = time.perf_counter()
        layers = self.info.layers_of(kind)
        routed = tokens.shape[0] * (tokens.shape[1] if kind == ENCODER else 1)
        if self.method == "sru":
            loads = self.forecaster.forecast(kind, torch.from_numpy(tokens).long()).numpy()
        else:
            with self._lock:
                loads = np.stack([self.history.forecast(self.method, layer) for layer in layers]) * routed
        k = hot_k(self.info.num_experts)
        out = [(layer, loads[j], top_k(loads[j], k).tolist()) for j, layer in enumerate(layers)]
        with self._lock:
            for layer, load, _ in out:
                self._last_forecast[layer] = load
            self.forecasts += 1
            self._times_ms.append((time.perf_counter() - t0) * 1e3)
        return out

    def report(self, layer_loads: list[tuple[int, np.ndarray]]) -> None:
        """Actual loads of a pass: update history and the live error of the method in use."""
        for layer, load in layer_loads:
            if not 0 <= layer < self.info.num_layers:
                raise InvalidArgument(f"sparse layer {layer} does not exist (the model has {self.info.num_layers})")
            if len(load) != self.info.num_experts:
                raise InvalidArgument(f"layer {layer}: load has {len(load)} entries, the model has {self.info.num_experts} experts")
        with self._lock:
            for layer, load in layer_loads:
                previous = self._last_forecast.pop(layer, None)
                if previous is not None:
                    self._l1_sum += load_l1(previous, load)
                    self._l1_count += 1
                self.history.update(layer, load)
            self.reports += 1

    def status(self) -> dict:
        with self._lock:
            return dict(method=self.method, has_checkpoint=self.forecaster is not None, note=self.note,
                        model_id=self.info.model_id, forecasts=self.forecasts, reports=self.reports,
                        live_load_l1=self._l1_sum / self._l1_count if self._l1_count else 0.0,
                        forecast_ms_p50=float(np.median(self._times_ms)) if self._times_ms else 0.0)
