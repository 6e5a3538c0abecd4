"""The OpenAI-compatible server, queried with the `openai` client: a tiny random model on 127.0.0.1."""
import json
import os
import threading
import urllib.request

import jax
import numpy as np
import openai
import pytest
from flax import nnx

from klong_jax.data.chat_template import Glm45Template
from klong_jax.data.synthetic import synthetic_corpus, texts_of
from klong_jax.data.tokenizer import SentencePieceTokenizer
from klong_jax.data.train_tokenizer import train_sentencepiece
from klong_jax.data.trajectory import Message, ToolCall
from klong_jax.model_checkpoint import save_model
from klong_jax.models import init_model, preset
from klong_jax.sampling import Completion, Sampler, SamplingParams
from klong_jax.serving import ChatEngine, ServerThread, create_app
from klong_jax.serving import openai_api
from klong_jax.serving.loading import load_serving_model

CFG = preset("tiny", compute_dtype="float32", vocab_size=512, num_hidden_layers=2, max_position_embeddings=2048)
TOOLS = [{"type": "function", "function": {
    "name": "bash", "description": "Run a shell command.",
    "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}, "timeout": {"type": "integer"}},
                   "required": ["cmd"]}}}]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = train_sentencepiece(list(texts_of(synthetic_corpus(10, seed=0))),
                               os.path.join(tmp_path_factory.mktemp("tok"), "sp.model"), vocab_size=512)
    tok = SentencePieceTokenizer(path)
    assert tok.vocab_size <= CFG.vocab_size
    return tok


@pytest.fixture(scope="module")
def model():
    return init_model(CFG, seed=5)


@pytest.fixture(scope="module")
def server(model, tokenizer):
    # min_batch=4: single and batched calls share compilations; a wide window so the concurrent
    # requests of the batching test surely meet.
    engine = ChatEngine(Sampler(model, tokenizer, min_batch=4), model_name="tiny", batch_window_ms=300)
    with ServerThread(create_app(engine)) as srv:
        srv.engine = engine
        srv.client = openai.OpenAI(base_url=srv.url, api_key="unused", max_retries=0, timeout=120)
        yield srv
    engine.close()


def _direct(server, messages, tools=(), **params):
    """What the sampler itself generates for this conversation (greedy): the server must agree."""
    template = server.engine.template
    ids = openai_api.prompt_ids(template, messages, list(tools))
    sp = SamplingParams(temperature=0.0, stop_token_ids=template.stop_ids, **params)
    return ids, server.engine.sampler.generate([ids], sp)[0]


def test_plain_chat_equals_direct_generation(server):
    msgs = [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "train"}]
    r = server.client.chat.completions.create(model="tiny", messages=msgs, max_tokens=5, temperature=0)
    ids, c = _direct(server, [Message("system", "Be brief"), Message("user", "train")],
                     max_new_tokens=5)
    expected = openai_api.choice(server.engine.template, 0, c, [])
    assert r.model == "tiny" and r.object == "chat.completion"
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(c.tokens)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected["message"]["content"]
    assert r.choices[0].finish_reason == expected["finish_reason"]
    # the prompt is the chat template's rendering plus the generation prompt
    rendered = server.engine.template.render([Message("system", "Be brief"), Message("user", "train")])
    assert ids == rendered.input_ids.tolist() + server.engine.template.generation_prompt_ids


def test_tools_and_tool_history_are_rendered(server):
    msgs = [{"role": "user", "content": "list files"},
            {"role": "assistant", "content": "", "reasoning_content": "use bash",
             "tool_calls": [{"id": "c1", "type": "function",
                             "function": {"name": "bash", "arguments": json.dumps({"cmd": "ls", "timeout": 5})}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "paper.md"}]
    r = server.client.chat.completions.create(model="tiny", messages=msgs, tools=TOOLS, max_tokens=4,
                                              temperature=0)
    history = [Message("user", "list files"),
               Message("assistant", "", "use bash", (ToolCall("c1", "bash", {"cmd": "ls", "timeout": 5}),)),
               Message("tool", "paper.md", tool_call_id="c1")]
    template = server.engine.template
    expected_ids = template.render([Message("system", openai_api.tools_system_text(template, TOOLS))] + history).input_ids
    assert r.usage.prompt_tokens == len(expected_ids) + 1
    ids, c = _direct(server, history, TOOLS, max_new_tokens=4)
    assert r.usage.completion_tokens == len(c.tokens)
    assert "bash" in tokenizer_text(template, ids) and '"timeout"' in tokenizer_text(template, ids)
    # tool_choice "none" hides the tools
    r2 = server.client.chat.completions.create(model="tiny", messages=msgs, tools=TOOLS, tool_choice="none",
                                               max_tokens=1, temperature=0)
    assert r2.usage.prompt_tokens == len(template.render(history).input_ids) + 1


def tokenizer_text(template, ids):
    return template.tokenizer.decode(ids)


def test_generated_tool_calls_are_parsed(tokenizer):
    """Generated ids that call a tool become OpenAI tool_calls (typed by the tool's schema)."""
    template = Glm45Template(tokenizer)
    msg = Message("assistant", "let me look", "first list files",
                  (ToolCall("x", "bash", {"cmd": "ls -l", "timeout": 30}),))
    ids, _ = template.render_message(msg)
    completion = Completion(tokens=ids[1:], logprobs=np.zeros(len(ids) - 1, np.float32),
                            sampling_logprobs=np.zeros(len(ids) - 1, np.float32), finish_reason="stop",
                            stop=ids[-1])
    choice = openai_api.choice(template, 0, completion, TOOLS)
    assert choice["finish_reason"] == "tool_calls"
    m = choice["message"]
    assert m["content"] == "let me look" and m["reasoning_content"] == "first list files"
    assert [c["function"]["name"] for c in m["tool_calls"]] == ["bash"]
    assert json.loads(m["tool_calls"][0]["function"]["arguments"]) == {"cmd": "ls -l", "timeout": 30}


def test_concurrent_requests_are_batched(server):
    before = len(server.engine.queue.stats()["batch_sizes"])
    contents = ["the paper", "we show that", "import numpy as np", "accuracy figure"]
    results, barrier = [None] * 4, threading.Barrier(4)

    def ask(i):
        barrier.wait()
        results[i] = server.client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": contents[i]}], max_tokens=5, temperature=0)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with urllib.request.urlopen(f"http://{server.host}:{server.port}/stats") as resp:
        sizes = json.loads(resp.read())["batch_sizes"][before:]
    assert sum(sizes) == 4 and max(sizes) >= 2, sizes      # some requests were decoded together
    for i, r in enumerate(results):                        # and each got its own answer
        _, c = _direct(server, [Message("user", contents[i])], max_new_tokens=5)
        assert r.usage.completion_tokens == len(c.tokens)
        assert r.choices[0].message.content == openai_api.choice(server.engine.template, 0, c, [])["message"]["content"]


def test_max_tokens_stop_n_logprobs_and_streaming(server):
    msgs = [{"role": "user", "content": "the result table"}]
    r = server.client.chat.completions.create(model="tiny", messages=msgs, max_tokens=3, temperature=0, logprobs=True)
    _, c = _direct(server, [Message("user", "the result table")], max_new_tokens=12)
    assert r.usage.completion_tokens == min(3, len(c.tokens))
    assert [x.logprob for x in r.choices[0].logprobs.content] == pytest.approx(c.logprobs[:3].tolist(), abs=1e-5)
    # a stop string taken from the free generation's text cuts the answer before it
    text = server.engine.template.tokenizer.decode(c.tokens)
    stop = next(text[k:k + 2] for k in range(1, len(text) - 1) if text[k:k + 2].strip() and "<" not in text[k:k + 2])
    r = server.client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop" and stop not in (r.choices[0].message.content or "")
    # n choices with a seed: reproducible
    kw = dict(model="tiny", messages=msgs, max_tokens=4, temperature=1.0, n=2, seed=11)
    a, b = server.client.chat.completions.create(**kw), server.client.chat.completions.create(**kw)
    assert len(a.choices) == 2 and [x.message.content for x in a.choices] == [x.message.content for x in b.choices]
    # streaming returns the same message as chunks
    chunks = list(server.client.chat.completions.create(model="tiny", messages=msgs, max_tokens=3, temperature=0,
                                                        stream=True))
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    plain = server.client.chat.completions.create(model="tiny", messages=msgs, max_tokens=3, temperature=0)
    assert streamed == (plain.choices[0].message.content or "")
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason


def test_bad_requests_get_400(server):
    with pytest.raises(openai.BadRequestError, match="messages"):
        server.client.chat.completions.create(model="tiny", messages=[])
    with pytest.raises(openai.BadRequestError, match="temperature"):
        server.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                              temperature=5)
    with pytest.raises(openai.BadRequestError, match="max_position_embeddings"):
        server.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                              max_tokens=5000)
    with pytest.raises(openai.BadRequestError, match="arguments"):
        server.client.chat.completions.create(model="tiny", messages=[
            {"role": "user", "content": "x"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "a", "type": "function", "function": {"name": "bash", "arguments": "{not json"}}]}])
    assert [m.id for m in server.client.models.list()] == ["tiny"]


def test_serving_model_from_an_orbax_checkpoint(tmp_path, model):
    save_model(model, str(tmp_path / "ckpt"))
    loaded = load_serving_model(checkpoint=str(tmp_path / "ckpt"))
    assert loaded.cfg == model.cfg
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(loaded))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="exactly one"):
        load_serving_model(checkpoint=str(tmp_path / "ckpt"), preset_name="tiny")


def test_serving_model_and_tokenizer_from_a_gguf():
    """`--gguf`: the real SmolLM2 file (skipped when not cached) with its own tokenizer, as `pretrained:NAME`."""
    from klong_jax.hf.pretrained import local_path
    from klong_jax.serving.loading import resolve_tokenizer
    if not os.path.isfile(local_path("smollm2-135m-instruct")):
        pytest.skip("SmolLM2 GGUF not cached (make pretrained)")
    source = "pretrained:smollm2-135m-instruct"
    tok = resolve_tokenizer(None, None, source)
    model = load_serving_model(gguf=source, compute_dtype="float32")
    assert (model.cfg.model_type, model.cfg.vocab_size, tok.vocab_size) == ("llama", 49152, 49152)
    assert tok.special_id("<|im_end|>") == 2 == model.cfg.eos_token_id
    with pytest.raises(ValueError, match="exactly one of checkpoint, hf_dir, gguf, preset"):
        load_serving_model(gguf=source, preset_name="tiny")


def _judge_rubric():
    from klong_jax.rubric import parse_rubric
    return parse_rubric({"id": "root", "requirements": "The method is implemented", "weight": 1,
                         "task_category": None, "sub_tasks": [
                             {"id": "loss", "requirements": "train.py implements the loss", "weight": 1,
                              "sub_tasks": [], "task_category": "Code Development"}]})


def _teach_answer(model, prompt, answer, steps=300, lr=3e-3):
    """Fine-tunes a copy of `model` until greedy decoding of `prompt` gives exactly `answer` (ids)."""
    import optax
    model = nnx.clone(model)
    ids = np.asarray(prompt + answer[:-1], np.int32)[None]
    targets = np.asarray(prompt[1:] + answer, np.int32)[None]
    mask = np.zeros(targets.shape, np.float32)
    mask[0, len(prompt) - 1:] = 1.0
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adam(lr)

    def loss_and_hits(params):
        logits = nnx.merge(graphdef, params, rest)(ids).astype(np.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        hits = jax.numpy.sum((logits.argmax(-1) == targets) * mask)
        return jax.numpy.sum(ce * mask) / mask.sum(), hits

    @jax.jit
    def step(params, opt_state):
        (loss, hits), grads = jax.value_and_grad(loss_and_hits, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, hits

    opt_state = tx.init(params)
    learnt_at = None
    for i in range(steps):
        params, opt_state, hits = step(params, opt_state)
        if learnt_at is None and int(hits) == len(answer):
            learnt_at = i
        if learnt_at is not None and i >= learnt_at + 30:  # a margin over the sampler's rounding
            break
    assert learnt_at is not None and int(hits) == len(answer), "the answer was not learnt"
    return params


def test_llm_judge_grades_through_the_server(server, tmp_path):
    """LLMJudge against the real server and sampler: the random model's answers are no verdict (the
    leaf is invalid, never a silent 0); once the model has learnt to answer `VERDICT: PASS` to this
    judge prompt, the leaf passes."""
    from klong_jax.rubric import GradingContext, LLMJudge, grade
    (tmp_path / "train.py").write_text("def loss(x):\n    return x ** 2\n")
    context = GradingContext(str(tmp_path), task="Reproduce the paper's loss.")
    rubric = _judge_rubric()
    judge = LLMJudge(server.url, "tiny", api_key="unused", max_tokens=32, max_attempts=2, backoff_s=0.01,
                     timeout_s=120, max_evidence_chars=400).with_ancestors(rubric)

    result = grade(rubric, judge, context)
    leaf = next(result.leaves())
    assert result.score == 0.0 and not result.valid and not leaf.valid
    assert leaf.metadata["attempts"] == 2 and "no strict final verdict" in leaf.explanation

    template = server.engine.template
    messages, _ = judge.build_messages(rubric.sub_tasks[0], context)
    prompt = openai_api.prompt_ids(template, [Message(m["role"], m["content"]) for m in messages], [])
    answer = template.tokenizer.encode("VERDICT: PASS") + [template.stop_ids[0]]
    original = nnx.state(server.engine.sampler.state, nnx.Param)
    server.engine.sampler.update_params(_teach_answer(nnx.merge(server.engine.sampler.graphdef,
                                                                server.engine.sampler.state), prompt, answer))
    try:
        result = grade(rubric, judge, context)
    finally:
        server.engine.sampler.update_params(original)
    leaf = next(result.leaves())
    assert result.score == 1.0 and result.valid and leaf.valid, leaf.explanation
    assert leaf.metadata["attempts"] == 1 and leaf.metadata["files"] == ["train.py"]
