"""A task: a prefix document (the spec), a rubric tree, initial files, and the expert's plan.

Tasks are generated deterministically from (split, seed, index, difficulty, length): the RNG is seeded
with a string, which Python hashes with SHA-512, so the same arguments give the same task on every
machine and every run, and train and held-out tasks come from different streams.
"""
import dataclasses
import json
import pathlib
import random

from klong_jax.tasks import vocab
from klong_jax.tasks.kinds import KINDS_BY_DIFFICULTY, base, kind_of

FORMAT_VERSION = 1
SPLITS = ("train", "heldout")
DIFFICULTIES = (1, 2, 3)
MIN_LENGTH, MAX_LENGTH = 4, 72
STEPS_PER_SECTION = 6
# A function item is two steps of work (write it, make its test pass); other items are one.
_STEPS_PER_ITEM = {"function": 2}


@dataclasses.dataclass
class Task:
    task_id: str
    title: str
    split: str
    seed: int
    index: int
    difficulty: int
    length: int
    sections: list[dict]
    spec: str
    rubric: dict
    task_dir: pathlib.Path | None = None

    @property
    def rubric_path(self) -> pathlib.Path | None:
        """rubric.json of a saved task (None for a task that only lives in memory)."""
        return None if self.task_dir is None else self.task_dir / "rubric.json"

    def initial_files(self) -> dict[str, str]:
        files: dict[str, str] = {}
        for section in self.sections:
            files.update(kind_of(section).initial_files(section))
        return files

    def setup(self, episode_dir: str | pathlib.Path) -> None:
        """Materialise the task's initial files in `episode_dir` (created if missing). Call it before
        creating the episode's Sandbox, which hands the directory over to its unprivileged user."""
        root = pathlib.Path(episode_dir).resolve()
        root.mkdir(parents=True, exist_ok=True)
        for relative, content in self.initial_files().items():
            path = (root / relative).resolve()
            if not path.is_relative_to(root):
                raise ValueError(f"task {self.task_id}: initial file {relative!r} escapes the episode dir")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)

    def expert_plan(self) -> list[base.Action]:
        """The scripted expert's calls, section by section, ending with submit."""
        actions = []
        for number, section in enumerate(self.sections, 1):
            actions += kind_of(section).plan(section, number)
        actions.append(base.Action("submit", {"end_message": f"All {len(self.sections)} sections of "
                                              f"{self.title} are done."},
                                   "Every section is done and checked. Submit."))
        return actions

    def to_json(self) -> dict:
        return {"format_version": FORMAT_VERSION, "task_id": self.task_id, "title": self.title,
                "split": self.split, "seed": self.seed, "index": self.index,
                "difficulty": self.difficulty, "length": self.length, "sections": self.sections}


def _check_knobs(split: str, difficulty: int, length: int) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {DIFFICULTIES}, got {difficulty!r}")
    if not MIN_LENGTH <= length <= MAX_LENGTH:
        raise ValueError(f"length (rubric items per task) must be in [{MIN_LENGTH}, {MAX_LENGTH}], "
                         f"got {length}")


def _allocate(rng: random.Random, difficulty: int, length: int) -> list[tuple[str, int]]:
    """(kind, number of items) per section, about `length` steps in all."""
    n_sections = max(2, round(length / STEPS_PER_SECTION))
    pool = list(KINDS_BY_DIFFICULTY[difficulty])
    kinds = []
    while len(kinds) < n_sections:  # each kind once before any kind repeats
        rng.shuffle(pool)
        kinds += pool
    kinds = kinds[:n_sections]
    shares = [length // n_sections + (1 if i < length % n_sections else 0) for i in range(n_sections)]
    rng.shuffle(shares)
    allocation = []
    for kind, share in zip(kinds, shares):
        per_item = _STEPS_PER_ITEM.get(kind, 1)
        fewest = 1 if per_item > 1 else 2
        items = min(max(round(share / per_item), fewest), kind_of({"kind": kind}).MAX_ITEMS)
        allocation.append((kind, items))
    return allocation


def _document(title: str, sections: list[dict]) -> str:
    body = "\n".join(kind_of(s).spec(s, number) for number, s in enumerate(sections, 1))
    return (f"# {title}\n\n"
            f"This project has {len(sections)} sections. Carry them out in order, in the current "
            "directory, with the tools. Names and values are exact: copy them literally. A rubric "
            "checks every item; partial work earns partial credit.\n\n"
            f"{body}\n"
            "## Submission\n"
            "When every section is done, call `submit`.\n")


def _rubric(title: str, sections: list[dict], new_id) -> dict:
    children = [kind_of(s).rubric(s, number, new_id) for number, s in enumerate(sections, 1)]
    return base.node(new_id, f"The project '{title}' is carried out as specified", children)


def generate_task(index: int, seed: int = 0, split: str = "train", difficulty: int = 2,
                  length: int = 24) -> Task:
    _check_knobs(split, difficulty, length)
    rng = random.Random(f"klong-tasks/v{FORMAT_VERSION}/{split}/{seed}/{index}/{difficulty}/{length}")
    names = base.Names(rng)
    title = " ".join(w.capitalize() for w in (rng.choice(vocab.COLORS), rng.choice(vocab.ANIMALS),
                                              rng.choice(vocab.THINGS)))
    sections = [kind_of({"kind": kind}).make(rng, names, items, difficulty)
                for kind, items in _allocate(rng, difficulty, length)]
    task = Task(task_id=f"{split}-{seed}-{index:04d}", title=title, split=split, seed=seed, index=index,
                difficulty=difficulty, length=length, sections=sections, spec="", rubric={})
    task.spec = _document(title, sections)
    task.rubric = _rubric(title, sections, base.uuid_source(rng))
    return task


def generate_tasks(n: int, seed: int = 0, split: str = "train", difficulty: int = 2,
                   length: int = 24) -> list[Task]:
    """n tasks; task i is the same whatever n is, so a larger set extends a smaller one."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return [generate_task(i, seed, split, difficulty, length) for i in range(n)]


def save_task(task: Task, tasks_root: str | pathlib.Path) -> pathlib.Path:
    """Write tasks_root/<task_id>/{task.json, prefix.md, rubric.json}; returns that directory."""
    task_dir = pathlib.Path(tasks_root) / task.task_id
    task_dir.mkdir(parents=True, exist_ok=True)
    (task_dir / "task.json").write_text(json.dumps(task.to_json(), indent=1) + "\n")
    (task_dir / "prefix.md").write_text(task.spec)
    (task_dir / "rubric.json").write_text(json.dumps(task.rubric, indent=1) + "\n")
    task.task_dir = task_dir
    return task_dir


def _read_json(path: pathlib.Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing (a task directory holds task.json, prefix.md, "
                                "rubric.json)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {e.lineno}: invalid JSON: {e.msg}") from None


def load_task(task_dir: str | pathlib.Path) -> Task:
    task_dir = pathlib.Path(task_dir)
    meta = _read_json(task_dir / "task.json")
    rubric = _read_json(task_dir / "rubric.json")
    prefix_path = task_dir / "prefix.md"
    if not prefix_path.is_file():
        raise FileNotFoundError(f"{prefix_path}: missing")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{task_dir / 'task.json'}: field format_version is "
                         f"{meta.get('format_version')!r}, expected {FORMAT_VERSION}")
    fields = ("task_id", "title", "split", "seed", "index", "difficulty", "length", "sections")
    missing = [f for f in fields if f not in meta]
    if missing:
        raise ValueError(f"{task_dir / 'task.json'}: missing field(s) {missing}")
    for i, section in enumerate(meta["sections"]):
        try:
            kind_of(section)
        except ValueError as e:
            raise ValueError(f"{task_dir / 'task.json'}: sections[{i}]: {e}") from None
    return Task(**{f: meta[f] for f in fields}, spec=prefix_path.read_text(), rubric=rubric,
                task_dir=task_dir)
