"""Section kind "append": append given rows, in order, to an existing CSV file."""
import random

from klong_jax.tasks import vocab
from klong_jax.tasks.kinds import base
from klong_jax.tasks.kinds.mistakes import bash_mistakes

KIND = "append"
MAX_ITEMS = 8


def make(rng: random.Random, names: base.Names, n_items: int, difficulty: int) -> dict:
    stem = names.one(vocab.WORDS, scope="data")
    value_column = rng.choice(vocab.COLUMNS)
    header = ["name", "color", value_column]
    n_initial = rng.randint(2, 4)
    # Row names are distinct, so every appended row is a distinct line that a check can find.
    row_names = vocab.pick(rng, vocab.ANIMALS + vocab.FRUITS, n_initial + n_items)
    rows = [[name, rng.choice(vocab.COLORS), str(vocab.small_int(rng))] for name in row_names]
    if difficulty >= 3:
        # Harder: an extra column, so each appended row is longer to copy exactly.
        header.append("tag")
        for row in rows:
            row.append(rng.choice(vocab.THINGS))
    return {"kind": KIND, "file": f"data/{stem}.csv", "header": header,
            "initial_rows": [",".join(r) for r in rows[:n_initial]],
            "rows": [",".join(r) for r in rows[n_initial:]]}


def spec(section: dict, number: int) -> str:
    rows = "\n".join(f"- `{row}`" for row in section["rows"])
    return (f"## Section {number}: Append rows to {section['file']}\n"
            f"`{section['file']}` has the columns `{','.join(section['header'])}`. "
            "Append these rows at its end, in this order:\n"
            f"{rows}\n")


def initial_files(section: dict) -> dict[str, str]:
    lines = [",".join(section["header"])] + section["initial_rows"]
    return {section["file"]: "\n".join(lines) + "\n"}


def _joined(lines: list[str]) -> str:
    return base.quote(" ".join(lines))


def rubric(section: dict, number: int, new_id) -> dict:
    path, rows = section["file"], section["rows"]
    original = [",".join(section["header"])] + section["initial_rows"]
    items = [
        base.node(new_id, f"The row `{row}` is appended to {path}", [
            base.leaf(new_id, f"{path} has the line `{row}`", f"grep -qxF {base.quote(row)} {path}",
                      base.CODE_DEVELOPMENT, base.DATA_PREPARATION),
        ]) for row in rows
    ]
    items.append(base.node(new_id, f"{path} keeps its old lines and ends with the new rows in order", [
        # Credited only once rows were appended: an episode that does nothing must score 0.
        base.leaf(new_id, f"Rows are appended and the first {len(original)} lines of {path} are kept",
                  f"test \"$(wc -l < {path})\" -gt {len(original)} && "
                  f"test \"$(head -n {len(original)} {path} | paste -sd ' ')\" = {_joined(original)}",
                  base.CODE_DEVELOPMENT, base.DATA_PREPARATION),
        base.leaf(new_id, f"The last {len(rows)} lines of {path} are the new rows in order",
                  f"test \"$(tail -n {len(rows)} {path} | paste -sd ' ')\" = {_joined(rows)}",
                  base.CODE_DEVELOPMENT, base.DATA_PREPARATION),
        base.leaf(new_id, f"{path} has {len(original) + len(rows)} lines",
                  f"test \"$(wc -l < {path})\" -eq {len(original) + len(rows)}",
                  base.CODE_DEVELOPMENT, base.DATA_PREPARATION),
    ]))
    return base.node(new_id, f"Section {number}: rows are appended to {path}", items,
                     weight=len(rows) + 1)


def plan(section: dict, number: int) -> list[base.Action]:
    path, rows = section["file"], section["rows"]
    n = len(rows)
    actions = [bash_mistakes(base.bash(
        f"tail -n 3 {path}",
        f"Section {number} appends {n} rows to {path}. Look at its last lines first.",
        content=f"Section {number}: append rows to {path}."), path)]
    for i, row in enumerate(rows, 1):
        actions.append(base.bash(f"echo {base.quote(row)} >> {path}",
                                 f"Row {i} of {n} in section {number}: `{row}`."))
    total = 1 + len(section["initial_rows"]) + n
    actions.append(bash_mistakes(base.bash(
        f"wc -l {path}", f"All {n} rows are appended. {path} should now have {total} lines.",
        expect=f"{total} {path}"), path))
    actions.append(bash_mistakes(base.bash(f"tail -n {n} {path}",
                                           f"Check that the last {n} lines are the new rows.")))
    return actions
