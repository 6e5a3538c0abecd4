"""PaperBench paper directories as tasks: loading, layout errors, the episode's files, grading (command
checks in the real sandbox, the LLM judge against a local endpoint, no judge = invalid), and one episode
end to end through the agent runner with the blacklist enforced."""
import json

import pytest

from klong_jax.agent import AgentConfig, ScriptedPolicy, run_episodes
from klong_jax.data.chatml_template import ChatMLTemplate
from klong_jax.data.context import ContextConfig
from klong_jax.data.tokenizer import HuggingFaceTokenizer
from klong_jax.data.train_tokenizer import train_hf_tokenizer_json
from klong_jax.data.trajectory import Message, ToolCall
from klong_jax.sandbox import Sandbox, SandboxPool
from klong_jax.tasks import (JudgeEndpoint, PaperTask, PaperTaskError, find_task_dirs, generate_task,
                             load_paper_task, load_tasks, save_task, system_prompt)
from klong_jax.tasks.grading import grade_episode_result
from test_rubric_judges import ScriptedServer

AUTHORS_REPO = "https://github.com/Authors/Method-Code"


def leaf(id_, weight, requirements, category, check=None):
    node = {"id": id_, "requirements": requirements, "weight": weight, "sub_tasks": [],
            "task_category": category}   # no finegrained_task_category, as in many official leaves
    if check is not None:
        node["check"] = check
    return node


def internal(id_, weight, requirements, children):
    return {"id": id_, "requirements": requirements, "weight": weight, "sub_tasks": children,
            "task_category": None, "finegrained_task_category": None}


# root (uuid)
#   impl (w2): reproduce.sh exists [check] (w1), README explains the method [no check] (w1)
#   results (w1): "acc-cifar" (w1) 0.91 in results.csv [check], "acc-cifar" again (w3) 0.95 [check]
def official_rubric():
    return internal("0b6f3c1e-2a4d-4c5b-9e8f-7a6b5c4d3e2f", 1, "The paper's contributions are reproduced", [
        internal("1c2d3e4f-5a6b-4c7d-8e9f-0a1b2c3d4e5f", 2, "The method is implemented", [
            leaf("2d3e4f5a-6b7c-4d8e-9f0a-1b2c3d4e5f6a", 1, "reproduce.sh exists", "Code Development",
                 check="test -f reproduce.sh"),
            leaf("3e4f5a6b-7c8d-4e9f-0a1b-2c3d4e5f6a7b", 1, "README.md explains the method",
                 "Code Development"),
        ]),
        internal("4f5a6b7c-8d9e-4f0a-1b2c-3d4e5f6a7b8c", 1, "The results are reproduced", [
            leaf("acc-cifar", 1, "CIFAR accuracy 0.91 is reported", "Result Analysis",
                 check="grep -qx 'cifar,0.91' results.csv"),
            leaf("acc-cifar", 3, "CIFAR accuracy 0.95 is reported", "Result Analysis",
                 check="grep -qx 'cifar,0.95' results.csv"),
        ]),
    ])


def make_paper_dir(parent, name="toy-paper", *, blacklist=f"{AUTHORS_REPO}\n", rubric=None):
    d = parent / name
    (d / "assets").mkdir(parents=True)
    (d / "config.yaml").write_text(f'id: {name}\ntitle: "Toy: a paper about accuracy"\n')
    (d / "paper.md").write_text("# Toy paper\n\nWe report CIFAR accuracy 0.91. PAPER-BODY-MARKER\n")
    (d / "paper.pdf").write_bytes(b"%PDF-1.4 toy\n")
    (d / "addendum.md").write_text("Use the CPU. ADDENDUM-MARKER\n")
    (d / "judge.addendum.md").write_text("Accept 0.90-0.92. JUDGE-ADDENDUM-MARKER\n")
    (d / "blacklist.txt").write_text(blacklist)
    (d / "assets" / "fig1.png").write_bytes(b"\x89PNG toy")
    (d / "rubric.json").write_text(json.dumps(rubric or official_rubric(), indent=4))
    return d


def test_paper_dir_loads_as_a_task(tmp_path):
    task = load_paper_task(make_paper_dir(tmp_path))
    assert isinstance(task, PaperTask)
    assert (task.task_id, task.title) == ("toy-paper", "Toy: a paper about accuracy")
    assert task.blacklist == (AUTHORS_REPO,)
    assert task.rubric_path == tmp_path / "toy-paper" / "rubric.json"
    assert [n.id for n in task.rubric_tree.leaves()].count("acc-cifar") == 2
    assert task.rubric["sub_tasks"][1]["sub_tasks"][1]["id"] == "acc-cifar"
    for text in ("paper/paper.md", "paper/paper.pdf", "paper/assets/", "paper/addendum.md",
                 "submission/reproduce.sh", "bash reproduce.sh", "submission/README.md", AUTHORS_REPO, "submit"):
        assert text in task.spec, text
    assert "JUDGE-ADDENDUM-MARKER" not in task.spec and task.judge_addendum.startswith("Accept")


@pytest.mark.parametrize("text", ["none\n", "", "\n# no code released\n  \n", "NONE"])
def test_empty_blacklists(tmp_path, text):
    task = load_paper_task(make_paper_dir(tmp_path, blacklist=text))
    assert task.blacklist == ()
    assert "No resource is blacklisted" in task.spec


def test_missing_files_are_named_with_the_directory(tmp_path):
    d = make_paper_dir(tmp_path)
    (d / "blacklist.txt").unlink()
    (d / "config.yaml").unlink()
    with pytest.raises(PaperTaskError, match=rf"^{d}: not a complete PaperBench paper directory: missing "
                                             r"blacklist.txt, config.yaml \(it needs paper.md, "):
        load_paper_task(d)


def test_every_bad_file_is_reported_at_once(tmp_path):
    d = make_paper_dir(tmp_path)
    (d / "paper.md").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:4a5a\nsize 101711\n")
    (d / "addendum.md").write_bytes(b"caf\xe9\n")
    (d / "config.yaml").write_text("id: toy\ntitle: [unclosed\n")
    (d / "rubric.json").write_text(json.dumps(internal("r", 1, "root", [leaf("x", 1, "r", "Coding")])))
    (d / "assets" / "fig1.png").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:88a8fa\n")
    with pytest.raises(PaperTaskError) as info:
        load_paper_task(d)
    problems = info.value.problems
    assert len(problems) == 5 and str(info.value).startswith(f"{d}: cannot load as a task (5 problem(s))")
    assert problems[0].startswith(f"{d / 'config.yaml'}: line ") and "not valid YAML" in problems[0]
    assert problems[1].startswith(f"{d / 'paper.md'}: is a Git LFS pointer")
    assert problems[2].startswith(f"{d / 'addendum.md'}: the addendum file is not UTF-8 text: byte 0xe9")
    assert problems[3].startswith(f"{d / 'rubric.json'}: node root.sub_tasks[0] (id 'x'): a leaf needs")
    assert problems[4] == (f"{d}: 1 file(s) the agent would get are Git LFS pointers, not the files "
                           "(assets/fig1.png; fetch the content, e.g. `git lfs pull` in the repository it came from)")


@pytest.mark.parametrize("config, message", [
    ("id: ../escape\ntitle: t\n", "field `id` must be a name of letters"),
    ("id: toy\n", "field `title` must be a non-empty string"),
    ("- id\n- title\n", "must be a mapping with `id` and `title`"),
])
def test_config_errors_name_the_field(tmp_path, config, message):
    d = make_paper_dir(tmp_path)
    (d / "config.yaml").write_text(config)
    with pytest.raises(PaperTaskError, match=message) as info:
        load_paper_task(d)
    assert info.value.problems[0].startswith(f"{d / 'config.yaml'}: ")


def test_task_dirs_of_both_kinds_are_found_and_loaded(tmp_path):
    root = tmp_path / "tasks_root"
    root.mkdir()
    make_paper_dir(root, "b-paper")
    embedded = generate_task(0, seed=3, difficulty=1, length=4)
    save_task(embedded, root)
    (root / "notes").mkdir()      # neither kind: not a task
    found = find_task_dirs(root)
    assert [(kind, d.name) for kind, d in found] == [("paper", "b-paper"), ("embedded", embedded.task_id)]
    tasks = load_tasks(root)
    assert [type(t).__name__ for t in tasks] == ["PaperTask", "Task"]
    assert [kind for kind, _ in find_task_dirs(root / "b-paper")] == ["paper"]   # one task dir
    with pytest.raises(FileNotFoundError, match=f"^{root / 'notes'}: no task directory in it or under it"):
        find_task_dirs(root / "notes")
    (root / "c-broken").mkdir()   # looks like a paper (has a rubric.json) but is incomplete: an error
    (root / "c-broken" / "rubric.json").write_text(json.dumps(official_rubric()))
    with pytest.raises(PaperTaskError, match=rf"^{root / 'c-broken'}: not a complete PaperBench paper "
                                             r"directory: missing paper.md, addendum.md, blacklist.txt, config.yaml"):
        load_tasks(root)


def test_setup_gives_the_agent_the_paper_and_an_empty_submission(tmp_path):
    task = load_paper_task(make_paper_dir(tmp_path))
    episode = tmp_path / "episode"
    task.setup(episode)
    given = sorted(str(p.relative_to(episode)) for p in episode.rglob("*"))
    assert given == ["paper", "paper/addendum.md", "paper/assets", "paper/assets/fig1.png",
                     "paper/blacklist.txt", "paper/paper.md", "paper/paper.pdf", "submission"]
    assert (episode / "paper" / "paper.md").read_text().endswith("PAPER-BODY-MARKER\n")
    with pytest.raises(FileExistsError, match="must start empty"):
        task.setup(episode)


def test_grading_without_a_judge_runs_checks_in_the_submission_and_never_passes_silently(tmp_path):
    task = load_paper_task(make_paper_dir(tmp_path))
    episode = tmp_path / "episode"
    task.setup(episode)
    with Sandbox(episode) as sb:
        assert sb.run("cd submission && touch reproduce.sh && echo cifar,0.91 > results.csv "
                      "&& touch ../reproduce.sh").ok
        result = grade_episode_result(task, sb, 10.0)   # what the runner calls
    leaves = {leaf.key: leaf for leaf in result.leaves()}
    assert leaves["/0/0"].score == 1.0 and leaves["/0/0"].valid
    assert leaves["/0/0"].metadata["check"] == "test -f reproduce.sh"
    readme = leaves["/0/1"]
    assert readme.score == 0.0 and not readme.valid and readme.judge == "none"
    assert "no LLM judge endpoint" in readme.explanation
    # The repeated id: each leaf its own verdict and weight.
    assert (leaves["/1/0"].id, leaves["/1/0"].score) == ("acc-cifar", 1.0)
    assert (leaves["/1/1"].id, leaves["/1/1"].score) == ("acc-cifar", 0.0)
    assert leaves["/1/0"].duplicate_id and result.summary()["duplicate_ids"] == ["acc-cifar"]
    # impl = (1 + 0) / 2; results = (1*1 + 3*0) / 4; root = (2*0.5 + 1*0.25) / 3
    assert result.score == pytest.approx((2 * 0.5 + 0.25) / 3)
    assert not result.valid and result.summary()["invalid"] == 1


def test_checks_fail_when_the_submission_directory_is_gone(tmp_path):
    task = load_paper_task(make_paper_dir(tmp_path))
    episode = tmp_path / "episode"
    task.setup(episode)
    with Sandbox(episode) as sb:
        assert sb.run("rm -r submission && touch reproduce.sh").ok   # at the top, not in submission/
        result = task.grade_result(sb, 10.0)
    assert [leaf.score for leaf in result.leaves() if leaf.judge == "command"] == [0.0, 0.0, 0.0]
    assert all(leaf.valid for leaf in result.leaves() if leaf.judge == "command")


def test_llm_judge_grades_the_other_leaves_from_the_submission(tmp_path, monkeypatch):
    monkeypatch.setenv("TOY_JUDGE_KEY", "secret-key")
    with ScriptedServer([("content", "The README explains it.\nVERDICT: PASS")]) as server:
        judge = JudgeEndpoint(server.url, "judge-model", api_key_env="TOY_JUDGE_KEY", timeout_s=5.0,
                              max_attempts=1, max_workers=2)
        task = load_paper_task(make_paper_dir(tmp_path), judge=judge)
        episode = tmp_path / "episode"
        task.setup(episode)
        with Sandbox(episode) as sb:
            assert sb.run("cd submission && touch reproduce.sh && echo 'The method: SUBMISSION-MARKER' "
                          "> README.md && echo cifar,0.95 > results.csv").ok
            result = grade_episode_result(task, sb, 60.0)   # check timeout: ample on a loaded machine
    assert len(server.requests) == 1   # only the leaf without a check went to the endpoint
    request = server.requests[0]
    assert request["auth"] == "Bearer secret-key" and request["body"]["model"] == "judge-model"
    prompt = request["body"]["messages"][1]["content"]
    assert "README.md explains the method" in prompt and "SUBMISSION-MARKER" in prompt
    for marker in ("ADDENDUM-MARKER", "JUDGE-ADDENDUM-MARKER", "PAPER-BODY-MARKER"):
        assert marker in prompt   # the task text the judge reads
    assert "  README.md (" in prompt and "  paper/paper.md (" not in prompt   # it reads submission/ only
    assert result.valid
    # impl = (1 + 1) / 2; results = (1*0 + 3*1) / 4; root = (2*1 + 0.75) / 3
    assert result.score == pytest.approx((2 + 0.75) / 3)


# --------------------------------------------------------------------------------------------------
# One episode end to end: the runner, the real tools and sandbox, the blacklist, the rubric.

def test_paper_task_episode_end_to_end(tmp_path):
    task = load_paper_task(make_paper_dir(tmp_path))

    def call(name, arguments, thought):
        return Message("assistant", "", thought, (ToolCall("c", name, arguments),))

    script = [
        call("bash", {"cmd": f"touch submission/CLONE-RAN && git clone {AUTHORS_REPO.lower()}.git ref"},
             "Fetch the authors' code."),
        call("write_file", {"path": "submission/reproduce.sh",
                            "content": "#!/bin/bash\nset -e\npython3 -c \"print('cifar,0.91')\" > results.csv\n"},
             "Write the reproduction script."),
        call("bash", {"cmd": "cd submission && bash reproduce.sh && cat results.csv"}, "Run it."),
        call("submit", {"end_message": "Reproduced CIFAR accuracy."}, "Done."),
    ]
    texts = [system_prompt(), task.spec] + [m.reasoning + json.dumps(m.tool_calls[0].arguments) for m in script]
    tokenizer = HuggingFaceTokenizer(train_hf_tokenizer_json(
        texts, str(tmp_path / "tok.json"), vocab_size=400,
        special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>")))
    template = ChatMLTemplate(tokenizer)
    config = AgentConfig(context=ContextConfig(budget_tokens=16384, reserve_tokens=512,
                                               max_tool_result_tokens=200), timeout_s=120.0, max_turns=10)
    [r] = run_episodes([task], ScriptedPolicy(template, {task.task_id: script}), n_per_task=1,
                       template=template, config=config, pool=SandboxPool(1), workdir=str(tmp_path / "run"),
                       keep_dirs=True)
    assert r.finish_reason == "submit" and len(r.turns) == 4
    observations = [m.content for m in r.messages if m.role == "tool"]
    assert "blacklisted for this task" in observations[0] and AUTHORS_REPO in observations[0]
    episode = tmp_path / "run" / f"{task.task_id}-g0"
    assert not (episode / "submission" / "CLONE-RAN").exists()   # the refused command did not run
    assert observations[2] == "cifar,0.91"
    assert (episode / "submission" / "results.csv").read_text() == "cifar,0.91\n"
    # reproduce.sh 1, README invalid (no judge) 0: impl 0.5; results (1*1 + 3*0) / 4; root (2*0.5 + 0.25) / 3
    assert r.reward == pytest.approx((2 * 0.5 + 0.25) / 3)
    assert r.grade_valid is False and r.grade["invalid"] == 1 and r.grade["duplicate_ids"] == ["acc-cifar"]
