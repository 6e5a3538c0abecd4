"""Section kind "stats": compute statistics over a generated CSV and write them as `key=value` lines."""
import random

from klong_jax.tasks import vocab
from klong_jax.tasks.kinds import base
from klong_jax.tasks.kinds.mistakes import bash_mistakes, wrong_path

KIND = "stats"
MAX_ITEMS = 6
# Operations by difficulty: a harder task also asks for means, counts and filtered sums.
_OPS_BY_DIFFICULTY = {1: ("sum", "max", "min"), 2: ("sum", "max", "min", "mean", "count"),
                      3: ("sum", "max", "min", "mean", "count", "sum_where")}


def _value(op: str, rows: list[dict], column: str | None, color: str | None) -> str:
    if op == "count":
        return str(sum(1 for r in rows if r["color"] == color))
    values = [int(r[column]) for r in rows if op != "sum_where" or r["color"] == color]
    if op in ("sum", "sum_where"):
        return str(sum(values))
    if op == "max":
        return str(max(values))
    if op == "min":
        return str(min(values))
    if op == "mean":
        return f"{sum(values) / len(values):.2f}"
    raise ValueError(f"unknown statistic {op!r}")


def make(rng: random.Random, names: base.Names, n_items: int, difficulty: int) -> dict:
    stem = names.one(vocab.WORDS, scope="data")
    columns = vocab.pick(rng, vocab.COLUMNS, 2 if difficulty == 1 else 3)
    colors = vocab.pick(rng, vocab.COLORS, 3)
    rows = [{"color": rng.choice(colors), **{c: str(vocab.small_int(rng)) for c in columns}}
            for _ in range(rng.randint(6, 10))]
    present = sorted({r["color"] for r in rows})
    ops = _OPS_BY_DIFFICULTY[min(difficulty, 3)]
    stats, keys = [], set()
    while len(stats) < n_items:
        op = rng.choice(ops)
        column = None if op == "count" else rng.choice(columns)
        color = rng.choice(present) if op in ("count", "sum_where") else None
        key = "_".join(part for part in ("sum" if op == "sum_where" else op, column, color) if part)
        if key in keys:
            continue
        keys.add(key)
        stats.append({"key": key, "op": op, "column": column, "color": color,
                      "value": _value(op, rows, column, color)})
    return {"kind": KIND, "csv": f"data/{stem}.csv", "out": f"{stem}_results.txt",
            "header": ["color"] + columns, "rows": rows, "stats": stats}


def _describe(stat: dict) -> str:
    column, color = stat["column"], stat["color"]
    return {
        "sum": f"the sum of column `{column}`",
        "max": f"the largest value in column `{column}`",
        "min": f"the smallest value in column `{column}`",
        "mean": f"the mean of column `{column}`, with 2 decimals",
        "count": f"the number of rows whose `color` is `{color}`",
        "sum_where": f"the sum of `{column}` over the rows whose `color` is `{color}`",
    }[stat["op"]]


def spec(section: dict, number: int) -> str:
    items = "\n".join(f"- `{s['key']}`: {_describe(s)}" for s in section["stats"])
    return (f"## Section {number}: Statistics of {section['csv']}\n"
            f"`{section['csv']}` has a header and the columns `{','.join(section['header'])}`. "
            f"Compute each value and append it to `{section['out']}` as a line `key=value`, "
            f"in this order:\n{items}\n")


def initial_files(section: dict) -> dict[str, str]:
    lines = [",".join(section["header"])]
    lines += [",".join(row[c] for c in section["header"]) for row in section["rows"]]
    return {section["csv"]: "\n".join(lines) + "\n"}


def rubric(section: dict, number: int, new_id) -> dict:
    out = section["out"]
    items = [
        base.node(new_id, f"`{s['key']}` is computed correctly", [
            base.leaf(new_id, f"{out} has the line `{s['key']}={s['value']}`",
                      f"grep -qxF {base.quote(s['key'] + '=' + s['value'])} {out}",
                      base.RESULT_ANALYSIS, base.EVALUATION),
        ]) for s in section["stats"]
    ]
    expected = " ".join(f"{s['key']}={s['value']}" for s in section["stats"])
    items.append(base.node(new_id, f"{out} lists the values in the given order", [
        base.leaf(new_id, f"{out} holds exactly the {len(section['stats'])} lines, in order",
                  f"test \"$(paste -sd ' ' {out})\" = {base.quote(expected)}",
                  base.RESULT_ANALYSIS, base.PRESENTATION),
    ]))
    return base.node(new_id, f"Section {number}: the statistics of {section['csv']} are reported",
                     items, weight=len(items))


def _code(section: dict, stat: dict, column: str | None = None) -> str:
    column = column or stat["column"]
    load = f"import csv\nrows = list(csv.DictReader(open('{section['csv']}')))\n"
    values = f"int(r['{column}']) for r in rows"
    where = f" if r['color'] == '{stat['color']}'"
    expression = {
        "sum": f"sum({values})",
        "max": f"max({values})",
        "min": f"min({values})",
        "mean": f"'%.2f' % (sum({values}) / len(rows))",
        "count": f"sum(1 for r in rows{where})",
        "sum_where": f"sum({values}{where})",
    }[stat["op"]]
    return load + f"print({expression})\n"


def plan(section: dict, number: int) -> list[base.Action]:
    csv_path, out = section["csv"], section["out"]
    n = len(section["stats"])
    actions = [
        bash_mistakes(base.bash(f"head -n 4 {csv_path}",
                                f"Section {number} asks for {n} statistics of {csv_path}. "
                                "Look at its columns first.",
                                content=f"Section {number}: statistics of {csv_path}."), csv_path),
        bash_mistakes(base.bash(f"wc -l {csv_path}", "Count its lines.",
                                expect=f"{len(section['rows']) + 1} {csv_path}")),
    ]
    for i, stat in enumerate(section["stats"], 1):
        compute = base.Action("python", {"code": _code(section, stat)},
                              f"Value {i} of {n} in section {number}: `{stat['key']}` is "
                              f"{_describe(stat)}.", expect=stat["value"])
        mistakes = [wrong_path(compute, csv_path)]
        if stat["column"] is not None:
            # A column name misremembered as its plural: Python raises KeyError, the header shows it.
            wrong = base.Action("python", {"code": _code(section, stat, stat["column"] + "s")},
                                compute.reasoning)
            inspect = base.bash(f"head -n 1 {csv_path}", "KeyError: check the column names.")
            mistakes.append(base.Mistake((wrong,), inspect,
                                         f"The column is `{stat['column']}`; compute again."))
        actions.append(base.Action(compute.tool, compute.arguments, compute.reasoning,
                                   expect=compute.expect, mistakes=tuple(mistakes)))
        actions.append(base.bash(f"echo {base.quote(stat['key'] + '=' + stat['value'])} >> {out}",
                                 f"Write `{stat['key']}` to {out}."))
    actions.append(bash_mistakes(base.bash(f"cat {out}", f"All {n} values are written. Check {out}."),
                                 out))
    return actions
