"""Section kind "rename": move files to new names and a new directory, as a table says."""
import random

from klong_jax.tasks import vocab
from klong_jax.tasks.kinds import base
from klong_jax.tasks.kinds.mistakes import bash_mistakes

KIND = "rename"
MAX_ITEMS = 8
_SOURCE_DIRS = ("raw", "inbox", "drafts", "old", "stash", "incoming")


def make(rng: random.Random, names: base.Names, n_items: int, difficulty: int) -> dict:
    source = names.one(_SOURCE_DIRS, scope="dir")
    target = names.one(vocab.DIRECTORIES, scope="dir")
    # Harder sections hold files that the table does not name; they must stay where they are.
    n_kept = rng.randint(1, 2) if difficulty >= 2 else 0
    sources = names.take(vocab.WORDS, n_items + n_kept, scope=source)
    targets = names.take(vocab.WORDS, n_items, scope=target)
    moves = [{"src": f"{source}/{s}.txt", "dst": f"{target}/{t}.txt",
              "content": f"{s} {vocab.small_int(rng)}"} for s, t in zip(sources, targets)]
    kept = [{"path": f"{source}/{s}.txt", "content": f"{s} {vocab.small_int(rng)}"}
            for s in sources[n_items:]]
    return {"kind": KIND, "src_dir": source, "dst_dir": target, "moves": moves, "kept": kept}


def spec(section: dict, number: int) -> str:
    rows = "\n".join(f"- `{m['src']}` -> `{m['dst']}`" for m in section["moves"])
    keep = " Leave the other files where they are." if section["kept"] else ""
    return (f"## Section {number}: Move the {section['src_dir']} files\n"
            f"Move these files to their new names; `{section['dst_dir']}` does not exist yet.{keep}\n"
            f"{rows}\n")


def initial_files(section: dict) -> dict[str, str]:
    files = {m["src"]: m["content"] + "\n" for m in section["moves"]}
    files.update({k["path"]: k["content"] + "\n" for k in section["kept"]})
    return files


def rubric(section: dict, number: int, new_id) -> dict:
    items = []
    for m in section["moves"]:
        src, dst, content = m["src"], m["dst"], m["content"]
        items.append(base.node(new_id, f"{src} is moved to {dst}", [
            base.leaf(new_id, f"{dst} exists with the content of {src}",
                      f"test \"$(cat {dst})\" = {base.quote(content)}",
                      base.CODE_DEVELOPMENT, base.DATA_PREPARATION, weight=2),
            base.leaf(new_id, f"{src} no longer exists", f"test ! -e {src}",
                      base.CODE_DEVELOPMENT, base.DATA_PREPARATION),
        ]))
    for k in section["kept"]:
        # Credited only once the section is under way (the target directory exists): an episode
        # that does nothing must score 0.
        items.append(base.node(new_id, f"{k['path']} is left in place", [
            base.leaf(new_id, f"{k['path']} still exists unchanged after the moves",
                      f"test -d {section['dst_dir']} && "
                      f"test \"$(cat {k['path']})\" = {base.quote(k['content'])}",
                      base.CODE_DEVELOPMENT, base.DATA_PREPARATION),
        ]))
    return base.node(new_id, f"Section {number}: the files of {section['src_dir']}/ are moved",
                     items, weight=len(items))


def plan(section: dict, number: int) -> list[base.Action]:
    source, target = section["src_dir"], section["dst_dir"]
    n = len(section["moves"])
    actions = [
        bash_mistakes(base.bash(f"ls {source}",
                                f"Section {number} moves {n} files from {source}. List them first.",
                                content=f"Section {number}: move the {source} files.")),
        bash_mistakes(base.bash(f"mkdir -p {target}", f"The target directory {target} is missing.")),
    ]
    for i, m in enumerate(section["moves"], 1):
        actions.append(bash_mistakes(
            base.bash(f"mv {m['src']} {m['dst']}", f"Move {i} of {n} in section {number}."),
            m["src"]))
    actions.append(bash_mistakes(base.bash(
        f"ls {source} {target}", f"All {n} moves of section {number} are done. Check both directories.")))
    return actions
