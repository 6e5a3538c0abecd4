"""The progress line's ETA is paced by the steps this process ran, also after a resume."""
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
