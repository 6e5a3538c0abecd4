"""Evaluate a checkpoint as an agent on a task set: run, grade with the tasks' rubrics, summarise.

  python launch/eval.py --config=configs/sft.py:tiny --checkpoint=CKPT --tasks=DIR --workdir=OUT \
      [--tokenizer=PATH --n_per_task=1 --timeout_s=1800 --max_turns=100 --temperature=1.0 ...]
  python launch/eval.py --config=configs/sft.py:smol --checkpoint=base    # the pretrained base, zero-shot

--checkpoint: `base` (what the config's run starts from: its init_from, e.g. a pretrained GGUF base,
upcycled as config.model.upcycle says; random init when init_from is empty), a `.gguf` file or
`pretrained:NAME`, a training workdir (its latest checkpoints/<step>: params and router bias of the
trainer's {"train": {"params", ...}, "rest"}; the model section of the workdir's config.json, and its
data.tokenizer / data.chat_template, the run's own), an
Orbax model directory (klong_jax.model_checkpoint), or a Hugging Face directory (config.json +
safetensors). --config gives the model's runtime fields (dtypes, kernels), the mesh, the context
policy (data.pipeline.context) and an `agent` section when it has one; flags override.
--tasks: a task directory, a directory of them, or a generated set (DIR/tasks/<task_id>); default: the
held-out tasks of the config's embedded suite (generated into the cache if needed). A task directory is an
embedded task (task.json) or a PaperBench paper directory (paper.md, addendum.md, blacklist.txt,
rubric.json, config.yaml: klong_jax.tasks.paperbench), e.g. --tasks=frontier-evals/project/paperbench/data/papers.
--judge_base_url, --judge_model: the OpenAI-compatible endpoint that grades paper rubric leaves without a
`check` command (key from $OPENAI_API_KEY or --judge_api_key_env); without it such leaves are invalid.
--workdir: default /tmp/klong_eval/<checkpoint name>.
Writes OUT/eval_summary.json and OUT/episodes.jsonl (klong_jax.agent.evaluate) and prints the table.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/sft.py:tiny")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "base (the config's init_from), a training workdir, Orbax "
                                  "model dir, HF dir, .gguf file or pretrained:NAME")
_TASKS = flags.DEFINE_string("tasks", "", "task directory, or a directory of task directories (default: the "
                             "config's embedded held-out tasks)")
_WORKDIR = flags.DEFINE_string("workdir", "", "output directory (default: /tmp/klong_eval/<checkpoint name>)")
_TOKENIZER = flags.DEFINE_string("tokenizer", "", "tokenizer (default: the config's / checkpoint's)")
_CHAT_TEMPLATE = flags.DEFINE_string("chat_template", "", "auto | glm45 | chatml (default: the checkpoint's "
                                     "data.chat_template, else the config's)")
_N_PER_TASK = flags.DEFINE_integer("n_per_task", 1, "episodes per task")
_MAX_TASKS = flags.DEFINE_integer("max_tasks", 0, "evaluate the first N tasks only (0: all)")
_MAX_CONCURRENT = flags.DEFINE_integer("max_concurrent", 8, "episodes (sandboxes) at once")
_SEED = flags.DEFINE_integer("seed", 0, "sampling seed")
_KEEP = flags.DEFINE_bool("keep_episodes", False, "keep the episode directories")
_JUDGE_URL = flags.DEFINE_string("judge_base_url", "", "paper tasks: OpenAI-compatible endpoint of the rubric "
                                 "judge, e.g. http://127.0.0.1:8000/v1 (empty: leaves without a check are invalid)")
_JUDGE_MODEL = flags.DEFINE_string("judge_model", "", "paper tasks: the judge endpoint's model name")
_JUDGE_KEY_ENV = flags.DEFINE_string("judge_api_key_env", "OPENAI_API_KEY", "paper tasks: environment variable "
                                     "holding the judge endpoint's API key")
# Agent budgets and sampling: None keeps the config's agent section (or AgentConfig's default).
_AGENT_FLAGS = {
    "timeout_s": flags.DEFINE_float("timeout_s", None, "wall-clock seconds per episode"),
    "max_turns": flags.DEFINE_integer("max_turns", None, "assistant turns per episode"),
    "max_total_tokens": flags.DEFINE_integer("max_total_tokens", None, "generated tokens per episode"),
    "max_new_tokens_per_turn": flags.DEFINE_integer("max_new_tokens_per_turn", None,
                                                    "generated tokens per turn"),
    "temperature": flags.DEFINE_float("temperature", None, "sampling temperature (0: greedy)"),
    "top_p": flags.DEFINE_float("top_p", None, "nucleus sampling"),
    "top_k": flags.DEFINE_integer("top_k", None, "top-k sampling (0: off)"),
    "reminder_every": flags.DEFINE_integer("reminder_every", None, "time reminder every N turns"),
}

RUNTIME_FIELDS = ("compute_dtype", "param_dtype", "attention_impl", "moe_impl", "remat_policy", "scan_layers",
                  "moe_token_chunk")


def judge_endpoint():
    """The paper tasks' LLM judge from the --judge_* flags (None when not set)."""
    from klong_jax.tasks import JudgeEndpoint
    if bool(_JUDGE_URL.value) != bool(_JUDGE_MODEL.value):
        raise app.UsageError("--judge_base_url and --judge_model go together: give both, or neither")
    if not _JUDGE_URL.value:
        return None
    return JudgeEndpoint(_JUDGE_URL.value, _JUDGE_MODEL.value, api_key_env=_JUDGE_KEY_ENV.value)


def load_tasks_from(path: str, judge=None) -> list:
    """Embedded tasks and PaperBench paper directories at `path` (klong_jax.tasks.load_tasks); a directory
    that is not a task, or a task that does not load, is a usage error naming it."""
    from klong_jax.tasks import load_tasks
    try:
        return load_tasks(path, judge=judge)
    except (OSError, ValueError) as e:   # PaperTaskError and RubricError are ValueErrors
        raise app.UsageError(f"--tasks={path}: {e}") from None


def agent_config(cfg):
    from klong_jax.agent import AgentConfig
    section = dict(cfg.agent.to_dict()) if "agent" in cfg else {}
    section.update({k: f.value for k, f in _AGENT_FLAGS.items() if f.value is not None})
    context = section.pop("context", None) or cfg.data.pipeline.context.to_dict()
    return AgentConfig.from_mapping(section, context=context)


def load_model(checkpoint: str, cfg, mesh):
    """(model, the tokenizer path the checkpoint knows of or "", its chat template name or "")."""
    from klong_jax.models.from_config import model_config_from
    if checkpoint == "base" or checkpoint.endswith(".gguf") or checkpoint.startswith("pretrained:"):
        return _load_base(checkpoint, cfg, mesh, model_config_from), "", ""
    if not os.path.isdir(checkpoint):
        raise app.UsageError(f"--checkpoint={checkpoint}: no such directory")
    runtime = {k: cfg.model[k] for k in RUNTIME_FIELDS if k in cfg.model}
    if os.path.isdir(os.path.join(checkpoint, "checkpoints")):
        return _load_training_workdir(checkpoint, cfg, mesh, runtime, model_config_from)
    has_weights = any(name.endswith(".safetensors") for name in os.listdir(checkpoint))
    if os.path.isfile(os.path.join(checkpoint, "config.json")) and has_weights:
        from klong_jax.hf import load_pretrained
        tokenizer = os.path.join(checkpoint, "tokenizer.json")
        return load_pretrained(checkpoint, mesh=mesh, **runtime), \
            tokenizer if os.path.isfile(tokenizer) else "", ""
    from klong_jax.model_checkpoint import load_model as load_orbax_model
    return load_orbax_model(checkpoint, mesh, **runtime), "", ""


def _load_base(checkpoint, cfg, mesh, model_config_from):
    """What a run of `cfg` starts from (checkpoint `base`: cfg.init_from; or the given .gguf / pretrained:NAME),
    upcycled as cfg.model.upcycle says, checked against cfg.model's architecture."""
    from klong_jax.models.from_config import upcycle_config_from
    from klong_jax.training.state import initial_model
    init_from = cfg.get("init_from", "") if checkpoint == "base" else checkpoint
    if checkpoint == "base" and init_from and not init_from.startswith("pretrained:") \
            and not os.path.exists(init_from):
        raise app.UsageError(f"--checkpoint=base: the config's init_from={init_from!r} does not exist here "
                             "(an RL stage's init_from is relative to its pipeline workdir: give that path)")
    print(f"base model: {init_from or 'random init (config has no init_from)'}", flush=True)
    return initial_model(model_config_from(cfg.model), mesh, init_from=init_from, seed=cfg.get("seed", 0),
                         upcycle=upcycle_config_from(cfg.model))


def _load_training_workdir(workdir, cfg, mesh, runtime, model_config_from):
    """Params and router bias of the latest complete checkpoint; the optimizer state stays on disk."""
    import jax
    import orbax.checkpoint as ocp
    from flax import nnx

    from klong_jax.training.checkpoint import abstract_with_shardings
    from klong_jax.training.state import abstract_layout
    saved_path = os.path.join(workdir, "config.json")
    saved = json.load(open(saved_path)) if os.path.isfile(saved_path) else {}
    model_section = dict(saved.get("model") or cfg.model.to_dict())
    model_section.update(runtime)
    model_cfg = model_config_from(model_section)
    graphdef, abs_params, abs_rest, param_sh, rest_sh = abstract_layout(model_cfg, mesh)
    target = {"train": {"params": abstract_with_shardings(abs_params, param_sh)},
              "rest": abstract_with_shardings(abs_rest, rest_sh)}
    with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as mgr:
        step = mgr.latest_step()
        if step is None:
            raise app.UsageError(f"--checkpoint={workdir}: no complete checkpoint in checkpoints/")
        with jax.set_mesh(mesh):
            restored = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                partial_restore=True)))["state"]
    print(f"restored step {step} of {workdir}", flush=True)
    model = nnx.merge(graphdef, restored["train"]["params"], restored["rest"])
    # The run's own tokenizer: another run's would decode its ids as garbage.
    from klong_jax.training.embedded_data import tokenizer_of
    return model, tokenizer_of(saved.get("data") or {}), (saved.get("data") or {}).get("chat_template", "")


def main(_):
    cfg = _CONFIG.value
    from klong_jax.runtime import setup_devices
    setup_devices(cfg.cpu_devices)
    import jax

    from klong_jax.agent import RolloutConfig, evaluate
    from klong_jax.agent.sampler_policy import SamplerPolicy
    from klong_jax.data.chat_template import check_chat_template_name, make_chat_template
    from klong_jax.data.tokenizer import load_tokenizer
    from klong_jax.sandbox import SandboxPool
    from klong_jax.sharding import make_mesh

    if _CHAT_TEMPLATE.value:   # fail before loading anything
        try:
            check_chat_template_name(_CHAT_TEMPLATE.value, "--chat_template")
        except ValueError as e:
            raise app.UsageError(str(e)) from None
    tasks_dir = _TASKS.value
    if not tasks_dir:
        from klong_jax.training.embedded_data import prepare_embedded
        tasks_dir = prepare_embedded(cfg.data.embedded)["heldout_tasks"]
    workdir = _WORKDIR.value or os.path.join(
        "/tmp/klong_eval", os.path.basename(os.path.normpath(_CHECKPOINT.value)).replace(":", "_") or "base")
    tasks = load_tasks_from(tasks_dir, judge=judge_endpoint())
    if _MAX_TASKS.value:
        tasks = tasks[:_MAX_TASKS.value]
    config = agent_config(cfg)
    mesh = make_mesh(dict(cfg.mesh.shape))
    model, ckpt_tokenizer, ckpt_template = load_model(_CHECKPOINT.value, cfg, mesh)
    from klong_jax.training.embedded_data import tokenizer_of
    tokenizer_path = _TOKENIZER.value or ckpt_tokenizer or tokenizer_of(cfg.data)
    tokenizer = load_tokenizer(tokenizer_path)
    field, template_name = (("--chat_template", _CHAT_TEMPLATE.value) if _CHAT_TEMPLATE.value else
                            ("data.chat_template", ckpt_template or cfg.data.get("chat_template", "auto")))
    try:
        template = make_chat_template(tokenizer, check_chat_template_name(template_name, field), field=field)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise app.UsageError(f"tokenizer {tokenizer_path} has {tokenizer.vocab_size} tokens > the "
                             f"model's vocab_size={model.cfg.vocab_size}")
    if config.context.budget_tokens > model.cfg.max_position_embeddings:
        raise app.UsageError(f"context budget_tokens={config.context.budget_tokens} exceeds the "
                             f"model's max_position_embeddings={model.cfg.max_position_embeddings}")
    print(f"eval: {len(tasks)} task(s) from {tasks_dir} x {_N_PER_TASK.value}, {jax.device_count()} "
          f"{jax.default_backend()} device(s), checkpoint {_CHECKPOINT.value}, output {workdir}", flush=True)
    concurrent = min(_MAX_CONCURRENT.value, len(tasks) * _N_PER_TASK.value)
    ckpt_ref = os.path.abspath(_CHECKPOINT.value) if os.path.exists(_CHECKPOINT.value) else _CHECKPOINT.value
    policy = SamplerPolicy.from_model(model, mesh, seed=_SEED.value,
                                      rollout=RolloutConfig.from_mapping(cfg.get("rollout")),
                                      **SamplerPolicy.rollout_buckets(config, concurrent, template))
    evaluate(tasks, policy, template=template, config=config,
             workdir=workdir, n_per_task=_N_PER_TASK.value,
             pool=SandboxPool(max_concurrent=_MAX_CONCURRENT.value), keep_dirs=_KEEP.value,
             extra={"checkpoint": ckpt_ref,
                    "tokenizer": os.path.abspath(tokenizer_path)})


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "checkpoint"])
    app.run(main)
