"""Planned expert mistakes: each fails visibly and changes nothing, so the repair restores the plan.

Only two generic shapes are used, both common in real agent logs: a misspelt command name (bash
answers "command not found") and a misspelt path (the command cannot find the file; the expert lists
the directory, then retries with the right name).
"""
import posixpath

from klong_jax.tasks.kinds.base import Action, Mistake, bash

# Misspellings that are not real programs on any ordinary system (e.g. "sl" is, so "ls" -> "lss").
_TYPOS = {
    "ls": "lss", "cat": "cta", "head": "haed", "tail": "tial", "mkdir": "mkidr", "mv": "mvv",
    "wc": "wcc", "python3": "pyhton3", "grep": "gerp",
}


def typo_command(action: Action) -> Mistake | None:
    """The same bash call with its program name misspelt; None when that cannot be done safely."""
    cmd = action.arguments["cmd"]
    program, _, rest = cmd.partition(" ")
    # A redirection would still create its target file before bash finds the program missing.
    if program not in _TYPOS or ">" in cmd:
        return None
    wrong = bash(f"{_TYPOS[program]} {rest}".rstrip(), action.reasoning)
    return Mistake((wrong,), None, f"Typo in the command name; run `{program}` again.")


def misspell(name: str) -> str:
    """A near miss of a file name: two letters of its stem swapped (or one doubled)."""
    stem, dot, ext = name.partition(".")
    for i in range(len(stem) - 1):
        if stem[i] != stem[i + 1]:
            swapped = stem[:i] + stem[i + 1] + stem[i] + stem[i + 2:]
            return swapped + dot + ext
    return stem + stem[-1] + dot + ext


def wrong_path(action: Action, path: str) -> Mistake:
    """The same call with `path` misspelt; the expert then lists the directory and retries."""
    directory, base = posixpath.split(path)
    bad = posixpath.join(directory, misspell(base))
    arguments = {
        key: value.replace(path, bad) if isinstance(value, str) else value
        for key, value in action.arguments.items()
    }
    wrong = Action(action.tool, arguments, action.reasoning)
    inspect = bash(f"ls {directory or '.'}",
                   f"No such file {bad}. List {directory or 'the working directory'} to check the name.")
    return Mistake((wrong,), inspect, f"The file is {path}; retry with the right name.")


def bash_mistakes(action: Action, path: str | None = None) -> Action:
    """`action` with every mistake that applies to it attached."""
    options = []
    typo = typo_command(action)
    if typo is not None:
        options.append(typo)
    if path is not None:
        options.append(wrong_path(action, path))
    return Action(action.tool, action.arguments, action.reasoning, action.content, action.expect,
                  tuple(options))
