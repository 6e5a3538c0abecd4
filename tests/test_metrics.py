"""Progress metrics: the ETA is paced by the steps this process ran (also after a resume); MFU counts model FLOPs."""
import klong_jax.training.metrics as metrics_module
from klong_jax.training.metrics import MetricsWriter


def test_eta_after_resume_counts_only_this_process_steps(tmp_path, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(metrics_module.time, "time", lambda: now[0])
    fresh = MetricsWriter(str(tmp_path / "fresh"), 1200)
    resumed = MetricsWriter(str(tmp_path / "resumed"), 1200, start_step=300)
    now[0] += 20.0   # 10 steps of 2 s each
    assert "ETA 39m40s" in fresh.progress_line(10, {"loss": 1.0}, "train")       # 1190 steps left at 2 s
    assert "ETA 29m40s" in resumed.progress_line(310, {"loss": 1.0}, "train")    # 890 steps left at 2 s
    fresh.close()
    resumed.close()


def test_model_flops_count_active_parameters_and_causal_attention():
    from klong_jax.models.config import preset
    from klong_jax.training.mfu import active_matmul_params, train_flops_per_token
    cfg = preset("tiny").__class__(
        vocab_size=100, hidden_size=8, intermediate_size=16, moe_intermediate_size=4, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=1, head_dim=4, n_routed_experts=6, num_experts_per_tok=2,
        n_shared_experts=1, first_k_dense_replace=1, pad_token_id=0, eos_token_id=(1,))
    # Per layer attention: q 8x8 + k,v 2 x 8x4 + o 8x8 = 192; layer 0 dense MLP 3x8x16 = 384; layers 1-2 MoE:
    # router 8x6 + 3 experts (2 routed + 1 shared) x 3x8x4 = 48 + 288 = 336; head 8x100 = 800.
    assert active_matmul_params(cfg) == 3 * 192 + 384 + 2 * 336 + 800
    # Attention at a 10-token row: 3 (fwd+bwd) x 4 x H*D (8) x 5 positions on average x 3 layers = 1440.
    assert train_flops_per_token(cfg, 10) == 6 * (3 * 192 + 384 + 2 * 336 + 800) + 1440
    # GLM-4.5-Air: about 12B active parameters, as released (embedding lookups excluded).
    assert 12.0e9 < active_matmul_params(preset("glm45_air")) < 13.5e9
