"""Where a model comes from: a local checkpoint directory, a Hugging Face hub id, or
a built-in preset, all ending as a local directory with config.json, safetensors
and tokenizer files that every service loads through the same code.

Presets are deterministic random-init Switch Transformers written once with
``save_pretrained`` into a cache folder:
  tiny           d_model 64, 4+4 blocks (2+2 sparse), 8 experts, capacity 8: seconds to build.
  base-e{E}[-l{L}]  switch-base expert shapes (d_model 768, d_ff 3072, 12 heads, d_kv 64),
                 E experts, L encoder and L decoder blocks (every second one sparse; L defaults
                 to 12 as in switch-base), capacity 64.
Both use the ByT5 byte tokenizer (no vocabulary file) and untied word embeddings,
so greedy generation does not collapse onto one token.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from moe_common.errors import InvalidArgument, NotFound

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path("~/.cache/moe-serve").expanduser()
_BASE_PRESET = re.compile(r"^base-e(?P<experts>\d+)(?:-l(?P<layers>\d+))?$")
# ByT5: 3 special tokens + 256 bytes + 125 sentinel tokens.
_BYT5_VOCAB = 384


@dataclass(frozen=True)
class ModelSource:
    """A model resolved to a local directory."""

    spec: str  # what the user passed to --model
    path: Path  # directory with config.json, *.safetensors and tokenizer files
    model_id: str  # hash of config.json and router weights: all services must agree on it


def preset_config_kwargs(name: str) -> dict | None:
    """SwitchTransformersConfig arguments of a preset, or None if `name` is no preset."""
    common = dict(
        vocab_size=_BYT5_VOCAB,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        router_dtype="float32",
        dropout_rate=0.0,
    )
    if name == "tiny":
        return dict(
            common,
            d_model=64,
            d_ff=128,
            d_kv=16,
            num_heads=4,
            num_layers=4,
            num_decoder_layers=4,
            num_sparse_encoder_layers=2,
            num_sparse_decoder_layers=2,
            num_experts=8,
            expert_capacity=8,
        )
    match = _BASE_PRESET.match(name)
    if match:
        experts = int(match["experts"])
        layers = int(match["layers"] or 12)
        if experts < 1 or layers < 2:
            raise InvalidArgument(f"preset {name!r}: needs at least 1 expert and 2 layers")
        return dict(
            common,
            d_model=768,
            d_ff=3072,
            d_kv=64,
            num_heads=12,
            num_layers=layers,
            num_decoder_layers=layers,
            num_sparse_encoder_layers=layers // 2,
            num_sparse_decoder_layers=layers // 2,
            num_experts=experts,
            expert_capacity=64,
        )
    return None


def build_preset(name: str, cache_dir: Path = DEFAULT_CACHE_DIR) -> Path:
    """Write preset `name` into cache_dir once (atomically) and return its directory."""
    kwargs = preset_config_kwargs(name)
    if kwargs is None:
        raise NotFound(f"{name!r} is not a preset")
    target = Path(cache_dir) / "presets" / name
    if (target / "config.json").exists():
        return target
    from transformers import ByT5Tokenizer, SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

    log.info("building preset %s in %s (once)", name, target)
    tmp = target.with_name(f"{name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    config = SwitchTransformersConfig(**kwargs)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = SwitchTransformersForConditionalGeneration(config).eval()
    model.save_pretrained(tmp)
    ByT5Tokenizer().save_pretrained(tmp)
    del model
    try:
        tmp.rename(target)
    except OSError:
        # Another process finished the same preset first; both copies are identical.
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").exists():
            raise
    return target


def model_identity(directory: Path) -> str:
    """Model identity, 16 hex digits: sha256 of config.json (keys sorted) and of every
    router's weights. The routers make a fine-tune differ from its base model, which
    shares its config; they are small (layers x experts x d_model) and cheap to read."""
    from moe_common.checkpoint import Checkpoint

    data = json.loads((Path(directory) / "config.json").read_text())
    data.pop("transformers_version", None)  # same weights, different writer: same model
    digest = hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode())
    checkpoint = Checkpoint(directory)
    routers = sorted(k for k in checkpoint.keys() if k.endswith(".mlp.router.classifier.weight"))
    for name, tensor in sorted(checkpoint.read(routers).items()):
        digest.update(name.encode())
        digest.update(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _download_hub(spec: str, hub_cache_dir: Path | None = None) -> Path:
    """ORG/NAME[@REVISION] through the Hugging Face cache (safetensors and tokenizer files only)."""
    from huggingface_hub import snapshot_download

    repo_id, _, revision = spec.partition("@")
    kwargs = dict(allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"], cache_dir=hub_cache_dir,
                  revision=revision or None)
    try:
        # Offline first: a cached checkpoint must work on a machine with no network.
        return Path(snapshot_download(repo_id, local_files_only=True, **kwargs))
    except Exception:  # noqa: BLE001 - not cached; try the network next
        pass
    try:
        return Path(snapshot_download(repo_id, **kwargs))
    except Exception as exc:  # noqa: BLE001
        raise NotFound(
            f"model {spec!r} is not a local directory, not a preset (tiny, base-e<E>[-l<L>]), "
            f"not in the Hugging Face cache and could not be downloaded: {exc}"
        ) from exc


def resolve(spec: str, cache_dir: Path = DEFAULT_CACHE_DIR, hub_cache_dir: Path | None = None) -> ModelSource:
    """--model value -> ModelSource. Order: existing directory, preset, hub id.

    hub_cache_dir: the Hugging Face cache to use (default: HF's own, HF_HUB_CACHE).
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        resolved = path.resolve()
    elif preset_config_kwargs(spec) is not None:
        resolved = build_preset(spec, cache_dir)
    else:
        resolved = _download_hub(spec, hub_cache_dir)
    if not (resolved / "config.json").exists():
        raise NotFound(f"model directory {resolved} has no config.json")
    return ModelSource(spec=spec, path=resolved, model_id=model_identity(resolved))
