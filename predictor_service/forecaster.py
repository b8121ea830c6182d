"""The SRU forecaster: from the token ids of the upcoming pass, the expected load of
every expert of every sparse layer the pass runs.

  encoder pass  tokens [B, S] -> embedding -> SRU over S -> h [S, B, H]
                sequence head on (mean_s h, h_last) -> q[B, Le, E], each sequence's share of
                tokens per expert; load[l, e] = sum_b min(S * q[b, l, e], capacity)
  decoder step  decoder tokens so far [B, t] -> embedding -> causal SRU over t -> token head
                at the last position -> p[B, Ld, E]; load = sum_b p

Two heads per stack: a token head (each token's expert, as in the paper's artifact)
and, for the encoder, a sequence head that predicts each sequence's load distribution
directly (predicting the distribution is what placement needs; see MoE-GPS). The
sequence head is what makes a 4096-token forecast cheap: the token heads' logits
alone are tokens x layers x experts floats. Both are trained by distillation on
recorded routing traces: cross-entropy against the router's top-1 choice per token,
and KL divergence against each sequence's share of tokens per expert. The forecaster
only forecasts; the router still routes every token.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from moe_common.traces import DECODER, ENCODER, Pass, TraceInfo
from predictor_service.sru_kernel import sru_impl_class

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "moe-forecaster"
CHECKPOINT_VERSION = 1


@dataclass
class ForecasterConfig:
    vocab_size: int
    num_experts: int
    num_encoder_layers: int
    num_decoder_layers: int
    expert_capacity: int
    embed_dim: int = 32
    hidden: int = 32  # per direction
    sru_layers: int = 1
    bidirectional: bool = False  # for the encoder SRU; the decoder's is always causal


class Forecaster(nn.Module):
    def __init__(self, cfg: ForecasterConfig, sru_impl: str = "auto"):
        """sru_impl: auto, kernel or torch (predictor_service.sru_kernel); the weights and
        the forecasts are the same with either SRU, so a checkpoint loads into both."""
        super().__init__()
        self.cfg = cfg
        sru = sru_impl_class(sru_impl)
        E, Le, Ld = cfg.num_experts, cfg.num_encoder_layers, cfg.num_decoder_layers
        width = cfg.hidden * (2 if cfg.bidirectional else 1)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        self.encoder_rnn = sru(cfg.embed_dim, cfg.hidden, num_layers=cfg.sru_layers, bidirectional=cfg.bidirectional)
        self.decoder_rnn = sru(cfg.embed_dim, cfg.hidden, num_layers=cfg.sru_layers, bidirectional=False)
        # All layers' heads fused into one matmul each: [.., width] -> [.., L * E].
        self.encoder_token_heads = nn.Linear(width, Le * E)
        self.encoder_sequence_heads = nn.Linear(2 * width, Le * E)
        self.decoder_token_heads = nn.Linear(cfg.hidden, Ld * E)

    @property
    def sru_impl(self) -> str:
        """The SRU in use: "kernel" (sru's C++ kernel) or "torch" (predictor_service.sru_torch)."""
        from predictor_service.sru_torch import TorchSRU

        return "torch" if isinstance(self.encoder_rnn, TorchSRU) else "kernel"

    def _states(self, kind: int, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens).transpose(0, 1)  # [S, B, D]: sru has no batch_first
        h, _ = (self.encoder_rnn if kind == ENCODER else self.decoder_rnn)(x)
        return h  # [S, B, width]

    def logits(self, kind: int, tokens: torch.Tensor) -> torch.Tensor:
        """Token head: tokens [B, S] -> logits [B, S, Lp, E] for the sparse layers of that stack."""
        b, s = tokens.shape
        h = self._states(kind, tokens)
        heads = self.encoder_token_heads if kind == ENCODER else self.decoder_token_heads
        return heads(h).transpose(0, 1).reshape(b, s, -1, self.cfg.num_experts)

    def sequence_log_shares(self, tokens: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder sequence head: tokens [B, S] -> log share of each expert [B, Le, E]."""
        if h is None:
            h = self._states(ENCODER, tokens)
        pooled = torch.cat([h.mean(0), h[-1]], dim=-1)  # [B, 2 * width]
        out = self.encoder_sequence_heads(pooled).view(tokens.shape[0], -1, self.cfg.num_experts)
        return out.log_softmax(-1)

    @torch.inference_mode()
    def forecast(self, kind: int, tokens: torch.Tensor) -> torch.Tensor:
        """Expected load [Lp, E] of the upcoming pass.

        encoder: tokens [B, S] are the pass's tokens (padding is routed too); an expert takes
        at most `expert_capacity` tokens of a sequence (HF drops the rest), so the expectation
        is capped per sequence.
        decoder: tokens [B, t] are each sequence's decoder tokens so far; the pass routes the last one.
        """
        if kind == ENCODER:
            per_seq = self.sequence_log_shares(tokens).exp() * tokens.shape[1]  # [B, Le, E]
            return per_seq.clamp(max=self.cfg.expert_capacity).sum(0)
        h = self._states(DECODER, tokens)[-1]  # [B, H]: only the last position is routed now
        return self.decoder_token_heads(h).view(tokens.shape[0], -1, self.cfg.num_experts).softmax(-1).sum(0)


# ---------------------------------------------------------------------------
# training data from traces
# ---------------------------------------------------------------------------

@dataclass
class Example:
    """One training batch: tokens [B, S] and router choices [B, S, Lp] of one stack."""

    kind: int
    batch_id: int
    tokens: torch.Tensor
    targets: torch.Tensor


def examples_from_passes(passes: list[Pass]) -> list[Example]:
    """Encoder passes as they are; decoder steps of one batch joined into [B, steps] sequences."""
    out: list[Example] = []
    decoder: dict[int, list[Pass]] = {}
    for p in passes:
        if p.kind == ENCODER:
            out.append(Example(ENCODER, p.batch_id, torch.from_numpy(p.tokens).long(), torch.from_numpy(p.experts).long()))
        else:
            decoder.setdefault(p.batch_id, []).append(p)
    for batch_id, steps in decoder.items():
        steps.sort(key=lambda p: p.step)
        if any(p.tokens.shape[1] != 1 for p in steps):
            # A teacher-forced decoder pass (all positions at once): use it as it is.
            for p in steps:
                out.append(Example(DECODER, batch_id, torch.from_numpy(p.tokens).long(), torch.from_numpy(p.experts).long()))
            continue
        tokens = np.concatenate([p.tokens for p in steps], axis=1)  # [B, steps]
        experts = np.concatenate([p.experts for p in steps], axis=1)  # [B, steps, Ld]
        out.append(Example(DECODER, batch_id, torch.from_numpy(tokens).long(), torch.from_numpy(experts).long()))
    return out


def split_batches(batch_ids: list[int], val_fraction: float, seed: int) -> tuple[set[int], set[int]]:
    """Deterministic train/validation split by batch id."""
    ids = sorted(set(batch_ids))
    rng = np.random.default_rng(seed)
    rng.shuffle(ids)
    n_val = max(1, int(round(len(ids) * val_fraction))) if len(ids) > 1 else 0
    return set(ids[n_val:]), set(ids[:n_val])


def group_examples(examples: list[Example], per_group: int) -> list[Example]:
    """Stack up to `per_group` examples of the same kind and sequence length into one.
    The SRU's CPU cost grows with S, not B, so this makes epochs faster; equal lengths
    keep every sequence exactly as it was routed."""
    out = []
    buckets: dict[tuple[int, int], list[Example]] = {}
    for ex in examples:
        buckets.setdefault((ex.kind, ex.tokens.shape[1]), []).append(ex)
    for (kind, _), same in sorted(buckets.items()):
        for i in range(0, len(same), per_group):
            part = same[i: i + per_group]
            out.append(Example(kind, part[0].batch_id, torch.cat([ex.tokens for ex in part]),
                               torch.cat([ex.targets for ex in part])))
    return out


def _loss(model: Forecaster, ex: Example) -> torch.Tensor:
    """Token cross-entropy, plus for the encoder the KL divergence of each sequence's
    actual share of tokens per expert from the sequence head's."""
    E = model.cfg.num_experts
    h = model._states(ex.kind, ex.tokens)  # [S, B, width]
    heads = model.encoder_token_heads if ex.kind == ENCODER else model.decoder_token_heads
    logits = heads(h).transpose(0, 1).reshape(-1, E)
    loss = nn.functional.cross_entropy(logits, ex.targets.reshape(-1))
    if ex.kind == ENCODER:
        b, s, lp = ex.targets.shape
        shares = nn.functional.one_hot(ex.targets, E).float().mean(1)  # [B, Lp, E]
        log_q = model.sequence_log_shares(ex.tokens, h)
        loss = loss + nn.functional.kl_div(log_q, shares, reduction="batchmean") / lp
    return loss


def train(info: TraceInfo, passes: list[Pass], vocab_size: int, *, seed: int = 0, epochs: int = 12,
          patience: int = 2, lr: float = 3e-3, val_fraction: float = 0.1, embed_dim: int = 32, hidden: int = 32,
          sru_layers: int = 1, bidirectional: bool = False, group: int = 4,
          init_embeddings: torch.Tensor | None = None, progress: bool = True,
          sru_impl: str = "auto") -> tuple[Forecaster, dict]:
    """Fit a Forecaster to traces with early stopping on validation loss. Returns (best model, report)."""
    from tqdm import tqdm

    torch.manual_seed(seed)
    cfg = ForecasterConfig(vocab_size, info.num_experts, len(info.encoder_layers), len(info.decoder_layers),
                           info.expert_capacity, embed_dim, hidden, sru_layers, bidirectional)
    model = Forecaster(cfg, sru_impl)
    if init_embeddings is not None:
        # The model's own input embeddings, projected to embed_dim by a fixed random map.
        proj = torch.randn(init_embeddings.shape[1], embed_dim, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            e = init_embeddings.float() @ proj / math.sqrt(init_embeddings.shape[1])
            model.embed.weight.copy_(e / e.std())
    examples = examples_from_passes(passes)
    train_ids, val_ids = split_batches([ex.batch_id for ex in examples], val_fraction, seed)
    train_set = group_examples([ex for ex in examples if ex.batch_id in train_ids], group)
    val_set = group_examples([ex for ex in examples if ex.batch_id in val_ids], group)
    if not train_set:
        raise ValueError("no training examples in the traces")

    opt = torch.optim.Adam(model.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    best, best_loss, bad_epochs, history = None, math.inf, 0, []
    t0 = time.monotonic()
    warnings.filterwarnings("ignore", message="Running SRU on CPU with grad_enabled")  # the CPU path is the point here
    for epoch in range(epochs):
        model.train()
        order = rng.permutation(len(train_set))
        bar = tqdm(order, desc=f"epoch {epoch + 1}/{epochs}", disable=not progress, leave=False, unit="batch")
        total = 0.0
        for i in bar:
            opt.zero_grad()
            loss = _loss(model, train_set[i])
            loss.backward()
            opt.step()
            total += loss.item()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        model.eval()
        with torch.no_grad():
            val = float(np.mean([_loss(model, ex).item() for ex in val_set])) if val_set else total / len(train_set)
        history.append({"epoch": epoch + 1, "train_loss": total / len(train_set), "val_loss": val})
        if progress:
            print(f"epoch {epoch + 1}: train loss {total / len(train_set):.4f}, validation loss {val:.4f}", flush=True)
        if val < best_loss - 1e-4:
            best_loss, bad_epochs = val, 0
            best = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad_epochs += 1
            if bad_epochs >= patience:
                break
    if best is not None:
        model.load_state_dict(best)
    model.eval()
    report = {"epochs": history, "best_val_loss": best_loss, "train_seconds": time.monotonic() - t0,
              "train_batches": len(train_set), "val_batches": len(val_set), "seed": seed}
    return model, report


# ---------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------

def save(path, model: Forecaster, info: TraceInfo, report: dict) -> None:
    torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "trace_info": info.to_json(),
                "config": asdict(model.cfg), "state_dict": model.state_dict(), "report": report}, path)


def load(path, expect_model_id: str | None = None, sru_impl: str = "auto") -> tuple[Forecaster, TraceInfo, dict]:
    """Load a checkpoint; with expect_model_id, fail clearly when it was trained for another model.
    Either SRU implementation (sru_impl) loads any checkpoint: their state dicts are the same."""
    data = torch.load(path, map_location="cpu", weights_only=True)  # no pickled code from a file
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a forecaster checkpoint")
    if data.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: checkpoint version {data.get('version')} is not supported (want {CHECKPOINT_VERSION})")
    info = TraceInfo.from_json(data["trace_info"])
    if expect_model_id is not None and info.model_id != expect_model_id:
        raise ValueError(
            f"forecaster {path} was trained for model {info.model_id} ({info.model_source}), "
            f"not for model {expect_model_id}: train one on this model's traces"
        )
    model = Forecaster(ForecasterConfig(**data["config"]), sru_impl)
    model.load_state_dict(data["state_dict"])
    model.eval()
    return model, info, data.get("report", {})
