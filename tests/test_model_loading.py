"""Model sources, presets, and loading without (gateway) or with only some (expert server) experts."""

import shutil

import pytest
import torch
from safetensors import safe_open

from expert_server.experts import ExpertStore
from gateway.model import load_gateway_model
from moe_common import model_source
from moe_common.checkpoint import Checkpoint, is_expert_key, sparse_layers
from moe_common.errors import InvalidArgument, NotFound


def _tensors(path):
    with safe_open(path / "model.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_tiny_preset_is_deterministic_and_untied(tiny, tmp_path):
    again = model_source.resolve("tiny", tmp_path)
    assert again.model_id == tiny.model_id
    a, b = _tensors(tiny.path), _tensors(again.path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["lm_head.weight"], a["shared.weight"])
    for name in ("config.json", "tokenizer_config.json"):
        assert (tiny.path / name).exists()


def test_base_preset_shapes():
    kw = model_source.preset_config_kwargs("base-e32-l4")
    assert (kw["d_model"], kw["d_ff"], kw["num_heads"], kw["d_kv"]) == (768, 3072, 12, 64)
    assert (kw["num_experts"], kw["num_layers"], kw["num_sparse_encoder_layers"]) == (32, 4, 2)
    assert model_source.preset_config_kwargs("base-e128")["num_layers"] == 12
    assert model_source.preset_config_kwargs("nope") is None
    with pytest.raises(InvalidArgument):
        model_source.preset_config_kwargs("base-e0")


def test_hub_id_resolves_from_the_cache_offline(tiny, tmp_path):
    # The layout huggingface_hub keeps: models--ORG--NAME/{refs/main, snapshots/REV/...}.
    repo = tmp_path / "models--acme--switch-tiny"
    snap = repo / "snapshots" / "0123abcd"
    shutil.copytree(tiny.path, snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    got = model_source.resolve("acme/switch-tiny", hub_cache_dir=tmp_path)
    assert got.path == snap and got.model_id == tiny.model_id


def test_unknown_model_is_not_found(tmp_path):
    with pytest.raises(NotFound):
        model_source.resolve(str(tmp_path / "missing" / "x"), hub_cache_dir=tmp_path)


def test_gateway_model_has_no_expert_parameters(tiny, reference):
    model, _, layers = load_gateway_model(tiny)
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    assert names and not any(is_expert_key(n) for n in names)
    ref = dict(reference[0].named_parameters(remove_duplicate=False))
    for n, p in model.named_parameters(remove_duplicate=False):
        assert torch.equal(p, ref[n]), n
    expected = sum(p.numel() for n, p in ref.items() if not is_expert_key(n))
    assert sum(p.numel() for p in model.parameters()) == expected
    assert [layer.name for layer in layers] == ["encoder.block.1", "encoder.block.3", "decoder.block.1", "decoder.block.3"]


def test_sharded_checkpoint_loads_the_same(tiny, reference, tmp_path):
    reference[0].save_pretrained(tmp_path, max_shard_size="200KB")
    shutil.copy(tiny.path / "tokenizer_config.json", tmp_path)
    assert (tmp_path / "model.safetensors.index.json").exists()
    sharded = model_source.resolve(str(tmp_path))
    model, _, _ = load_gateway_model(sharded)
    ref = dict(reference[0].named_parameters(remove_duplicate=False))
    for n, p in model.named_parameters(remove_duplicate=False):
        assert torch.equal(p, ref[n]), n


def test_expert_store_reads_only_its_experts_and_matches_hf(tiny, reference):
    store = ExpertStore(tiny)
    cfg = store.config
    assert store.assign([(0, 1), (3, 7)]) == (2, 0)
    assert store.held() == [(0, 1), (3, 7)]
    assert store.weight_bytes() == 2 * 2 * cfg.d_model * cfg.d_ff * 4
    assert store.assign([(3, 7)]) == (0, 1)

    x = torch.randn(5, cfg.d_model)
    layer = sparse_layers(cfg)[3]
    hf_expert = reference[0].get_submodule(f"{layer.name}.layer.{layer.ff_sublayer}.mlp.experts.expert_7")
    with torch.no_grad():
        assert torch.equal(store.run(3, [(7, 5)], x), hf_expert(x))
    with pytest.raises(NotFound, match="expert 1 of sparse layer 0 is not held"):
        store.run(0, [(1, 5)], x)


def test_checkpoint_reads_selected_tensors(tiny):
    ckpt = Checkpoint(tiny.path)
    got = ckpt.read(["shared.weight"])
    assert list(got) == ["shared.weight"]
    with pytest.raises(NotFound):
        ckpt.read(["no.such.tensor"])
