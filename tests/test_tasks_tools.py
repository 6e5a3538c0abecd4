"""The agent tools of the task suite, executed in a real sandbox."""
import os

import pytest

from klong_jax.sandbox import Sandbox
from klong_jax.tasks.tools import MAX_CHUNK_LINES, TOOL_NAMES, execute_tool, run_tool, system_prompt


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    episode_dir = tmp_path_factory.mktemp("tools") / "episode"
    episode_dir.mkdir()
    (episode_dir / "long.txt").write_text("".join(f"row {i}\n" for i in range(1, 121)))
    (episode_dir / "animals.txt").write_text("cat 1\nowl 2\nfox 3\nCat 4\nyak 5\nelk 6\ncat 7\n")
    with Sandbox(episode_dir) as sb:
        yield sb


def test_read_file_chunk_numbers_lines_and_caps_at_50(sandbox):
    text = execute_tool(sandbox, "read_file_chunk", {"file": "long.txt", "start_line": 3, "max_lines": 2})
    assert text == "[lines 3-4 of 120 in long.txt]\n3: row 3\n4: row 4"
    capped = run_tool(sandbox, "read_file_chunk", {"file": "long.txt", "start_line": 1, "max_lines": 80})
    assert capped.ok
    body = capped.observation.splitlines()
    assert body[0] == f"[lines 1-{MAX_CHUNK_LINES} of 120 in long.txt]"
    assert len(body) == 1 + MAX_CHUNK_LINES and body[-1] == "50: row 50"
    tail = execute_tool(sandbox, "read_file_chunk", {"file": "long.txt", "start_line": 118})
    assert tail.splitlines()[1:] == ["118: row 118", "119: row 119", "120: row 120"]


@pytest.mark.parametrize("arguments, message", [
    ({"file": "long.txt", "start_line": 121}, "past the end"),
    ({"file": "long.txt", "start_line": 0}, "start_line must be >= 1"),
    ({"file": "long.txt", "start_line": "x"}, "must be an integer"),
    ({"file": "missing.txt"}, "no such file"),
    ({"file": "../outside.txt"}, "outside the working directory"),
    ({"file": "/etc/passwd"}, "outside the working directory"),
    ({"start_line": 1}, "needs argument(s) file"),
])
def test_read_file_chunk_errors(sandbox, arguments, message):
    result = run_tool(sandbox, "read_file_chunk", arguments)
    assert not result.ok and message in result.observation


def test_read_tools_refuse_symlinks_out_and_fifos(sandbox):
    assert run_tool(sandbox, "bash", {"cmd": "ln -sf /etc/hostname escape.txt && mkfifo pipe"}).ok
    escaped = run_tool(sandbox, "read_file_chunk", {"file": "escape.txt"})
    assert not escaped.ok and "outside the working directory" in escaped.observation
    fifo = run_tool(sandbox, "search_file", {"file": "pipe", "query": "x"})  # must not hang
    assert not fifo.ok and "not a regular file" in fifo.observation


def test_search_file_context_case_and_pages(sandbox):
    first = execute_tool(sandbox, "search_file",
                         {"file": "animals.txt", "query": "cat", "context_lines": 1, "max_matches": 2})
    assert first == ("[3 matches for 'cat' in animals.txt; page 1 of 2]\n"
                     "1> cat 1\n2: owl 2\n--\n3: fox 3\n4> Cat 4\n5: yak 5")
    second = execute_tool(sandbox, "search_file",
                          {"file": "animals.txt", "query": "cat", "context_lines": 0, "max_matches": 2,
                           "page": 2})
    assert second == "[3 matches for 'cat' in animals.txt; page 2 of 2]\n7> cat 7"
    assert "no match" in execute_tool(sandbox, "search_file", {"file": "animals.txt", "query": "emu"})
    assert not run_tool(sandbox, "search_file", {"file": "animals.txt", "query": "cat",
                                                 "page": 3}).ok


def test_write_file_creates_parents_inside_only(sandbox):
    result = run_tool(sandbox, "write_file", {"path": "deep/er/new.py", "content": "x = 1\ny = 2\n"})
    assert result.ok and result.observation == "Wrote 2 lines to deep/er/new.py"
    path = os.path.join(sandbox.episode_dir, "deep/er/new.py")
    assert open(path).read() == "x = 1\ny = 2\n"
    # The file belongs to the agent: its shell commands can change it afterwards.
    assert os.stat(path).st_uid == sandbox.uid
    assert run_tool(sandbox, "bash", {"cmd": "echo 'z = 3' >> deep/er/new.py"}).ok
    outside = os.path.join(os.path.dirname(sandbox.episode_dir), "escaped.txt")
    for target in ("../escaped.txt", outside):
        refused = run_tool(sandbox, "write_file", {"path": target, "content": "no"})
        assert not refused.ok and "outside the working directory" in refused.observation
    assert not os.path.exists(outside)
    assert not run_tool(sandbox, "write_file", {"path": "deep", "content": "x"}).ok


def test_bash_and_python_report_output_and_exit_status(sandbox):
    assert execute_tool(sandbox, "bash", {"cmd": "echo hello; echo oops >&2"}) == "hello\noops"
    assert execute_tool(sandbox, "bash", {"cmd": "true"}) == "(no output)"
    failed = run_tool(sandbox, "bash", {"cmd": "ls nothing_here"})
    assert not failed.ok and failed.observation.endswith("[exit code 2]")
    assert execute_tool(sandbox, "python", {"code": "x = 6\nprint(x * 7)"}) == "42"
    # Stateless: a fresh interpreter per call.
    assert "NameError" in execute_tool(sandbox, "python", {"code": "print(x)"})


def test_submit_and_bad_calls_never_raise(sandbox):
    submitted = run_tool(sandbox, "submit", {"end_message": "done"})
    assert submitted.ok and submitted.submitted
    assert "unknown tool" in execute_tool(sandbox, "rm_rf", {})
    assert "must be an object" in execute_tool(sandbox, "bash", ["ls"])
    assert "needs argument(s) cmd" in execute_tool(sandbox, "bash", {})
    assert "bad path" in execute_tool(sandbox, "write_file", {"path": 5, "content": "x"})


def test_system_prompt_lists_every_tool():
    prompt = system_prompt()
    for name in TOOL_NAMES:
        assert f"- {name}(" in prompt
