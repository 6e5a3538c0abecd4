"""The agent tools of the task suite, executed in a real sandbox."""
import os

import pytest

from klong_jax.sandbox import Sandbox
from klong_jax.tasks.tools import (MAX_CHUNK_LINES, TOOL_NAMES, blacklist_hit, execute_tool,
                                    normalize_blacklist_entry, run_tool, system_prompt)


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


# --------------------------------------------------------------------------------------------------
# The task's blacklist (PaperBench blacklist.txt)

BLACKLIST = ("https://github.com/Authors/Method-Code", "# a comment", "none", "http://www.example.org/data/")


@pytest.mark.parametrize("name, arguments", [
    ("bash", {"cmd": "touch RAN && git clone https://github.com/Authors/Method-Code"}),
    ("bash", {"cmd": "touch RAN && git clone HTTP://WWW.GitHub.com/authors/method-code.git"}),
    ("bash", {"cmd": "touch RAN; curl -sL github.com/authors/method-code/archive/main.zip"}),
    ("bash", {"cmd": "touch RAN; git clone git@github.com:Authors/Method-Code.git"}),
    ("bash", {"cmd": "touch RAN; wget https://raw.githubusercontent.com/Authors/Method-Code/main/train.py"}),
    ("bash", {"cmd": "touch RAN; echo 'see https://github.com/Authors/Method-Code/.' "}),
    ("bash", {"cmd": "touch RAN; curl 'https://github.com/Authors/Method-Code?tab=readme#top'"}),
    ("bash", {"cmd": "touch RAN; curl example.org/data/train.csv"}),
    ("python", {"code": "open('RAN', 'w'); import urllib.request as u; "
                        "u.urlopen('https://github.com/authors/method-code/')"}),
    ("write_file", {"path": "RAN", "content": "source: https://github.com/Authors/Method-Code\n"}),
])
def test_blacklisted_calls_are_refused_and_not_run(sandbox, name, arguments):
    result = run_tool(sandbox, name, arguments, blacklist=BLACKLIST)
    assert not result.ok
    assert "blacklisted for this task" in result.observation and "not run" in result.observation
    assert not os.path.exists(os.path.join(sandbox.episode_dir, "RAN"))


@pytest.mark.parametrize("url", [
    "https://github.com/Authors/Method-Code-fork",
    "https://github.com/Authors/Method-Codes",
    "https://github.com/OtherAuthors/Method-Code",
    "https://github.com/Authors",
    "https://notgithub.com/Authors/Method-Code",
    "https://github.com/Authors/Method-Code.github.io",
    "https://example.org/database",
])
def test_similar_urls_are_allowed(sandbox, url):
    marker = os.path.join(sandbox.episode_dir, "ALLOWED")
    result = run_tool(sandbox, "bash", {"cmd": f"echo '{url}' > ALLOWED && cat ALLOWED"}, blacklist=BLACKLIST)
    assert result.ok and result.observation == url
    assert open(marker).read() == url + "\n"
    os.unlink(marker)


def test_blacklist_normalisation_and_empty_blacklists():
    assert normalize_blacklist_entry("https://www.GitHub.com/Org/Repo.git/") == "github.com/org/repo"
    assert normalize_blacklist_entry("git://user@GitLab.com/a/b?x=1#y") == "gitlab.com/a/b"
    for nothing in ("", "  ", "none", "NONE", "# comment"):
        assert normalize_blacklist_entry(nothing) is None
    assert blacklist_hit({"cmd": "git clone https://github.com/org/repo"}, ("none",)) is None
    assert blacklist_hit({"cmd": "git clone https://github.com/org/repo"}, ()) is None
    # Any argument text counts, nested ones included; the entry is reported as written.
    assert blacklist_hit({"a": ["x", {"b": "github.com/ORG/REPO"}]}, ("https://github.com/org/repo/",)) \
        == "https://github.com/org/repo/"
