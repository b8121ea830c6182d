"""The gateway's copy of the model: every module of the HF model except the expert
FFNs, whose place is taken by RemoteExperts.

The model is built on the meta device, the experts are swapped out, and only then
is memory allocated and filled from the checkpoint, so expert weights are never
read nor allocated here. Every other tensor is checked against the checkpoint.
"""

from __future__ import annotations

import logging

import torch

from gateway.dispatch import RemoteExperts
from moe_common.checkpoint import Checkpoint, is_expert_key, sparse_layers
from moe_common.errors import FailedPrecondition
from moe_common.model_source import ModelSource

log = logging.getLogger(__name__)


def load_gateway_model(source: ModelSource, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """-> (model, tokenizer, sparse layers). The model, in `dtype` on `device`, has
    RemoteExperts (not yet connected) in every sparse layer and no expert parameters."""
    from transformers import AutoTokenizer, GenerationConfig, SwitchTransformersConfig, SwitchTransformersForConditionalGeneration
    from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersSparseMLP

    config = SwitchTransformersConfig.from_pretrained(source.path)
    with torch.device("meta"):
        model = SwitchTransformersForConditionalGeneration(config)

    # The sparse blocks HF built must be the ones our numbering assumes.
    layers = sparse_layers(config)
    found = [name for name, m in model.named_modules() if isinstance(m, SwitchTransformersSparseMLP)]
    expected = [f"{layer.name}.layer.{layer.ff_sublayer}.mlp" for layer in layers]
    if found != expected:
        raise FailedPrecondition(f"this transformers version builds sparse layers {found}, expected {expected}")
    for layer, name in zip(layers, expected):
        model.get_submodule(name).experts = RemoteExperts(layer.index)

    model.to_empty(device="cpu")
    model.tie_weights()
    if any(True for _ in model.named_buffers()):
        raise FailedPrecondition("the model has buffers the loader does not know how to fill")

    checkpoint = Checkpoint(source.path)
    params = dict(model.named_parameters(remove_duplicate=False))
    present = [n for n in params if n in checkpoint]
    loaded = checkpoint.read(present, dtype)
    with torch.no_grad():
        for name, tensor in loaded.items():
            if params[name].shape != tensor.shape:
                raise FailedPrecondition(f"{name}: checkpoint shape {list(tensor.shape)} != model shape {list(params[name].shape)}")
            params[name].copy_(tensor)
    # A parameter missing from the file is fine only if it shares storage with one that was loaded (tied).
    loaded_ptrs = {params[n].data_ptr() for n in present}
    missing = [n for n in params if n not in loaded and params[n].data_ptr() not in loaded_ptrs]
    if missing:
        raise FailedPrecondition(f"checkpoint {source.path} lacks {missing[:5]}")
    unexpected = [k for k in checkpoint.keys() if not is_expert_key(k) and k not in params]
    if unexpected:
        log.warning("checkpoint tensors the model does not use: %s", unexpected[:5])
    assert not any(is_expert_key(n) for n in params), "expert parameters in the gateway model"

    model = model.to(device=device, dtype=dtype).eval()
    try:
        model.generation_config = GenerationConfig.from_pretrained(source.path)
    except OSError:
        pass  # no generation_config.json: keep the one derived from config.json
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    return model, tokenizer, layers


def remote_experts(model) -> list[RemoteExperts]:
    return [m for m in model.modules() if isinstance(m, RemoteExperts)]
