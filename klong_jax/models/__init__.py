"""The GLM-4.5-Air MoE model (and the dense Llama family it also runs) in Flax NNX.

Shape letters. Every array name ends in `_` + one letter per axis (`x_BTD`, `q_BTNH`, `cache_k_LBSKH`)
and einsum strings use the same upper-case letters (`jnp.einsum("BTD,DNH->BTNH", x_BTD, w_DNH)`).
Each letter has one meaning throughout klong_jax/models/ and kernels/ (the kernels refer here):

  B  batch (rows)
  T  tokens (the sequence, the queries of attention); in the blocked kernels, one query block's tokens
  S  key positions: cache slots, or the keys of an attention call (S = T in self-attention); in the
     blocked kernels, one key block's keys
  U  the new tokens as keys (cached attention's second token axis; U = T)
  D  model width (hidden_size)
  N  query heads (num_attention_heads)
  K  kv heads (num_key_value_heads)
  G  query heads per kv head (N = K * G)
  H  head dim (head_dim)
  R  rotary dims (the leading R <= H dims of a head that RoPE rotates)
  F  FFN width (intermediate_size of the dense MLP; moe_intermediate_size per expert)
  E  routed experts (n_routed_experts; on an expert shard, its local experts)
  A  expert groups of the router (n_group; E = A * E/A)
  X  experts per token (top-k, num_experts_per_tok)
  V  vocabulary
  L  layers (of one stack)
  M  flattened tokens (B * T) in MoE dispatch
  P  (token, expert) pairs (M * X) in MoE dispatch
  C  tokens per chunk / capacity, where used (moe_token_chunk)
  I  query blocks, J  key blocks (the block tables of the blocked attention kernels)
  W  lanes (128) of a TPU vreg row (Pallas kernel scratch)
  Q  flattened (token, query head) rows (T * N), Z  flattened (kv head, head dim) columns (K * H):
     cached attention's matmul layout

Letters beyond the HF-style first ones (A, C, I, J, P, Q, R, U, W, Z) avoid a second meaning for any
of B T S D N K H F E X V L M: e.g. the router's expert groups are A, not G (query heads per kv head).
"""
from klong_jax.models.config import PRESETS, ModelConfig, preset
from klong_jax.models.glm4_moe import Glm4MoeForCausalLM
from klong_jax.models.init import abstract_model, count_params, init_model
from klong_jax.models.upcycle import UpcycleConfig, upcycle, upcycled_config

__all__ = ["ModelConfig", "PRESETS", "preset", "Glm4MoeForCausalLM", "abstract_model", "init_model",
           "count_params", "UpcycleConfig", "upcycle", "upcycled_config"]
