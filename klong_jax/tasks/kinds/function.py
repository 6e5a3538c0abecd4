"""Section kind "function": implement tiny functions in a Python module so that given tests pass.

Each function comes from a template whose spec line is the body itself in words ("return `x * 3 + 2`"),
so the code is inferable from the spec. A hidden check calls the function on inputs the visible test
does not use.
"""
import random
import shlex

from klong_jax.tasks import vocab
from klong_jax.tasks.kinds import base
from klong_jax.tasks.kinds.mistakes import bash_mistakes

KIND = "function"
MAX_ITEMS = 4
_TEMPLATES_BY_DIFFICULTY = {1: ("linear", "repeat"), 2: ("linear", "repeat", "join", "count_above"),
                            3: ("linear", "repeat", "join", "count_above", "clip")}


def _template(name: str, rng: random.Random) -> dict:
    """The argument name, spec text, body, a buggy body and an input drawer of one template."""
    if name == "linear":
        a, b = rng.randint(2, 9), rng.randint(1, 9)
        return dict(verb="scale", arg="x", text=f"return `x * {a} + {b}`",
                    body=f"return x * {a} + {b}", buggy=f"return x * {a} + {b + 1}",
                    draw=lambda: rng.randint(0, 20))
    if name == "repeat":
        n = rng.randint(2, 4)
        return dict(verb="repeat", arg="s", text=f"return the string `s` repeated {n} times",
                    body=f"return s * {n}", buggy=f"return s * {n + 1}",
                    draw=lambda: rng.choice(vocab.WORDS))
    if name == "join":
        sep = rng.choice(vocab.SEPARATORS)
        return dict(verb="join", arg="words", text=f"return the strings in `words` joined by `{sep}`",
                    body=f"return '{sep}'.join(words)", buggy="return ' '.join(words)",
                    draw=lambda: vocab.pick(rng, vocab.WORDS, rng.randint(2, 3)))
    if name == "count_above":
        k = rng.randint(3, 15)
        return dict(verb="count", arg="xs", text=f"return how many numbers in `xs` are greater than {k}",
                    body=f"return sum(1 for v in xs if v > {k})",
                    buggy=f"return sum(1 for v in xs if v >= {k})",
                    draw=lambda: [rng.randint(0, 20) for _ in range(4)] + [k])
    if name == "clip":
        lo = rng.randint(0, 5)
        hi = lo + rng.randint(3, 9)
        return dict(verb="clip", arg="x", text=f"return `x` limited to the range {lo} to {hi}",
                    body=f"return min(max(x, {lo}), {hi})", buggy=f"return min(max(x, {lo}), {hi + 1})",
                    draw=lambda: rng.choice((lo - 2, hi + 3, rng.randint(lo, hi))))
    raise ValueError(f"unknown function template {name!r}")


def _compile(name: str, arg: str, body: str):
    scope: dict = {}
    exec(f"def {name}({arg}):\n    {body}\n", scope)  # our own template text, never agent text
    return scope[name]


def _make_function(rng: random.Random, names: base.Names, templates: tuple[str, ...]) -> dict:
    t = _template(rng.choice(templates), rng)
    name = f"{t['verb']}_{names.one(vocab.COLORS + vocab.ANIMALS, scope=t['verb'])}"
    good, bad = _compile(name, t["arg"], t["body"]), _compile(name, t["arg"], t["buggy"])
    cases = [t["draw"]() for _ in range(4)]
    # The buggy body must fail the visible test, or the planned repair would repair nothing.
    while all(good(c) == bad(c) for c in cases[:2]):
        cases[1] = t["draw"]()
    return {"name": name, "arg": t["arg"], "text": t["text"], "body": t["body"], "buggy": t["buggy"],
            "tests": [[c, good(c)] for c in cases[:2]], "hidden": [[c, good(c)] for c in cases[2:]]}


def make(rng: random.Random, names: base.Names, n_items: int, difficulty: int) -> dict:
    module = names.one(vocab.MODULES, scope="module")
    templates = _TEMPLATES_BY_DIFFICULTY[min(difficulty, 3)]
    functions = [_make_function(rng, names, templates) for _ in range(n_items)]
    return {"kind": KIND, "module": f"src/{module}.py", "functions": functions}


def _test_path(function: dict) -> str:
    return f"tests/test_{function['name']}.py"


def _module_name(section: dict) -> str:
    return section["module"].removeprefix("src/").removesuffix(".py")


def spec(section: dict, number: int) -> str:
    items = "\n".join(f"- `{f['name']}({f['arg']})`: {f['text']}. Test: `python3 {_test_path(f)}`"
                      for f in section["functions"])
    return (f"## Section {number}: Functions in {section['module']}\n"
            f"Write `{section['module']}` with these functions; each test script must print `OK`.\n"
            f"{items}\n")


def initial_files(section: dict) -> dict[str, str]:
    # The scripts write no .pyc: a cached buggy draft of the same size, written in the same second,
    # would otherwise shadow the repaired module.
    module = _module_name(section)
    files = {}
    for f in section["functions"]:
        cases = ", ".join(f"({arg!r}, {want!r})" for arg, want in f["tests"])
        files[_test_path(f)] = (
            "import sys\n"
            "sys.dont_write_bytecode = True\n"
            "sys.path.insert(0, 'src')\n"
            f"from {module} import {f['name']}\n\n"
            f"for arg, want in [{cases}]:\n"
            f"    got = {f['name']}(arg)\n"
            "    if got != want:\n"
            f"        print(f'FAIL: {f['name']}({{arg!r}}) returned {{got!r}}, expected {{want!r}}')\n"
            "        sys.exit(1)\n"
            "print('OK')\n")
    return files


def rubric(section: dict, number: int, new_id) -> dict:
    path, module = section["module"], _module_name(section)
    items = []
    for f in section["functions"]:
        name = f["name"]
        hidden = "; ".join(f"assert {name}({arg!r}) == {want!r}" for arg, want in f["hidden"])
        hidden_code = (f"import sys; sys.dont_write_bytecode = True; sys.path.insert(0, 'src'); "
                       f"from {module} import {name}; {hidden}")
        items.append(base.node(new_id, f"{name} is implemented in {path} as specified", [
            base.leaf(new_id, f"{path} defines {name}({f['arg']})",
                      f"grep -qF {shlex.quote(f'def {name}(')} {path}", base.CODE_DEVELOPMENT, base.METHOD),
            base.leaf(new_id, f"python3 {_test_path(f)} prints OK",
                      f"python3 {_test_path(f)} | grep -qx OK", base.CODE_EXECUTION, base.EVALUATION,
                      weight=2),
            base.leaf(new_id, f"{name} is correct on inputs the test does not use",
                      f"python3 -c {shlex.quote(hidden_code)}", base.CODE_DEVELOPMENT, base.METHOD,
                      weight=2),
        ]))
    return base.node(new_id, f"Section {number}: the functions of {path} work", items,
                     weight=2 * len(items))


def _source(functions: list[dict], last_body: str | None = None) -> str:
    """The module with `functions`; the last one gets `last_body` when given (the buggy draft)."""
    blocks = []
    for i, f in enumerate(functions):
        body = last_body if (last_body is not None and i == len(functions) - 1) else f["body"]
        blocks.append(f"def {f['name']}({f['arg']}):\n    {body}\n")
    return "\n\n".join(blocks)


def plan(section: dict, number: int) -> list[base.Action]:
    path, functions = section["module"], section["functions"]
    n = len(functions)
    actions = []
    for i, f in enumerate(functions, 1):
        test = _test_path(f)
        actions.append(base.Action(
            "read_file_chunk", {"file": test, "start_line": 1, "max_lines": 20},
            f"Function {i} of {n} in section {number} is {f['name']}. Read its test.",
            content=f"Section {number}: functions in {path}." if i == 1 else ""))
        run_test = bash_mistakes(base.bash(f"python3 {test}", f"Run the test of {f['name']}.",
                                           expect="OK"))
        buggy = (base.Action("write_file", {"path": path, "content": _source(functions[:i], f["buggy"])},
                             f"{f['name']}: {f['text']}. Add it to {path}."),
                 base.bash(f"python3 {test}", f"Run the test of {f['name']}."))
        inspect = base.Action("read_file_chunk", {"file": path, "start_line": 1, "max_lines": 50},
                              f"The test of {f['name']} fails. Read {path} again.")
        write = base.Action("write_file", {"path": path, "content": _source(functions[:i])},
                            f"{f['name']}: {f['text']}. Add it to {path}.",
                            mistakes=(base.Mistake(buggy, inspect,
                                                   f"The body must be `{f['body']}`. Fix {path}."),))
        actions += [write, run_test]
    all_tests = " && ".join(f"python3 {_test_path(f)}" for f in functions)
    actions.append(base.bash(all_tests, f"All {n} functions of section {number} are written. "
                             "Run every test once more.", expect="\n".join(["OK"] * n)))
    actions.append(base.Action("search_file", {"file": path, "query": "def "},
                               f"List the functions defined in {path}."))
    return actions
