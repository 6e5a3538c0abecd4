"""launch/factory.py end to end on 3 small papers the test writes (Markdown, LaTeX, PDF) plus one that is a
PaperBench paper: against a scripted endpoint (drafter, teacher and judge in one real HTTP server) the tasks get
valid rubrics, the teacher's episodes are graded and kept, the kept trajectories train one SFT step, and a
rerun does no work; against launch/serve.py serving SmolLM2-135M-Instruct the same command produces the tasks
and a report in which every failed draft is counted with the loader's or the parser's error."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from factory_endpoints import ScriptedEndpoint, chat_answer
from test_factory_ingest import make_papers

from klong_jax.rubric import load_rubric
from klong_jax.rubric.llm_judge import SYSTEM_PROMPT as JUDGE_PROMPT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "JAX_PLATFORMS": "cpu"}

SECTIONS = [{"requirements": "The method is implemented", "weight": 2},
            {"requirements": "The main result is reproduced", "weight": 1}]
SUBTASKS = [{"requirements": "The code runs end to end", "weight": 1}]
CRITERIA = [{"requirements": "reproduce.sh exists and runs the method", "task_category": "Code Development",
             "finegrained_task_category": "Method Implementation", "weight": 1},
            {"requirements": "The run writes its result to results.txt", "task_category": "Code Execution",
             "finegrained_task_category": "Evaluation, Metrics & Benchmarking", "weight": 3}]
REPRODUCE = "#!/bin/bash\necho 'accuracy 0.91' > results.txt\n"
# The teacher's episode: write the reproduction script, run it, submit (one call per turn).
TEACHER_CALLS = [("write_file", {"path": "submission/reproduce.sh", "content": REPRODUCE}),
                 ("bash", {"cmd": "cd submission && bash reproduce.sh && cat results.txt"}),
                 ("submit", {"end_message": "reproduce.sh writes results.txt"})]


def factory_script(body: dict, n: int):
    """Drafter, teacher and judge behind one endpoint, told apart by the request: the teacher's carries the
    tool schemas, the judge's the judge's system prompt; the drafter's step by its question."""
    system = body["messages"][0]["content"]
    if body.get("tools"):
        turn = sum(m["role"] == "assistant" for m in body["messages"])
        name, args = TEACHER_CALLS[min(turn, len(TEACHER_CALLS) - 1)]
        return chat_answer(f"Step {turn}.", tool_calls=[(name, args)])
    if system == JUDGE_PROMPT:
        return chat_answer("reproduce.sh and results.txt are there.\nVERDICT: PASS")
    question = body["messages"][-1]["content"]
    if "Write the leaf criteria" in question:
        return chat_answer(json.dumps({"criteria": CRITERIA}))
    if "Split it into subtasks" in question:
        return chat_answer("```json\n" + json.dumps({"subtasks": SUBTASKS}) + "\n```")
    return chat_answer("Here are the sections: " + json.dumps({"sections": SECTIONS}))


def run_factory(papers, out, url, *extra, check=True):
    cmd = [sys.executable, os.path.join(ROOT, "launch", "factory.py"), f"--papers={papers}", f"--out={out}",
           f"--teacher={url}", f"--judge={url}", "--config=configs/rl_stage3.py:tiny",
           "--config.agent.max_turns=6", "--config.agent.timeout_s=120", "--config.agent.max_new_tokens_per_turn=160",
           "--config.data.pipeline.context.budget_tokens=4096",
           "--endpoint_timeout_s=60", "--endpoint_attempts=2", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=900)
    if check:
        assert proc.returncode == 0, f"factory.py failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def add_paperbench_paper(papers: pathlib.Path) -> None:
    """A paper whose title is one of PaperBench's (decontamination skips it)."""
    (papers / "sapg.md").write_text("# SAPG: Split and Aggregate Policy Gradients\n\n"
                                    + "We split the policy gradient over many environments. " * 20)


@pytest.fixture(scope="module")
def scripted_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("factory")
    papers = make_papers(root)
    add_paperbench_paper(papers)
    out = root / "out"
    with ScriptedEndpoint(factory_script) as server:
        proc = run_factory(papers, out, server.url, "--n_per_task=1", "--threshold=0.9")
        requests = list(server.requests)
        rerun = run_factory(papers, out, server.url, "--n_per_task=1", "--threshold=0.9")
        rerun_requests = len(server.requests) - len(requests)
    return dict(root=root, out=out, proc=proc, requests=requests, rerun=rerun, rerun_requests=rerun_requests)


def test_scripted_factory_makes_valid_tasks_and_keeps_graded_trajectories(scripted_run):
    out = scripted_run["out"]
    report = json.loads((out / "report.json").read_text())
    tasks = sorted(p.name for p in (out / "tasks").iterdir())
    # 4 papers in; the PaperBench one is skipped by decontamination; 3 tasks, each with a rubric that loads:
    # 2 sections x 1 subtask x 2 criteria = 4 leaves.
    assert report["papers_in"] == 4 and len(tasks) == 3, report
    for name in tasks:
        rubric = load_rubric(out / "tasks" / name / "rubric.json")
        assert sum(1 for _ in rubric.leaves()) == 4
        assert {p.name for p in (out / "tasks" / name).iterdir()} >= {
            "paper.md", "addendum.md", "blacklist.txt", "config.yaml", "rubric.json"}
    manifest = json.loads((out / "manifest.json").read_text())["papers"]
    skipped = [p for p in manifest.values() if p["stages"].get("decontaminate", {}).get("status") == "skipped"]
    assert len(skipped) == 1 and "title" in skipped[0]["stages"]["decontaminate"]["reason"].lower()
    # Drafting: per paper 1 sections call + 2 subtasks calls + 2 criteria calls = 5 calls; teacher: 3 turns; judge:
    # 4 leaves (every leaf goes to the judge: no check commands) -> 12 requests per paper, 36 in all.
    kinds = {"teacher": 0, "judge": 0, "drafter": 0}
    for body in scripted_run["requests"]:
        kinds["teacher" if body.get("tools") else
              "judge" if body["messages"][0]["content"] == JUDGE_PROMPT else "drafter"] += 1
    assert kinds == {"teacher": 9, "judge": 12, "drafter": 15}, kinds
    # Every leaf passes: score 1.0 >= 0.9, so each task's one episode is kept.
    lines = [json.loads(x) for x in (out / "teacher.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and all(t["reward"] == 1.0 for t in lines)
    calls = [c["name"] for t in lines for m in t["messages"] if m["role"] == "assistant" for c in m["tool_calls"]]
    assert calls == ["write_file", "bash", "submit"] * 3
    stages = report["stages"]
    assert stages["rubric"]["done"] == 3 and stages["teacher"]["done"] == 3
    assert report["episodes_run"] == 3 and report["episodes_kept"] == 3 and report["rubrics_made"] == 3
    assert report["score_histogram"]["counts"] == [0] * 9 + [3]
    # Tokens (the scripted usage: 100 prompt + 10 completion per answer): 15 drafter + 9 teacher answers.
    assert report["tokens"] == {"prompt": 2400, "completion": 240, "total": 2640}


def test_rerun_is_cached(scripted_run):
    assert scripted_run["rerun_requests"] == 0
    assert "cached" in scripted_run["rerun"].stdout
    assert scripted_run["out"].joinpath("teacher.jsonl").read_text().count("\n") == 3


def test_an_interrupted_teacher_stage_is_redone(scripted_run, tmp_path):
    """A run stopped during a paper's teacher stage leaves its episode directory and no finished record (before the
    fix: FileExistsError on rerun): the rerun removes it and redoes that paper's episodes (3 teacher turns + 4 judge
    calls), nothing else."""
    import shutil
    out = tmp_path / "out"
    shutil.copytree(scripted_run["out"], out, symlinks=True)
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    pid = sorted(p for p, e in manifest["papers"].items() if "teacher" in e["stages"])[0]
    del manifest["papers"][pid]["stages"]["teacher"]
    manifest_path.write_text(json.dumps(manifest))
    leftover = out / "episodes" / pid / f"teacher-{pid}-g0" / "paper"    # what a killed run leaves
    leftover.mkdir(parents=True)
    (leftover / "paper.md").write_text("copied in before the run stopped\n")
    papers = scripted_run["root"] / "papers"
    with ScriptedEndpoint(factory_script) as server:
        proc = run_factory(papers, out, server.url, "--n_per_task=1", "--threshold=0.9")
        assert len(server.requests) == 3 + 4, len(server.requests)
    assert f"{pid}: removing" in proc.stdout
    assert (out / "teacher.jsonl").read_text().count("\n") == 3


def test_kept_trajectories_train_one_sft_step(scripted_run, tmp_path):
    out = scripted_run["out"]
    from klong_jax.training.embedded_data import tokenizer_of
    from configs.sft import get_config
    tokenizer = tokenizer_of(get_config("tiny").data)
    workdir = tmp_path / "sft"
    values = {"train.steps": 1, "train.log_every": 1, "train.eval_every": 1, "train.eval_batches": 1,
              "checkpoint.every": 1, "checkpoint.async_save": False, "data.train_paths": out / "teacher.jsonl",
              "data.tokenizer": tokenizer, "train.seq_len": 4096, "data.pipeline.context.budget_tokens": 4096}
    cmd = [sys.executable, os.path.join(ROOT, "launch", "train.py"), "--config=configs/sft.py:tiny",
           f"--workdir={workdir}", *[f"--config.{k}={v}" for k, v in values.items()]]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=900)
    assert proc.returncode == 0, f"train.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    train = [r for r in map(json.loads, open(workdir / "metrics.jsonl")) if r["split"] == "train"]
    assert [r["step"] for r in train] == [1] and train[0]["nonfinite"] == 0.0 and train[0]["loss"] > 0
    assert os.path.isdir(workdir / "checkpoints" / "1")


def test_served_smol_model_makes_tasks_and_counts_failed_drafts(tmp_path, smol_server):
    papers = make_papers(tmp_path)
    out = tmp_path / "out"
    proc = run_factory(papers, out, smol_server, "--rubric_attempts=1", "--rubric_max_tokens=32",
                       "--rubric_sizes=2,2,2", "--judge_model=smol", "--teacher_model=smol", "--n_per_task=1",
                       "--stages=ingest,rubric")
    report = json.loads((out / "report.json").read_text())
    assert report["papers_in"] == 3 and len(list((out / "tasks").iterdir())) == 3
    rubric = report["stages"]["rubric"]
    # Each paper's draft is either a rubric that loads or a failure with its error; nothing is silently dropped.
    assert rubric["done"] + rubric["failed"] == 3, rubric
    manifest = json.loads((out / "manifest.json").read_text())["papers"]
    for pid, entry in manifest.items():
        record = entry["stages"]["rubric"]
        assert record["tokens"]["prompt"] > 0
        if record["status"] == "failed":
            # One answer per step (--rubric_attempts=1): the draft stops at the first step whose answer does not
            # load (under each step's schema: one cut by the 32-token budget, or the loader's message), and the
            # error counts the answers of every step so far.
            draft = json.loads((out / "drafts" / f"{pid}.json").read_text())
            assert all(step["attempts"] == 1 for step in draft["steps"]) and not draft["steps"][-1]["ok"]
            assert f"invalid at step {draft['failed_step']} after {len(draft['steps'])} answers" in record["error"]
        else:
            load_rubric(out / record["outputs"]["rubric"])
    assert "[factory rubric] 3/3" in proc.stdout and "papers in" in proc.stdout.lower()


@pytest.mark.slow
def test_served_smol_model_drafts_rubrics_that_load_under_the_json_schema(tmp_path, smol_server):
    """The acceptance run: SmolLM2-135M behind launch/serve.py drafts every paper's rubric, because each drafting
    call sends its JSON schema as response_format and the server decodes under it (without it: 0 of 3 load).
    About 3 minutes per paper on 2 cores."""
    papers = make_papers(tmp_path)
    out = tmp_path / "out"
    proc = run_factory(papers, out, smol_server, "--rubric_attempts=2", "--rubric_max_tokens=384",
                       "--rubric_sizes=1,1,2", "--judge_model=smol", "--teacher_model=smol", "--stages=ingest,rubric")
    report = json.loads((out / "report.json").read_text())
    assert report["stages"]["rubric"]["done"] >= 2, report["stages"]["rubric"]
    for task in (out / "tasks").iterdir():
        if (task / "rubric.json").exists():
            root = load_rubric(task / "rubric.json")
            assert 1 <= len(list(root.leaves())) <= 2
    assert "[factory rubric] 3/3" in proc.stdout
