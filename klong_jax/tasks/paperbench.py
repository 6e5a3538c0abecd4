"""PaperBench paper directories as tasks for the agent runner and launch/eval.py (imports no JAX).

A paper directory (PaperBench's `data/papers/<paper>/`) holds

    paper.md        the paper in markdown                                   required
    addendum.md     the authors' clarifications and scope (may be empty)   required
    blacklist.txt   resources the agent must not use, one a line (`none`)  required
    rubric.json     the grading tree (klong_jax.rubric)                     required
    config.yaml     `id` and `title`                                        required
    paper.pdf, assets/   given to the agent when present
    judge.addendum.md    given to the judge only

    task = load_paper_task("papers/bam", judge=JudgeEndpoint("http://127.0.0.1:8000/v1", "judge-model"))
    tasks = load_tasks("papers")            # a task dir or a dir of them, embedded tasks and papers alike
    results = run_episodes(tasks, policy, ...)   # the same runner as embedded tasks

The episode: `task.setup(dir)` puts the paper in `dir/paper/` (paper.md, addendum.md, blacklist.txt,
paper.pdf, assets/) and creates an empty `dir/submission/`; the user message (`task.spec`) asks for a
reproduction in `submission/` with a `reproduce.sh`. The agent's tools refuse calls naming a blacklisted
resource (`task.blacklist`, klong_jax.tasks.tools.blacklist_hit).

Grading (`task.grade_result(sandbox)`, which klong_jax.tasks.grading.grade_episode_result calls) sees
`submission/` as the agent left it; reproduce.sh is not run by the grader, so the agent is told to run
it. Leaves with a `check` command are graded by CommandJudge, the command running in the episode's
sandbox with `submission/` as its working directory; every other leaf by an LLMJudge on `task.judge`'s
endpoint, which reads the submission's files and the paper, addendum and judge addendum as the task. With
no endpoint configured such leaves are invalid (score 0, valid False), never a silent pass or fail.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import shutil

import yaml

from klong_jax.rubric import (CommandJudge, GradeResult, GradingContext, LeafVerdict, LLMJudge, RubricError,
                              RubricNode, grade, load_rubric, read_text_file)
from klong_jax.rubric.tree import LFS_POINTER_PREFIX
from klong_jax.tasks.task import load_task
from klong_jax.tasks.tools import normalize_blacklist_entry

REQUIRED_FILES = ("paper.md", "addendum.md", "blacklist.txt", "rubric.json", "config.yaml")
AGENT_FILES = ("paper.md", "paper.pdf", "addendum.md", "blacklist.txt")   # copied when present
PAPER_DIR = "paper"            # in the episode directory: what the agent reads
SUBMISSION_DIR = "submission"  # in the episode directory: what is graded
_MARKERS = ("rubric.json", "config.yaml", "paper.md")   # a directory with one of these is a paper directory
_TASK_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class PaperTaskError(ValueError):
    """A paper directory that cannot be a task; the message names the directory or file and the fix.
    `problems`: one message per problem found (load_paper_task reports all of them at once)."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = list(problems) if problems else [message]


@dataclasses.dataclass(frozen=True)
class JudgeEndpoint:
    """An OpenAI-compatible chat-completions endpoint that grades the leaves without a `check` command.
    The API key is read from the environment variable `api_key_env` when grading (never stored).
    max_workers: leaves graded concurrently; verdict_format: LLMJudge's ("text" lines or "json")."""

    base_url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = 120.0
    max_attempts: int = 4
    max_workers: int = 8
    verdict_format: str = "text"         # "json": {explanation, verdict} under a JSON schema (LLMJudge)

    def make_judge(self, rubric: RubricNode) -> LLMJudge:
        """A fresh LLMJudge that knows `rubric`'s ancestors (one per grading: its state is per tree)."""
        return LLMJudge(self.base_url, self.model, api_key_env=self.api_key_env, timeout_s=self.timeout_s,
                        max_attempts=self.max_attempts, verdict_format=self.verdict_format).with_ancestors(rubric)


class _SubmissionChecks:
    """CommandJudge for `check` leaves, run in the episode's sandbox from the submission directory."""

    name = "command"

    def __init__(self, sandbox, timeout_s: float):
        self._episode_dir = sandbox.episode_dir
        self._inner = CommandJudge(sandbox, timeout_s=timeout_s)

    def accepts(self, leaf: RubricNode) -> bool:
        return leaf.check is not None

    def judge(self, leaf: RubricNode, context: GradingContext) -> LeafVerdict:
        # A missing submission directory fails the check (exit 1): nothing was submitted.
        in_submission = dataclasses.replace(leaf, check=f"cd {SUBMISSION_DIR} || exit 1\n{leaf.check}")
        verdict = self._inner.judge(in_submission, dataclasses.replace(context, episode_dir=self._episode_dir))
        return dataclasses.replace(verdict, metadata={**verdict.metadata, "check": leaf.check,
                                                      "cwd": SUBMISSION_DIR})


class _NoJudge:
    """The last judge when no LLM endpoint is configured: the leaf is invalid, and says why."""

    name = "none"

    def accepts(self, leaf: RubricNode) -> bool:
        return True

    def judge(self, leaf: RubricNode, context: GradingContext) -> LeafVerdict:
        return LeafVerdict(0.0, False, "not graded: this leaf has no `check` command and the task has no "
                           "LLM judge endpoint (PaperTask.judge; launch/eval.py --judge_base_url and "
                           "--judge_model)", self.name)


@dataclasses.dataclass
class PaperTask:
    """A PaperBench paper as a task: what the runner needs of a Task (task_id, spec, setup, grading)
    plus the blacklist the agent's tools enforce. Build it with load_paper_task."""

    task_id: str
    title: str
    paper_dir: pathlib.Path
    spec: str                      # the episode's user message
    rubric_tree: RubricNode
    blacklist: tuple[str, ...]     # the entries of blacklist.txt, as written ("none": empty)
    paper: str
    addendum: str
    judge_addendum: str = ""
    judge: JudgeEndpoint | None = None

    @property
    def rubric_path(self) -> pathlib.Path:
        return self.paper_dir / "rubric.json"

    @property
    def rubric(self) -> dict:
        """The rubric in file form (as Task.rubric)."""
        return self.rubric_tree.to_dict()

    def setup(self, episode_dir: str | os.PathLike) -> None:
        """Puts the paper in episode_dir/paper/ and creates an empty episode_dir/submission/. Call it
        before creating the episode's Sandbox, which hands the directory over to its own user."""
        root = pathlib.Path(episode_dir).resolve()
        paper = root / PAPER_DIR
        if paper.exists() or (root / SUBMISSION_DIR).exists():
            raise FileExistsError(f"{root}: already holds {PAPER_DIR}/ or {SUBMISSION_DIR}/ (an episode "
                                  "directory must start empty)")
        paper.mkdir(parents=True)
        for name in AGENT_FILES:
            if (self.paper_dir / name).is_file():
                shutil.copyfile(self.paper_dir / name, paper / name)
        if (self.paper_dir / "assets").is_dir():
            shutil.copytree(self.paper_dir / "assets", paper / "assets")
        (root / SUBMISSION_DIR).mkdir()

    def judge_task_text(self) -> str:
        """What the LLM judge is told of the task: the agent's instructions, the addenda, the paper
        (LLMJudge bounds it, cutting the middle)."""
        parts = [self.spec, f"# Addendum (given to the agent)\n{self.addendum or '(empty)'}"]
        if self.judge_addendum:
            parts.append(f"# Judge addendum (for grading only)\n{self.judge_addendum}")
        parts.append(f"# The paper\n{self.paper}")
        return "\n\n".join(parts)

    def grade_result(self, sandbox, check_timeout_s: float = 60.0) -> GradeResult:
        """Grades the episode in `sandbox` (its episode directory) with the rubric: `check` leaves by
        their command, the others by the LLM judge (invalid without one). See the module docstring."""
        judges: list = [_SubmissionChecks(sandbox, check_timeout_s)]
        workers = 1
        if self.judge is not None:
            judges.append(self.judge.make_judge(self.rubric_tree))
            workers = self.judge.max_workers
        else:
            judges.append(_NoJudge())
        context = GradingContext(os.path.join(sandbox.episode_dir, SUBMISSION_DIR),
                                 task=self.judge_task_text())
        return grade(self.rubric_tree, judges, context, max_workers=workers)


def instructions(title: str, *, has_pdf: bool, has_assets: bool, blacklist: tuple[str, ...]) -> str:
    """The episode's user message for a paper."""
    formats = "markdown, with the PDF in `paper/paper.pdf`" if has_pdf else "markdown"
    assets = " Its figures are in `paper/assets/`." if has_assets else ""
    if blacklist:
        rules = ("You must not look at or use these resources (the paper's own code, for instance), listed "
                 "in `paper/blacklist.txt`: " + ", ".join(blacklist) + ". Using them counts as cheating, "
                 "and tool calls that name them are refused.")
    else:
        rules = "No resource is blacklisted for this paper (`paper/blacklist.txt`)."
    return (
        f"# Reproduce the paper \"{title}\"\n\n"
        f"The paper is in `paper/paper.md` ({formats}).{assets} `paper/addendum.md` holds the authors' "
        "clarifications and says what is out of scope: read it before you plan.\n\n"
        "## Task\n"
        "Reproduce as many of the paper's core contributions as you can in the time you have: implement "
        "its methods, run its experiments, and report its results. Credit is partial and weighted by how "
        "central each part is to the paper, so decide what matters most and do that first; a part done "
        "right earns its credit even when others fail. Results must follow the paper's trends within a "
        "reasonable margin, not match it exactly. Experiments introduced only in the appendix are out of "
        "scope; appendix details of an experiment from the main text are in scope.\n\n"
        "## Rules\n"
        f"{rules}\n\n"
        "## Submission\n"
        f"Put all your work in `{SUBMISSION_DIR}/`: the source code and `{SUBMISSION_DIR}/reproduce.sh`, "
        f"a script that reproduces all your results when run as `bash reproduce.sh` from inside "
        f"`{SUBMISSION_DIR}/` (no absolute paths: the directory may be moved). Keep it to code and small "
        f"outputs, no large artifacts. Add `{SUBMISSION_DIR}/README.md`: what you reproduced, how the code "
        "maps to the paper, and what reproduce.sh produces. Only "
        f"`{SUBMISSION_DIR}/` is graded, as you leave it, against a rubric written by the paper's authors: "
        "run reproduce.sh yourself so that its outputs are there. Call `submit` when you are done.\n")


def parse_blacklist(text: str) -> tuple[str, ...]:
    """The entries of a blacklist.txt: stripped lines, without blank lines, `#` comments and `none`."""
    return tuple(line.strip() for line in text.splitlines()
                 if normalize_blacklist_entry(line) is not None)


def _read_config(path: pathlib.Path) -> tuple[str, str]:
    text = read_text_file(path, "config", PaperTaskError)
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise PaperTaskError(f"{path}: {where}not valid YAML: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(config, dict):
        raise PaperTaskError(f"{path}: must be a mapping with `id` and `title`, got {type(config).__name__}")
    task_id, title = config.get("id"), config.get("title")
    if not isinstance(task_id, str) or not _TASK_ID.match(task_id):
        raise PaperTaskError(f"{path}: field `id` must be a name of letters, digits, `.`, `_` and `-` "
                             f"(it names the episode directories), got {task_id!r}")
    if not isinstance(title, str) or not title.strip():
        raise PaperTaskError(f"{path}: field `title` must be a non-empty string, got {title!r}")
    return task_id, title.strip()


def is_paper_dir(path: str | os.PathLike) -> bool:
    """Whether `path` is laid out as a PaperBench paper directory (it has rubric.json, config.yaml or
    paper.md, and no task.json); load_paper_task says which required file is missing."""
    path = pathlib.Path(path)
    return (path.is_dir() and not (path / "task.json").exists()
            and any((path / name).exists() for name in _MARKERS))


def load_paper_task(paper_dir: str | os.PathLike, judge: JudgeEndpoint | None = None) -> PaperTask:
    """The PaperTask of a paper directory (layout: module docstring). Raises PaperTaskError naming the
    directory and the missing files, or else every file that is wrong and what is wrong with it (a
    rubric.json that does not load included, with the RubricError's message)."""
    paper_dir = pathlib.Path(paper_dir)
    if not paper_dir.is_dir():
        raise PaperTaskError(f"{paper_dir}: not a directory (a PaperBench paper directory holds "
                             f"{', '.join(REQUIRED_FILES)})")
    missing = [name for name in REQUIRED_FILES if not (paper_dir / name).is_file()]
    if missing:
        raise PaperTaskError(f"{paper_dir}: not a complete PaperBench paper directory: missing "
                             f"{', '.join(missing)} (it needs {', '.join(REQUIRED_FILES)}; a blacklist.txt "
                             "with the line `none` blacklists nothing)")
    problems: list[str] = []

    def attempt(read, *args):
        try:
            return read(*args)
        except (PaperTaskError, RubricError) as e:
            problems.append(str(e))
            return None

    config = attempt(_read_config, paper_dir / "config.yaml")
    paper = attempt(read_text_file, paper_dir / "paper.md", "paper", PaperTaskError)
    if paper is not None and not paper.strip():
        problems.append(f"{paper_dir / 'paper.md'}: is empty (the agent would have no paper to reproduce)")
    addendum = attempt(read_text_file, paper_dir / "addendum.md", "addendum", PaperTaskError)
    blacklist_text = attempt(read_text_file, paper_dir / "blacklist.txt", "blacklist", PaperTaskError)
    judge_addendum = ""
    if (paper_dir / "judge.addendum.md").exists():
        judge_addendum = attempt(read_text_file, paper_dir / "judge.addendum.md", "judge addendum",
                                 PaperTaskError)
    rubric = attempt(load_rubric, paper_dir / "rubric.json")
    pointers = _lfs_pointers(paper_dir)
    if pointers:
        shown = ", ".join(str(p.relative_to(paper_dir)) for p in pointers[:3])
        problems.append(f"{paper_dir}: {len(pointers)} file(s) the agent would get are Git LFS pointers, not "
                        f"the files ({shown}{', ...' if len(pointers) > 3 else ''}; fetch the content, e.g. "
                        "`git lfs pull` in the repository it came from)")
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems)
        raise PaperTaskError(f"{paper_dir}: cannot load as a task ({len(problems)} problem(s)):\n{listed}",
                             problems)
    task_id, title = config
    blacklist = parse_blacklist(blacklist_text)
    spec = instructions(title, has_pdf=(paper_dir / "paper.pdf").is_file(),
                        has_assets=(paper_dir / "assets").is_dir(), blacklist=blacklist)
    return PaperTask(task_id=task_id, title=title, paper_dir=paper_dir, spec=spec, rubric_tree=rubric,
                     blacklist=blacklist, paper=paper, addendum=addendum, judge_addendum=judge_addendum,
                     judge=judge)


def _lfs_pointers(paper_dir: pathlib.Path) -> list[pathlib.Path]:
    """paper.pdf and the files under assets/ that are Git LFS pointer files (the text files are checked
    when read)."""
    candidates = [paper_dir / "paper.pdf"] if (paper_dir / "paper.pdf").is_file() else []
    if (paper_dir / "assets").is_dir():
        candidates += sorted(p for p in (paper_dir / "assets").rglob("*") if p.is_file())
    found = []
    for path in candidates:
        try:
            with open(path, "rb") as f:
                head = f.read(len(LFS_POINTER_PREFIX))
        except OSError:
            continue   # copying it in setup() will say what is wrong
        if head == LFS_POINTER_PREFIX:
            found.append(path)
    return found


def find_task_dirs(path: str | os.PathLike) -> list[tuple[str, pathlib.Path]]:
    """(kind, directory) of the tasks at `path`, kind "embedded" (task.json) or "paper" (is_paper_dir):
    `path` itself when it is one, else its subdirectories that are (those of `path`/tasks for a generated
    set), sorted by name. Raises FileNotFoundError when there is none, naming what a task directory holds."""
    path = pathlib.Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such directory")

    def kind(directory: pathlib.Path) -> str | None:
        if (directory / "task.json").is_file():
            return "embedded"
        return "paper" if is_paper_dir(directory) else None

    if (own := kind(path)) is not None:
        return [(own, path)]
    root = path / "tasks" if (path / "tasks").is_dir() else path
    found = [(k, d) for d in sorted(root.iterdir()) if d.is_dir() and (k := kind(d)) is not None]
    if not found:
        raise FileNotFoundError(f"{path}: no task directory in it or under it: an embedded task holds "
                                f"task.json, a PaperBench paper {', '.join(REQUIRED_FILES)}")
    return found


def load_tasks(path: str | os.PathLike, judge: JudgeEndpoint | None = None) -> list:
    """Every task at `path` (see find_task_dirs): embedded Tasks and PaperTasks (graded with `judge`)."""
    return [load_task(d) if k == "embedded" else load_paper_task(d, judge=judge)
            for k, d in find_task_dirs(path)]
