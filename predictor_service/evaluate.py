"""Evaluation of forecasts against what the router actually did, pass by pass.

Every method sees the passes in recorded order and only what it could see in serving:
the SRU the tokens of the upcoming pass (and, for decoder steps, the decoder tokens
so far); the history baselines the actual loads of earlier passes of each layer.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from moe_common.traces import DECODER, ENCODER, KIND_NAMES, Pass, TraceInfo
from predictor_service.forecaster import Forecaster
from predictor_service.history import METHODS, History, hot_recall, load_l1


def _summary(l1: dict, recall: dict, ms: list[float]) -> dict:
    every_l1 = l1[ENCODER] + l1[DECODER]
    every_recall = recall[ENCODER] + recall[DECODER]
    out = {
        "load_l1": float(np.mean(every_l1)) if every_l1 else None,
        "hot_recall": float(np.mean(every_recall)) if every_recall else None,
        "forecast_ms_p50": float(np.percentile(ms, 50)) if ms else None,
        "forecast_ms_p99": float(np.percentile(ms, 99)) if ms else None,
    }
    for kind in (ENCODER, DECODER):
        out[KIND_NAMES[kind]] = {
            "load_l1": float(np.mean(l1[kind])) if l1[kind] else None,
            "hot_recall": float(np.mean(recall[kind])) if recall[kind] else None,
            "layer_passes": len(l1[kind]),
        }
    return out


def evaluate(info: TraceInfo, passes: list[Pass], forecaster: Forecaster | None = None,
             window: int = 16, alpha: float = 0.3) -> dict:
    """-> {"methods": {name: {load_l1, hot_recall, forecast_ms_p50, forecast_ms_p99, encoder, decoder}}, ...}."""
    E = info.num_experts
    history = History(info.num_layers, E, window, alpha)
    names = (["sru"] if forecaster is not None else []) + list(METHODS)
    l1 = {m: {ENCODER: [], DECODER: []} for m in names}
    recall = {m: {ENCODER: [], DECODER: []} for m in names}
    ms = {m: [] for m in names}
    agree = {layer: [0, 0] for layer in range(info.num_layers)}
    decoder_tokens: dict[int, np.ndarray] = {}

    for p in passes:
        layers = info.layers_of(p.kind)
        actual = p.loads(E)  # [Lp, E]
        forecasts = {}
        if forecaster is not None:
            tokens = p.tokens
            if p.kind == DECODER and p.tokens.shape[1] == 1:
                prev = decoder_tokens.get(p.batch_id)
                tokens = p.tokens if prev is None or p.step == 0 else np.concatenate([prev, p.tokens], axis=1)
                decoder_tokens[p.batch_id] = tokens
            t = torch.from_numpy(tokens).long()
            t0 = time.perf_counter()
            forecasts["sru"] = forecaster.forecast(p.kind, t).numpy()
            ms["sru"].append((time.perf_counter() - t0) * 1e3)
            with torch.inference_mode():
                logits = forecaster.logits(p.kind, t)
            if p.kind == DECODER and p.tokens.shape[1] == 1:
                logits = logits[:, -1:]
            chosen = logits.argmax(-1).numpy()  # [B, S, Lp]
            for j, layer in enumerate(layers):
                agree[layer][0] += int((chosen[..., j] == p.experts[..., j]).sum())
                agree[layer][1] += int(p.experts[..., j].size)
        for m in METHODS:
            t0 = time.perf_counter()
            forecasts[m] = np.stack([history.forecast(m, layer) for layer in layers])
            ms[m].append((time.perf_counter() - t0) * 1e3)
        for m, f in forecasts.items():
            for j in range(len(layers)):
                l1[m][p.kind].append(load_l1(f[j], actual[j]))
                r = hot_recall(f[j], actual[j])
                if r is not None:
                    recall[m][p.kind].append(r)
        for j, layer in enumerate(layers):
            history.update(layer, actual[j])

    report = {"model_id": info.model_id, "passes": len(passes),
              "encoder_passes": sum(p.kind == ENCODER for p in passes),
              "decoder_passes": sum(p.kind == DECODER for p in passes),
              "history": {"window": window, "ema_alpha": alpha},
              "methods": {m: _summary(l1[m], recall[m], ms[m]) for m in names}}
    if forecaster is not None:
        report["methods"]["sru"]["top1_agreement"] = {
            info.layer_names[layer]: (hits / total if total else None) for layer, (hits, total) in agree.items()}
    return report
