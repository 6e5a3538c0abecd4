"""Section kind "files": create a directory of one-line files with given names and contents."""
import random

from klong_jax.tasks import vocab
from klong_jax.tasks.kinds import base
from klong_jax.tasks.kinds.mistakes import bash_mistakes

KIND = "files"
MAX_ITEMS = 8


def make(rng: random.Random, names: base.Names, n_items: int, difficulty: int) -> dict:
    directory = names.one(vocab.DIRECTORIES, scope="dir")
    stems = names.take(vocab.WORDS, n_items, scope=directory)
    files = []
    for stem in stems:
        words = [rng.choice(vocab.WORDS)]
        if difficulty >= 2:
            words.append(str(vocab.small_int(rng)))
        if difficulty >= 3:
            words.append(rng.choice(vocab.COLORS))
        files.append({"path": f"{directory}/{stem}.txt", "line": " ".join(words)})
    # Half the sections are written with the write_file tool, half with echo, so both idioms occur.
    return {"kind": KIND, "dir": directory, "files": files,
            "style": rng.choice(("write_file", "echo"))}


def spec(section: dict, number: int) -> str:
    rows = "\n".join(f"- `{f['path']}`: `{f['line']}`" for f in section["files"])
    return (f"## Section {number}: Create the {section['dir']} files\n"
            f"Create the directory `{section['dir']}` with these files, each holding one line:\n"
            f"{rows}\n")


def initial_files(section: dict) -> dict[str, str]:
    return {}


def rubric(section: dict, number: int, new_id) -> dict:
    items = []
    for f in section["files"]:
        path, line = f["path"], f["line"]
        items.append(base.node(new_id, f"{path} is created with the line `{line}`", [
            base.leaf(new_id, f"{path} exists", f"test -f {path}",
                      base.CODE_DEVELOPMENT, base.ENVIRONMENT),
            base.leaf(new_id, f"{path} holds exactly the line `{line}`",
                      f"test \"$(cat {path})\" = {base.quote(line)}",
                      base.CODE_DEVELOPMENT, base.DATA_PREPARATION, weight=2),
        ]))
    return base.node(new_id, f"Section {number}: the files of {section['dir']}/ are created",
                     items, weight=len(items))


def plan(section: dict, number: int) -> list[base.Action]:
    directory = section["dir"]
    n = len(section["files"])
    actions = [bash_mistakes(base.bash(
        f"mkdir -p {directory}",
        f"Section {number} needs {n} files in {directory}. Create the directory first.",
        content=f"Section {number}: create the {directory} files."))]
    for i, f in enumerate(section["files"], 1):
        reasoning = f"File {i} of {n} in section {number}: {f['path']} with the line `{f['line']}`."
        if section["style"] == "write_file":
            actions.append(base.Action("write_file", {"path": f["path"], "content": f["line"] + "\n"},
                                       reasoning))
        else:
            actions.append(base.bash(f"echo {base.quote(f['line'])} > {f['path']}", reasoning))
    check = base.bash(f"grep -H . {directory}/*.txt",
                      f"All {n} files of section {number} are written. Check their lines.")
    actions.append(bash_mistakes(check))
    return actions
