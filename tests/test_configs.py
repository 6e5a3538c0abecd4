"""The run configs: every variant of every config file builds a valid model and upcycling section, the recipe's
stages share one model section, `pretrained:NAME` resolves, and the smol variant's config.model is exactly what
its pretrained base becomes after upcycling (so `initial_model`'s architecture check passes on the real file)."""
import dataclasses
import os

import numpy as np
import pytest

from configs import klong, rl_common, rl_stage1, rl_stage2, rl_stage3, sft
from klong_jax.hf.pretrained import REGISTRY, local_path, resolve_source
from klong_jax.models import preset
from klong_jax.models.from_config import model_config_from, upcycle_config_from
from klong_jax.models.upcycle import upcycled_config


@pytest.mark.parametrize("variant", sft.VARIANTS)
def test_every_variant_builds(variant):
    for module in (sft, rl_stage1, rl_stage2, rl_stage3):
        cfg = module.get_config(variant)
        model_cfg, up = model_config_from(cfg.model), upcycle_config_from(cfg.model)
        assert model_cfg.vocab_size > 0 and (up.layers == 0) == (sft.UPCYCLE[variant] == {})
    pipeline = klong.get_config(variant)
    for stage in (1, 2, 3):  # one model section: a stage's checkpoint always fits the next stage
        assert pipeline[f"rl_stage{stage}"].model is pipeline.sft.model


def test_rl_budgets_grow_stage_by_stage():
    for variant, stages in rl_common.STAGES.items():
        budgets = [stages[s] for s in (1, 2, 3)]
        assert all(a < b for prev, nxt in zip(budgets, budgets[1:]) for a, b in zip(prev, nxt)), variant


def test_smol_model_section_is_the_upcycled_base():
    cfg = sft.get_config("smol")
    up = upcycle_config_from(cfg.model)
    assert (up.layers, up.experts, up.top_k) == (4, 4, 2)
    want = upcycled_config(preset("smollm2_135m", **sft.RUNTIME["smol"]), up)
    assert model_config_from(cfg.model) == want
    # 30 layers: 26 dense + 4 MoE whose experts are the 1536-wide FFN; ChatML and the base's own tokenizer.
    assert (want.num_dense_layers, want.num_moe_layers, want.moe_intermediate_size) == (26, 4, 1536)
    assert cfg.init_from == cfg.data.tokenizer == "pretrained:smollm2-135m-instruct"
    assert cfg.data.embedded.vocab_size == 0   # no SentencePiece tokenizer is trained for it


def test_resolve_source():
    assert resolve_source("") == "" and resolve_source("../sft") == "../sft"
    assert resolve_source("/x/model.gguf") == "/x/model.gguf"
    with pytest.raises(ValueError, match="unknown pretrained base 'nope'.*pretrained:smollm2-135m-instruct"):
        resolve_source("pretrained:nope")


def test_smol_base_loads_into_the_config_architecture():
    """The real file (skipped when not cached): `initial_model` upcycles it and its architecture check passes;
    at init the upcycled model computes the dense model's logits."""
    if not os.path.isfile(local_path("smollm2-135m-instruct")):
        pytest.skip("SmolLM2 GGUF not cached (make pretrained)")
    from klong_jax.hf.gguf import load_gguf
    from klong_jax.training.state import initial_model
    cfg = sft.get_config("smol")
    # fp32 compute (the variant trains in bf16): the check is that upcycling keeps the dense function.
    model_cfg = model_config_from(cfg.model).replace(compute_dtype="float32")
    model = initial_model(model_cfg, None, init_from=cfg.init_from, seed=0, upcycle=upcycle_config_from(cfg.model))
    assert model.cfg.arch_dict() == model_cfg.arch_dict()
    dense = load_gguf(resolve_source(cfg.init_from), compute_dtype="float32")
    ids = np.arange(3, 35, dtype=np.int32)[None]
    got, want = np.asarray(model(ids)), np.asarray(dense(ids))
    # The expert FFN runs as a grouped matmul (ragged_dot) and its two copies are summed with weights w, 1 - w:
    # the same function, in another summation order. Over 4 upcycled layers of the real model that is ~3e-5 of
    # the logit scale (|logits| up to ~40); tests/test_upcycle.py checks 1e-5 on small models.
    assert np.abs(got - want).max() < 1e-4 * np.abs(want).max()
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
    assert set(REGISTRY) >= {"smollm2-135m-instruct"}
    assert dataclasses.asdict(model.cfg)["n_routed_experts"] == 4
