"""Research-Factory: research papers -> PaperBench-format tasks -> LLM-drafted rubrics -> teacher trajectories
kept by their rubric score (rejection sampling), as trajectory JSONL that SFT reads.

  python launch/factory.py --papers=DIR --out=DIR --teacher=URL --judge=URL \
      [--teacher_model=NAME --judge_model=NAME] [--drafter=URL --drafter_model=NAME]   (rubric drafter: the judge's)
      [--config=configs/rl_stage3.py:smol --config.agent.max_turns=60 ...]   (the trained model: tokenizer, chat
                                                                               template, context and agent budget)
      [--stages=ingest,rubric,teacher --n_per_task=2 --threshold=0.5 --eval_set=FILE_OR_DIR]

URLs are OpenAI-compatible endpoints up to /v1 (`launch/serve.py` serves one; the key comes from $OPENAI_API_KEY
or --api_key_env). Per paper, each stage is cached in OUT/manifest.json with the hash of its inputs: rerunning the
command redoes only what failed, what changed and what never finished; a paper that fails a stage is recorded
with its error and never stops the others.

Stages (klong_jax/factory):
  ingest          papers (Markdown, a LaTeX source directory, a PDF) -> OUT/converted/<id> (paper.md, addendum.md,
                  blacklist.txt, config.yaml);
  decontaminate   (with ingest) a paper matching the evaluation set (title, arXiv id, long n-gram overlap;
                  PaperBench's papers by default) is skipped with the reason; the others -> OUT/tasks/<id>;
  rubric          the drafter writes OUT/tasks/<id>/rubric.json top-down, validated by klong_jax.rubric (an invalid
                  answer is retried with the loader's error); every attempt in OUT/drafts/<id>.json;
  teacher         n_per_task episodes per task, the agent driven by the teacher endpoint in the sandbox, graded by
                  the judge; episodes scoring >= threshold -> OUT/trajectories/<id>.jsonl, all of them together
                  -> OUT/teacher.jsonl (`--config.data.train_paths` of configs/sft.py).
The report (papers in, skipped and why, rubrics made, episodes run and kept, score histogram, tokens, papers per
minute per stage) is printed and written to OUT/report.json and OUT/report.txt.
"""
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("ingest", "rubric", "teacher")

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(ROOT, "configs", "rl_stage3.py") + ":smol",
    "the trained model's config: its data section gives the tokenizer and chat template the trajectories are "
    "measured in (the context budget), its agent section the episode budget (timeout_s, max_turns, ...)")
_PAPERS = flags.DEFINE_string("papers", None, "directory of papers: NAME.md, NAME.pdf, or a LaTeX source directory")
_OUT = flags.DEFINE_string("out", None, "output directory (manifest, tasks, drafts, trajectories, report)")
_STAGES = flags.DEFINE_list("stages", list(STAGES), f"stages to run, in order, from {list(STAGES)}")
_TEACHER = flags.DEFINE_string("teacher", "", "teacher endpoint URL, e.g. http://127.0.0.1:8000/v1")
_TEACHER_MODEL = flags.DEFINE_string("teacher_model", "teacher", "model name sent to the teacher endpoint")
_JUDGE = flags.DEFINE_string("judge", "", "judge endpoint URL (grades the rubric leaves without a check command)")
_JUDGE_MODEL = flags.DEFINE_string("judge_model", "judge", "model name sent to the judge endpoint")
_DRAFTER = flags.DEFINE_string("drafter", "", "rubric drafter endpoint URL (default: --judge)")
_DRAFTER_MODEL = flags.DEFINE_string("drafter_model", "", "model name sent to the drafter (default: --judge_model)")
_API_KEY_ENV = flags.DEFINE_string("api_key_env", "OPENAI_API_KEY", "environment variable holding the API key")
_ENDPOINT_TIMEOUT = flags.DEFINE_float("endpoint_timeout_s", 600.0, "seconds per endpoint request attempt")
_ENDPOINT_ATTEMPTS = flags.DEFINE_integer("endpoint_attempts", 4, "attempts per endpoint request (retries + 1)")
_EVAL_SET = flags.DEFINE_string("eval_set", "", "evaluation papers to keep out: a JSON list of {title, arxiv_id, "
                                "text?} or a directory of PaperBench paper dirs (default: PaperBench's papers)")
_NGRAM = flags.DEFINE_integer("ngram", 13, "decontamination: words per shingle")
_NGRAM_THRESHOLD = flags.DEFINE_float("ngram_threshold", 0.1, "decontamination: share of a paper's shingles "
                                      "found in an evaluation paper at which it is skipped")
_MIN_WORDS = flags.DEFINE_integer("min_words", 20, "ingest: a paper with fewer words is an error")
_RUBRIC_ATTEMPTS = flags.DEFINE_integer("rubric_attempts", 3, "drafter answers per drafting step")
_RUBRIC_MAX_TOKENS = flags.DEFINE_integer("rubric_max_tokens", 4096, "tokens per drafter answer")
_JUDGE_JSON_SCHEMA = flags.DEFINE_bool(
    "judge_json_schema", False, 'ask the judge for {"explanation", "verdict"} under a JSON schema (response_format) '
    "instead of a final VERDICT line: for small local judges (launch/serve.py decodes under the schema)")
_RUBRIC_JSON_SCHEMA = flags.DEFINE_bool(
    "rubric_json_schema", True, "send each drafting step's JSON schema as response_format (answers decoded under "
    "it by servers that support it: launch/serve.py, vLLM, SGLang, OpenAI); --norubric_json_schema for endpoints "
    "that reject response_format")
_RUBRIC_SIZES = flags.DEFINE_list("rubric_sizes", ["8", "8", "8"],
                                  "most sections, subtasks per section, criteria per subtask")
_N_PER_TASK = flags.DEFINE_integer("n_per_task", 2, "teacher episodes per task")
_THRESHOLD = flags.DEFINE_float("threshold", 0.5, "rubric score at or above which an episode is kept")
_TEACHER_MAX_TOKENS = flags.DEFINE_integer("teacher_max_tokens", 0, "cap on one teacher answer (0: the turn's "
                                           "own limit from the agent config)")
_MAX_CONCURRENT = flags.DEFINE_integer("max_concurrent", 8, "episodes (sandboxes) at once")


class Clock:
    """Elapsed time and an ETA from the mean time per item done so far."""

    def __init__(self, total: int):
        self.total, self.t0 = total, time.monotonic()

    def line(self, done: int) -> str:
        from klong_jax.agent.runner import clock_text
        elapsed = time.monotonic() - self.t0
        eta = elapsed / done * (self.total - done) if done else None
        return f"elapsed {clock_text(elapsed)} | ETA {clock_text(eta) if eta is not None else '?'}"


def check_flags() -> list[str]:
    stages = [s.strip() for s in _STAGES.value if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise app.UsageError(f"--stages: {unknown} not in {list(STAGES)}")
    if not _PAPERS.value or not _OUT.value:
        raise app.UsageError("--papers and --out are required")
    if "rubric" in stages and not (_DRAFTER.value or _JUDGE.value):
        raise app.UsageError("the rubric stage needs --drafter or --judge (an OpenAI-compatible endpoint URL)")
    if "teacher" in stages and not (_TEACHER.value and _JUDGE.value):
        raise app.UsageError("the teacher stage needs --teacher and --judge (OpenAI-compatible endpoint URLs)")
    if not 0.0 <= _THRESHOLD.value <= 1.0:
        raise app.UsageError(f"--threshold={_THRESHOLD.value} must be in [0, 1] (a rubric score)")
    if _N_PER_TASK.value < 1:
        raise app.UsageError(f"--n_per_task={_N_PER_TASK.value} must be >= 1")
    if len(_RUBRIC_SIZES.value) != 3 or not all(v.isdigit() and int(v) > 0 for v in _RUBRIC_SIZES.value):
        raise app.UsageError(f"--rubric_sizes={','.join(_RUBRIC_SIZES.value)}: three positive integers "
                             "(sections, subtasks per section, criteria per subtask), e.g. 8,8,8")
    return stages


def endpoint(url: str, model: str):
    from klong_jax.factory.endpoint import ChatEndpoint
    try:
        return ChatEndpoint(url, model, api_key_env=_API_KEY_ENV.value, timeout_s=_ENDPOINT_TIMEOUT.value,
                            max_attempts=_ENDPOINT_ATTEMPTS.value)
    except ValueError as e:
        raise app.UsageError(str(e)) from None


def rubric_stage(manifest, task_dirs) -> None:
    """Drafts rubric.json for every task directory that lacks a current one (cached per paper)."""
    from klong_jax.factory.ingest import read_task_config
    from klong_jax.factory.manifest import atomic_write_text, file_sha256, hash_inputs
    from klong_jax.factory.rubric_draft import draft_rubric
    drafter = endpoint(_DRAFTER.value or _JUDGE.value, _DRAFTER_MODEL.value or _JUDGE_MODEL.value)
    sections, subtasks, criteria = (int(v) for v in _RUBRIC_SIZES.value)
    clock = Clock(len(task_dirs))
    for i, task_dir in enumerate(task_dirs):
        pid = os.path.basename(task_dir)
        h = hash_inputs("rubric/v2", drafter.model, _RUBRIC_ATTEMPTS.value, _RUBRIC_MAX_TOKENS.value,
                        _RUBRIC_JSON_SCHEMA.value,
                        sections, subtasks, criteria, file_sha256(os.path.join(task_dir, "paper.md")),
                        file_sha256(os.path.join(task_dir, "addendum.md")))
        rubric_path = os.path.join(task_dir, "rubric.json")
        with manifest.stage(pid, "rubric", h) as st:
            if st.cached:
                what = "cached"
            else:
                if os.path.exists(rubric_path):   # drafted from other inputs: never left beside a new draft
                    os.remove(rubric_path)
                title = read_task_config(task_dir).get("title") or pid
                paper = open(os.path.join(task_dir, "paper.md"), encoding="utf-8").read()
                draft = draft_rubric(drafter, paper, title, max_attempts=_RUBRIC_ATTEMPTS.value,
                                     max_tokens=_RUBRIC_MAX_TOKENS.value, max_sections=sections,
                                     max_subtasks=subtasks, max_criteria=criteria,
                                     json_schema=_RUBRIC_JSON_SCHEMA.value)
                st.add_tokens(draft.prompt_tokens, draft.completion_tokens)
                drafts_rel = os.path.join("drafts", f"{pid}.json")
                atomic_write_text(manifest.out_dir / drafts_rel, json.dumps(draft.to_dict(), indent=1))
                metrics = {"calls": draft.attempts}
                if draft.ok:
                    atomic_write_text(rubric_path, json.dumps(draft.rubric, indent=1))
                    st.done(outputs={"rubric": os.path.relpath(rubric_path, manifest.out_dir),
                                     "draft": drafts_rel}, metrics={**metrics, "rubrics": 1, "leaves": draft.n_leaves})
                    what = f"drafted, {draft.n_leaves} leaves"
                else:
                    last = draft.errors[-1] if draft.errors else "no error recorded"
                    st.fail(f"{draft.failure} at step {draft.failed_step} after {draft.attempts} answers: {last}",
                            metrics=metrics, info={"draft": drafts_rel})
                    what = f"failed ({draft.failure} at {draft.failed_step}): {last[:160]}"
        print(f"[factory rubric] {i + 1}/{len(task_dirs)} {pid}: {what} | {clock.line(i + 1)}", flush=True)


def teacher_stage(manifest, task_dirs, cfg) -> None:
    """Teacher episodes on every task with a rubric; the kept ones per paper, then OUT/teacher.jsonl."""
    from klong_jax.agent.runner import clock_text
    from klong_jax.factory.manifest import atomic_write_text, file_sha256, hash_inputs
    from klong_jax.factory.teacher import run_teacher
    from klong_jax.sandbox import SandboxPool
    from klong_jax.tasks import JudgeEndpoint, load_paper_task
    teacher = endpoint(_TEACHER.value, _TEACHER_MODEL.value)
    judge = JudgeEndpoint(_JUDGE.value, _JUDGE_MODEL.value, api_key_env=_API_KEY_ENV.value,
                          timeout_s=_ENDPOINT_TIMEOUT.value, max_attempts=_ENDPOINT_ATTEMPTS.value,
                          verdict_format="json" if _JUDGE_JSON_SCHEMA.value else "text")
    (template, template_id), config = student_template(cfg), agent_config(cfg)
    ready = [d for d in task_dirs if (manifest.record(os.path.basename(d), "rubric") or {}).get("status") == "done"
             and os.path.exists(os.path.join(d, "rubric.json"))]
    for d in task_dirs:
        if d not in ready:
            print(f"[factory teacher] {os.path.basename(d)}: no rubric, no teacher episodes", flush=True)
    pool = SandboxPool(max_concurrent=_MAX_CONCURRENT.value)
    clock, kept_files = Clock(len(ready)), []
    for i, task_dir in enumerate(ready):
        pid = os.path.basename(task_dir)
        h = hash_inputs("teacher/v2", teacher.model, judge.model, judge.verdict_format, _N_PER_TASK.value,
                        _THRESHOLD.value, _TEACHER_MAX_TOKENS.value, template_id, json.dumps(config.to_dict(), sort_keys=True, default=str),
                        *(file_sha256(os.path.join(task_dir, f)) for f in
                          ("paper.md", "addendum.md", "blacklist.txt", "rubric.json")))
        out_rel = os.path.join("trajectories", f"{pid}.jsonl")
        with manifest.stage(pid, "teacher", h) as st:
            if st.cached:
                what = f"cached, {st.record['metrics'].get('kept', 0)} kept"
            else:
                episodes_dir = manifest.out_dir / "episodes" / pid
                if episodes_dir.exists():      # the episodes of a run that did not finish this stage: redone
                    print(f"[factory teacher] {pid}: removing {episodes_dir} (a run that did not finish)", flush=True)
                    shutil.rmtree(episodes_dir)
                task = load_paper_task(task_dir, judge=judge)
                report = run_teacher(
                    [task], teacher, template=template, config=config, pool=pool,
                    workdir=str(episodes_dir), out_path=str(manifest.out_dir / out_rel),
                    n_per_task=_N_PER_TASK.value, threshold=_THRESHOLD.value,
                    max_tokens=_TEACHER_MAX_TOKENS.value or None,
                    on_step=lambda p, k=i: print(f"[factory teacher] {k + 1}/{len(ready)} {pid}: {p.line()}",
                                                 flush=True))
                st.add_tokens(report.endpoint.get("prompt_tokens", 0), report.endpoint.get("completion_tokens", 0))
                failed = {f["episode_id"] for f in report.failures}   # their scores (if any) are not the teacher's
                scores = [s for e, s in report.scores.items() if s is not None and e not in failed]
                atomic_write_text(manifest.out_dir / "trajectories" / f"{pid}.report.json",
                                  json.dumps(report.to_dict(), indent=1))
                st.done(outputs={"trajectories": out_rel},
                        metrics={"episodes": report.episodes, "kept": report.kept, "dropped": report.dropped,
                                 "failed": report.failed, "scores": scores, "turns": report.turns},
                        info={"failures": report.failures[:20], "finish_reasons": report.finish_reasons})
                what = (f"{report.episodes} episodes, kept {report.kept}, dropped {report.dropped}, "
                        f"failed {report.failed}, scores {[round(s, 3) for s in scores]}, "
                        f"{clock_text(report.elapsed_s)}")
        kept_files.append(manifest.out_dir / out_rel)
        print(f"[factory teacher] {i + 1}/{len(ready)} {pid}: {what} | {clock.line(i + 1)}", flush=True)
    # Every paper's kept trajectories in one training file (rewritten from the per-paper files, cached or not).
    lines = [line for path in kept_files for line in open(path, encoding="utf-8") if line.strip()]
    atomic_write_text(manifest.out_dir / "teacher.jsonl", "".join(lines))
    print(f"[factory teacher] {len(lines)} kept trajectories -> {manifest.out_dir / 'teacher.jsonl'}", flush=True)


def student_template(cfg):
    """(the trained model's chat template, an id of it for cache keys: template name and tokenizer file hash)."""
    from klong_jax.data.chat_template import check_chat_template_name, make_chat_template
    from klong_jax.data.tokenizer import load_tokenizer
    from klong_jax.factory.manifest import file_sha256
    from klong_jax.training.embedded_data import tokenizer_of
    path = tokenizer_of(cfg.data)
    if not path:
        raise app.UsageError("--config names no tokenizer (data.tokenizer or an embedded suite's): the "
                             "trajectories are measured in the trained model's tokens")
    name = cfg.data.get("chat_template", "auto")
    try:
        template = make_chat_template(load_tokenizer(path), check_chat_template_name(name, "data.chat_template"),
                                      field="data.chat_template")
    except ValueError as e:
        raise app.UsageError(f"--config: {e}") from None
    return template, f"{name}:{file_sha256(path) if os.path.isfile(path) else path}"


def agent_config(cfg):
    from klong_jax.agent import AgentConfig
    section = dict(cfg.agent.to_dict())
    context = section.pop("context", None) or cfg.data.pipeline.context.to_dict()
    try:
        return AgentConfig.from_mapping(section, context=context)
    except ValueError as e:
        raise app.UsageError(f"--config agent section: {e}") from None


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    stages = check_flags()
    cfg = _CONFIG.value
    from klong_jax.factory.decontaminate import EvalSetError, eval_set_from_flag
    from klong_jax.factory.ingest import IngestError, run_ingest
    from klong_jax.factory.manifest import Manifest, format_report, write_report
    try:
        eval_set = eval_set_from_flag(_EVAL_SET.value or None, ngram=_NGRAM.value, threshold=_NGRAM_THRESHOLD.value)
    except EvalSetError as e:
        raise app.UsageError(f"--eval_set: {e}") from None
    os.makedirs(_OUT.value, exist_ok=True)
    t0 = time.monotonic()
    with Manifest(_OUT.value) as manifest:
        if "ingest" in stages:
            try:
                task_dirs = run_ingest(_PAPERS.value, _OUT.value, manifest, eval_set, min_words=_MIN_WORDS.value,
                                       log=lambda msg: print(f"[factory ingest] {msg}", flush=True))
            except IngestError as e:
                raise app.UsageError(str(e)) from None
        else:   # the tasks an earlier run published
            tasks_root = manifest.out_dir / "tasks"
            task_dirs = sorted(tasks_root / d for d in os.listdir(tasks_root)) if tasks_root.is_dir() else []
        task_dirs = [str(d) for d in task_dirs]
        print(f"[factory] {len(task_dirs)} task(s) after ingest and decontamination", flush=True)
        if "rubric" in stages and task_dirs:
            rubric_stage(manifest, task_dirs)
        if "teacher" in stages and task_dirs:
            teacher_stage(manifest, task_dirs, cfg)
        report = write_report(manifest)
    print(format_report(report), flush=True)
    from klong_jax.agent.runner import clock_text
    print(f"[factory] done in {clock_text(time.monotonic() - t0)}; report: {os.path.join(_OUT.value, 'report.txt')}",
          flush=True)


if __name__ == "__main__":
    app.run(main)
