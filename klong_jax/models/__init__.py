"""The GLM-4.5-Air MoE model (and the dense Llama family it also runs) in Flax NNX."""
from klong_jax.models.config import PRESETS, ModelConfig, preset
from klong_jax.models.glm4_moe import Glm4MoeForCausalLM
from klong_jax.models.init import abstract_model, count_params, init_model
from klong_jax.models.upcycle import UpcycleConfig, upcycle, upcycled_config

__all__ = ["ModelConfig", "PRESETS", "preset", "Glm4MoeForCausalLM", "abstract_model", "init_model",
           "count_params", "UpcycleConfig", "upcycle", "upcycled_config"]
