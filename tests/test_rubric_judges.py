"""CommandJudge in the real sandbox, and LLMJudge's failure handling against a local HTTP server."""
import http.server
import json
import socket
import threading
import time

import pytest

from klong_jax.rubric import (CommandJudge, GradingContext, LLMJudge, grade, parse_rubric,
                              parse_verdict)
from klong_jax.rubric.llm_judge import VerdictFormatError
from klong_jax.sandbox import Sandbox, SandboxLimits


def rubric_with_checks():
    def leaf(id_, check, category="Code Development"):
        return {"id": id_, "requirements": f"req {id_}", "weight": 1, "sub_tasks": [],
                "task_category": category, "check": check}
    return parse_rubric({"id": "root", "requirements": "root", "weight": 1, "task_category": None,
                         "sub_tasks": [leaf("exists", "test -f out.txt"),
                                       leaf("content", "grep -qx 42 out.txt"),
                                       leaf("missing", "test -f nothing.txt"),
                                       leaf("slow", "sleep 30"),
                                       leaf("escape", "touch /usr/x || exit 1; cat /root/.bashrc")]})


def test_command_judge_runs_checks_in_the_sandbox(tmp_path):
    episode = tmp_path / "ep"
    with Sandbox(episode) as sb:  # the episode: the agent writes its output
        assert sb.run("echo 42 > out.txt").exit_code == 0
    with CommandJudge(timeout_s=1.0, limits=SandboxLimits()) as judge:
        result = grade(rubric_with_checks(), judge, GradingContext(str(episode)))
    by_id = {n.id: n for n in result.walk()}
    assert by_id["exists"].score == 1.0 and by_id["exists"].valid
    assert by_id["content"].score == 1.0
    assert by_id["missing"].score == 0.0 and by_id["missing"].valid
    assert by_id["slow"].score == 0.0 and not by_id["slow"].valid  # a timeout is not a silent 0
    assert "timed out" in by_id["slow"].explanation
    assert by_id["escape"].score == 0.0 and by_id["escape"].valid
    assert result.score == pytest.approx(2 / 5)
    assert result.summary()["invalid"] == 1


def test_command_judge_sandbox_failure_is_invalid(tmp_path, monkeypatch):
    from klong_jax.sandbox import backends
    monkeypatch.setenv(backends.BWRAP_ENV, str(tmp_path / "no-bwrap"))
    monkeypatch.setenv(backends.UNSHARE_ENV, str(tmp_path / "no-unshare"))
    with CommandJudge() as judge:
        result = grade(rubric_with_checks(), judge, GradingContext(str(tmp_path / "ep")))
    assert result.score == 0.0 and result.summary()["invalid"] == 5
    assert all("sandbox failure" in leaf.explanation for leaf in result.leaves())


# --------------------------------------------------------------------------------------------------
class ScriptedServer:
    """A chat-completions endpoint on 127.0.0.1 that answers each request with the next scripted step:
    ("status", code) | ("sleep", seconds) | ("content", text) | ("cut", text: finish_reason "length") |
    ("raw", bytes)."""

    def __init__(self, script):
        self.script = list(script)
        self.requests = []
        self.times = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "body": body,
                                       "auth": self.headers.get("Authorization")})
                outer.times.append(time.monotonic())
                kind, value = outer.script.pop(0) if outer.script else ("status", 500)
                if kind == "sleep":
                    time.sleep(value)
                    kind, value = "content", "late\nVERDICT: PASS"
                if kind == "status":
                    self.send_response(value)
                    self.end_headers()
                    self.wfile.write(b'{"error": "scripted"}')
                    return
                finish = "stop"
                if kind == "cut":                 # an answer that reached max_tokens
                    kind, finish = "content", "length"
                payload = value if kind == "raw" else json.dumps(
                    {"choices": [{"message": {"role": "assistant", "content": value}, "finish_reason": finish}],
                     "usage": {"prompt_tokens": 10}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass  # a client that timed out and hung up is part of the script

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def llm_rubric():
    return parse_rubric({"id": "root", "requirements": "The method is implemented", "weight": 1,
                         "task_category": None, "sub_tasks": [
                             {"id": "l1", "requirements": "train.py implements the loss", "weight": 1,
                              "sub_tasks": [], "task_category": "Code Development",
                              "finegrained_task_category": "Method Implementation"}]})


@pytest.fixture
def submission(tmp_path):
    (tmp_path / "train.py").write_text("def loss(x):\n    return x ** 2  # MARKER-LOSS\n")
    (tmp_path / "reproduce.log").write_text("step 1\n" * 50_000 + "FINAL-LINE\n")
    (tmp_path / "weights.bin").write_bytes(b"\0\1\2" * 1000)
    secret = tmp_path.parent / f"{tmp_path.name}_host_secret.txt"
    secret.write_text("HOST-SECRET\n")
    (tmp_path / "notes.txt").symlink_to(secret)  # the grader (root) must not follow it
    return GradingContext(str(tmp_path), task="Reproduce the paper's loss.")


def judge_for(server, **kw):
    kw = {"timeout_s": 2.0, "max_attempts": 3, "backoff_s": 0.05, **kw}
    return LLMJudge(server.url, "judge-model", api_key="k", **kw)


def test_llm_judge_retries_then_passes_with_bounded_prompt(submission):
    script = [("status", 503), ("content", "looks fine but no verdict"), ("content", "Good.\nVERDICT: PASS")]
    rubric = llm_rubric()
    with ScriptedServer(script) as server:
        judge = judge_for(server, max_file_chars=2000, max_evidence_chars=6000).with_ancestors(rubric)
        result = grade(rubric, judge, submission)
    assert result.score == 1.0 and result.valid
    leaf = next(result.leaves())
    assert leaf.explanation == "Good." and leaf.metadata["attempts"] == 3
    assert len(server.requests) == 3
    request = server.requests[-1]
    assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer k"
    assert request["body"]["model"] == "judge-model"
    prompt = request["body"]["messages"][1]["content"]
    assert "train.py implements the loss" in prompt and "The method is implemented" in prompt
    assert "MARKER-LOSS" in prompt and "FINAL-LINE" in prompt  # the log's tail survives the cut
    assert "Reproduce the paper's loss." in prompt and "weights.bin" in prompt
    assert len(prompt) < 9000 and "HOST-SECRET" not in prompt
    gaps = [b - a for a, b in zip(server.times, server.times[1:])]
    assert gaps[0] >= 0.05 and gaps[1] >= 0.1  # exponential back-off


def test_llm_judge_garbage_output_is_invalid(submission):
    script = [("content", "PASS"), ("raw", b"not json"), ("content", "VERDICT: PASS\nVERDICT: FAIL")]
    with ScriptedServer(script) as server:
        result = grade(llm_rubric(), judge_for(server), submission)
    leaf = next(result.leaves())
    assert leaf.score == 0.0 and not leaf.valid and result.summary()["invalid"] == 1
    assert "after 3 attempt(s)" in leaf.explanation and len(server.requests) == 3


def test_llm_judge_timeout_is_invalid(submission):
    with ScriptedServer([("sleep", 1.5)] * 2) as server:
        result = grade(llm_rubric(), judge_for(server, timeout_s=0.3, max_attempts=2), submission)
    leaf = next(result.leaves())
    assert not leaf.valid and leaf.score == 0.0 and "timed out" in leaf.explanation.lower()


def test_llm_judge_client_error_is_not_retried(submission):
    with ScriptedServer([("status", 400)]) as server:
        result = grade(llm_rubric(), judge_for(server), submission)
    leaf = next(result.leaves())
    assert not leaf.valid and "HTTP 400" in leaf.explanation and len(server.requests) == 1


def test_llm_judge_unreachable_server_is_invalid(submission):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    judge = LLMJudge(f"http://127.0.0.1:{port}/v1", "m", max_attempts=2, backoff_s=0.01, timeout_s=1)
    verdict = judge.judge(llm_rubric().sub_tasks[0], submission)
    assert not verdict.valid and verdict.metadata["attempts"] == 2 and "refused" in verdict.explanation


def test_llm_judge_fail_verdict_is_valid_zero(submission):
    with ScriptedServer([("content", "train.py is missing the loss.\nVERDICT: FAIL")]) as server:
        result = grade(llm_rubric(), judge_for(server), submission)
    assert result.score == 0.0 and result.valid


@pytest.mark.parametrize("text, score", [("reason\nVERDICT: PASS", 1.0), ("VERDICT: FAIL\n\n", 0.0),
                                         ("  a\n  VERDICT: PASS  ", 1.0)])
def test_parse_verdict_accepts_strict_format(text, score):
    assert parse_verdict(text)[0] == score


@pytest.mark.parametrize("text", ["", "verdict: pass", "VERDICT: PASS\nmore text", "VERDICT: MAYBE",
                                  "VERDICT: FAIL\nVERDICT: PASS", "**VERDICT: PASS**"])
def test_parse_verdict_rejects_anything_else(text):
    with pytest.raises(VerdictFormatError):
        parse_verdict(text)


def test_llm_judge_json_verdicts_under_the_schema(submission):
    """verdict_format="json": the request carries VERDICT_SCHEMA as response_format and a JSON system prompt; a
    verdict line, a cut answer and a verdict outside the enum are retried; the JSON answer grades."""
    from klong_jax.rubric.llm_judge import VERDICT_SCHEMA, parse_json_verdict
    from klong_jax.sampling.json_schema import compile_schema
    good = '{"explanation": "train.py has the loss.", "verdict": "PASS"}'
    script = [("content", "Fine.\nVERDICT: PASS"), ("cut", '{"explanation": "train.py has'),
              ("content", '{"explanation": "x", "verdict": "MAYBE"}'), ("content", good)]
    with ScriptedServer(script) as server:
        result = grade(llm_rubric(), judge_for(server, max_attempts=4, verdict_format="json"), submission)
    leaf = next(result.leaves())
    assert result.score == 1.0 and leaf.valid and leaf.explanation == "train.py has the loss."
    assert leaf.metadata["attempts"] == 4 and "max_tokens" in leaf.metadata["errors"][1]
    body = server.requests[0]["body"]
    assert body["response_format"]["json_schema"]["schema"] == VERDICT_SCHEMA
    assert "JSON object" in body["messages"][0]["content"] and "VERDICT: PASS" not in body["messages"][0]["content"]
    # The schema's grammar takes exactly the answers parse_json_verdict takes.
    grammar = compile_schema(VERDICT_SCHEMA)
    assert grammar.accepts(good) and parse_json_verdict(good) == (1.0, "train.py has the loss.")
    assert not grammar.accepts('{"explanation": "x", "verdict": "MAYBE"}')
    with pytest.raises(ValueError, match="verdict_format"):
        judge_for(server, verdict_format="yaml")

