"""The agent's tools (PaperBench-like) and how one call executes in a sandbox.

bash, python and write_file run inside the sandbox, as its unprivileged user; read_file_chunk and
search_file read from the host, only regular files inside the episode directory (checked on the file
actually opened, so a symlink swapped in meanwhile cannot leak a host file). write_file too accepts only
paths inside the episode directory. Bad calls never raise: the agent gets an error observation, as it
would from a real tool server.

A task may carry a blacklist (PaperBench's blacklist.txt: resources, usually the authors' code repository,
the agent must not access). A call whose arguments name a blacklisted resource is refused and not run
(`blacklist_hit`, `run_tool(..., blacklist=)`). The sandbox has no outside network anyway; the refusal
makes the rule visible to the agent and keeps trajectories free of attempts that would count as cheating
where the network is open. It matches what a call names, so it is a rule, not a firewall.
"""
import dataclasses
import functools
import os
import pathlib
import re
import shlex
import stat
from typing import Any

MAX_CHUNK_LINES = 50
DEFAULT_CONTEXT_LINES = 2
DEFAULT_MAX_MATCHES = 5
MAX_READ_BYTES = 8 << 20  # read_file_chunk and search_file refuse larger files

TOOL_SPECS: list[dict[str, Any]] = [
    {"name": "bash", "description": "Run a bash command in the working directory; returns its output.",
     "parameters": {"cmd": "string"}},
    {"name": "python", "description": "Run Python code in a fresh interpreter; returns what it prints.",
     "parameters": {"code": "string"}},
    {"name": "read_file_chunk",
     "description": f"Show lines of a file with line numbers (at most {MAX_CHUNK_LINES} lines).",
     "parameters": {"file": "string", "start_line": "integer (from 1)",
                    "max_lines": f"integer (at most {MAX_CHUNK_LINES})"}},
    {"name": "write_file", "description": "Write content to a file, creating parent directories.",
     "parameters": {"path": "string", "content": "string"}},
    {"name": "search_file",
     "description": "Show the lines of a file that contain a text, with context lines around them.",
     "parameters": {"file": "string", "query": "string", "context_lines": "integer (default 2)",
                    "max_matches": "integer (default 5)", "page": "integer (default 1)"}},
    {"name": "submit", "description": "End the task.", "parameters": {"end_message": "string"}},
]
TOOL_NAMES = tuple(spec["name"] for spec in TOOL_SPECS)
REQUIRED_ARGUMENTS = {"bash": ("cmd",), "python": ("code",), "read_file_chunk": ("file",),
                      "write_file": ("path", "content"), "search_file": ("file", "query"), "submit": ()}


def system_prompt() -> str:
    """The agent's instructions and tool list: the system message of every trajectory. Its last line holds the
    chat template's slot for the tool-call syntax (klong_jax.data.template_base.TOOL_CALL_FORMAT_SLOT): the data
    stay template-free, and the template that renders them writes its own call syntax there."""
    tools = "\n".join(
        f"- {spec['name']}({', '.join(spec['parameters'])}): {spec['description']}" for spec in TOOL_SPECS)
    return ("You are an agent that carries out the project described by the user, in a sandbox "
            "directory. Work step by step: each turn, think briefly, then call exactly one tool. "
            "Check your work as you go. When everything is done, call submit.\n"
            f"Tools:\n{tools}\n"
            "{tool_call_format}")


class ToolError(Exception):
    """A bad call: its message is the observation."""


@dataclasses.dataclass(frozen=True)
class ToolResult:
    observation: str
    ok: bool               # False when the call failed (nonzero exit, bad arguments, missing file)
    submitted: bool = False


def _episode_root(sandbox) -> pathlib.Path:
    return pathlib.Path(sandbox.episode_dir).resolve()


def _resolve(sandbox, path: str) -> pathlib.Path:
    if not isinstance(path, str) or not path or "\0" in path:
        raise ToolError(f"Error: bad path {path!r}")
    root = _episode_root(sandbox)
    resolved = (root / path).resolve()
    if not resolved.is_relative_to(root):
        raise ToolError(f"Error: {path} is outside the working directory")
    return resolved


def _command_observation(result) -> ToolResult:
    text = result.output.rstrip("\n")
    if result.timed_out:
        text += f"\n[command timed out after {result.wall_s:.0f} s]"
    elif result.exit_code != 0:
        text += f"\n[exit code {result.exit_code}]"
    return ToolResult(text.strip("\n") or "(no output)", result.exit_code == 0 and not result.timed_out)


def _int_argument(arguments: dict, name: str, default: int, low: int) -> int:
    value = arguments.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            value = int(str(value))
        except ValueError:
            raise ToolError(f"Error: {name} must be an integer, got {value!r}") from None
    if value < low:
        raise ToolError(f"Error: {name} must be >= {low}, got {value}")
    return value


def _read_lines(sandbox, file: str) -> list[str]:
    root = _episode_root(sandbox)
    path = _resolve(sandbox, file)
    try:
        # Non-blocking, so a FIFO planted by the agent cannot hang the host.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise ToolError(f"Error: no such file: {file}") from None
    with os.fdopen(fd, "rb") as f:
        # The agent's background jobs may swap a symlink in after the check above: read only what was
        # really opened, and only if it is a regular file inside the episode directory.
        opened = pathlib.Path(os.readlink(f"/proc/self/fd/{fd}"))
        if not opened.is_relative_to(root):
            raise ToolError(f"Error: {file} is outside the working directory")
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ToolError(f"Error: {file} is not a regular file")
        data = f.read(MAX_READ_BYTES + 1)
    if len(data) > MAX_READ_BYTES:
        raise ToolError(f"Error: {file} is larger than {MAX_READ_BYTES} bytes; use bash (head, sed)")
    return data.decode("utf-8", errors="replace").splitlines()


def _read_file_chunk(sandbox, arguments: dict) -> ToolResult:
    file = arguments["file"]
    start = _int_argument(arguments, "start_line", 1, 1)
    count = min(_int_argument(arguments, "max_lines", MAX_CHUNK_LINES, 1), MAX_CHUNK_LINES)
    lines = _read_lines(sandbox, file)
    if not lines:
        return ToolResult(f"[{file} is empty]", True)
    if start > len(lines):
        return ToolResult(f"Error: start_line {start} is past the end of {file} ({len(lines)} lines)",
                          False)
    end = min(start + count - 1, len(lines))
    body = "\n".join(f"{i}: {lines[i - 1]}" for i in range(start, end + 1))
    return ToolResult(f"[lines {start}-{end} of {len(lines)} in {file}]\n{body}", True)


def _search_file(sandbox, arguments: dict) -> ToolResult:
    file, query = arguments["file"], str(arguments["query"])
    context = _int_argument(arguments, "context_lines", DEFAULT_CONTEXT_LINES, 0)
    per_page = _int_argument(arguments, "max_matches", DEFAULT_MAX_MATCHES, 1)
    page = _int_argument(arguments, "page", 1, 1)
    if not query:
        return ToolResult("Error: query must not be empty", False)
    lines = _read_lines(sandbox, file)
    hits = [i for i, line in enumerate(lines, 1) if query.lower() in line.lower()]
    if not hits:
        return ToolResult(f"[no match for {query!r} in {file}]", True)
    pages = (len(hits) + per_page - 1) // per_page
    if page > pages:
        return ToolResult(f"Error: page {page} does not exist ({len(hits)} matches, {pages} pages)", False)
    blocks = []
    for i in hits[(page - 1) * per_page: page * per_page]:
        shown = range(max(1, i - context), min(len(lines), i + context) + 1)
        blocks.append("\n".join(f"{j}{'>' if j == i else ':'} {lines[j - 1]}" for j in shown))
    header = f"[{len(hits)} matches for {query!r} in {file}; page {page} of {pages}]"
    return ToolResult(header + "\n" + "\n--\n".join(blocks), True)


def _write_file(sandbox, arguments: dict) -> ToolResult:
    path, content = arguments["path"], arguments["content"]
    if not isinstance(content, str):
        return ToolResult("Error: content must be a string", False)
    relative = _resolve(sandbox, path).relative_to(_episode_root(sandbox))
    if not relative.parts:
        return ToolResult(f"Error: {path} is a directory", False)
    # Written by the sandbox's own user inside the sandbox: confined like any command, and the file
    # belongs to the agent, so its later shell commands can change it.
    command = (f"mkdir -p -- {shlex.quote(str(relative.parent))} && "
               f"cat > {shlex.quote(str(relative))}")
    result = sandbox.run(command, stdin=content)
    if not result.ok:
        return ToolResult(f"Error: could not write {path}: {result.output.strip()}", False)
    n_lines = content.count("\n") + (0 if content.endswith("\n") or not content else 1)
    return ToolResult(f"Wrote {n_lines} lines to {path}", True)


# ------------------------------------------------------------------------------------------------
# Blacklist

_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)
# Other hosts serving the same GitHub repository (raw files, archives, the REST API).
_GITHUB_MIRRORS = ("raw.githubusercontent.com/{repo}", "codeload.github.com/{repo}",
                   "api.github.com/repos/{repo}", "github.com/{repo}")


def normalize_blacklist_entry(entry: str) -> str | None:
    """`host/path` of a blacklist line, lower-cased, without scheme, user, `www.`, query, fragment,
    trailing slash or `.git`; None for a line that blacklists nothing (empty, a `#` comment, `none`)."""
    text = entry.strip()
    if not text or text.startswith("#") or text.lower() == "none":
        return None
    text = _SCHEME.sub("", text)
    text = re.sub(r"[?#].*$", "", text)
    host, _, path = text.partition("/")
    host = host.rsplit("@", 1)[-1].lower()
    if host.startswith("www."):
        host = host[4:]
    path = path.strip("/")
    if path.lower().endswith(".git"):
        path = path[:-4]
    return f"{host}/{path}".rstrip("/").lower() if host else None


@functools.lru_cache(maxsize=256)
def _blacklist_patterns(blacklist: tuple[str, ...]) -> tuple[tuple[str, re.Pattern], ...]:
    patterns = []
    for entry in blacklist:
        normal = normalize_blacklist_entry(entry)
        if normal is None:
            continue
        host, _, path = normal.partition("/")
        forms = [normal]
        if host == "github.com" and path.count("/") == 1:
            forms = [form.format(repo=path) for form in _GITHUB_MIRRORS]
        alternatives = []
        for form in forms:
            form_host, _, form_path = form.partition("/")
            # The host may be written with `www.` and any case, and a path after `/` (or `:`, as in
            # git@github.com:org/repo); the name must end there: `repo`, `repo/...`, `repo.git`, `repo?x`
            # match, `repo-fork`, `repo2`, `repository` do not.
            body = re.escape(form_host) + (r"[/:]" + re.escape(form_path) if form_path else "")
            alternatives.append(r"(?<![\w.-])(?:www\.)?" + body + r"(?:\.git)?(?![\w-]|\.[\w-])")
        patterns.append((entry.strip(), re.compile("|".join(alternatives), re.IGNORECASE)))
    return tuple(patterns)


def _argument_texts(value: Any):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield str(key)
            yield from _argument_texts(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _argument_texts(item)


def blacklist_hit(arguments: Any, blacklist: tuple[str, ...] | list[str]) -> str | None:
    """The first blacklist entry (as written) that some text of `arguments` names, or None.

    Entries are URLs or `host/path`s; a text names one when it contains that host and path with any
    scheme (or none), `www.` or not, any letter case (hosts ignore it; GitHub owner/repo paths too), and
    anything after a path boundary (`/more`, `.git`, `?query`, `#anchor`). A github.com/OWNER/REPO entry
    also covers raw.githubusercontent.com, codeload.github.com and api.github.com/repos for that repo.
    Blank lines, `#` comments and `none` blacklist nothing."""
    patterns = _blacklist_patterns(tuple(blacklist))
    if not patterns:
        return None
    for text in _argument_texts(arguments):
        for entry, pattern in patterns:
            if pattern.search(text):
                return entry
    return None


def run_tool(sandbox, name: str, arguments: Any, blacklist: tuple[str, ...] = ()) -> ToolResult:
    """Execute one tool call in `sandbox`; never raises for bad calls (they become error observations).

    blacklist: the task's blacklisted resources (see blacklist_hit); a call whose arguments name one is
    not run, and its observation says why."""
    if name not in TOOL_NAMES:
        return ToolResult(f"Error: unknown tool {name!r}; tools: {', '.join(TOOL_NAMES)}", False)
    if not isinstance(arguments, dict):
        return ToolResult(f"Error: arguments of {name} must be an object, got {type(arguments).__name__}",
                          False)
    missing = [key for key in REQUIRED_ARGUMENTS[name] if key not in arguments]
    if missing:
        return ToolResult(f"Error: {name} needs argument(s) {', '.join(missing)}", False)
    hit = blacklist_hit(arguments, blacklist)
    if hit is not None:
        return ToolResult(f"Error: refused, not run: this call names {hit}, a resource blacklisted for "
                          "this task (its blacklist.txt); you must not access it. Reproduce the work "
                          "without it.", False)
    try:
        if name == "bash":
            return _command_observation(sandbox.run(str(arguments["cmd"])))
        if name == "python":
            return _command_observation(sandbox.run_python(str(arguments["code"])))
        if name == "read_file_chunk":
            return _read_file_chunk(sandbox, arguments)
        if name == "search_file":
            return _search_file(sandbox, arguments)
        if name == "write_file":
            return _write_file(sandbox, arguments)
        return ToolResult("Submitted.", True, submitted=True)
    except ToolError as e:
        return ToolResult(str(e), False)
    except OSError as e:  # e.g. permission denied, or a path component that is a file
        return ToolResult(f"Error: {e.strerror or e}", False)


def execute_tool(sandbox, name: str, arguments: Any) -> str:
    """The observation the agent sees for one tool call."""
    return run_tool(sandbox, name, arguments).observation
