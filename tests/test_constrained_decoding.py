"""Constrained decoding: the JSON-schema grammar against a reference validator, token masks against brute force,
the Sampler (batched, sessions) and the server's response_format, and the rubric drafter's schemas."""
import json
import random

import numpy as np
import openai
import pytest

from klong_jax.factory.rubric_draft import DRAFT_CATEGORIES, step_schema
from klong_jax.models import init_model, preset
from klong_jax.rubric import FINEGRAINED_CATEGORIES
from klong_jax.sampling import Sampler, SamplingParams
from klong_jax.sampling.constraint import JsonConstraint, TokenVocab
from klong_jax.sampling.json_schema import MAX_WHITESPACE, SchemaError, compile_schema
from klong_jax.serving import ChatEngine, ServerThread, create_app
from test_sampling import forward_check, tokenizer  # noqa: F401  (tokenizer: the module-scoped fixture)

CFG = preset("tiny", compute_dtype="float32", vocab_size=512, num_hidden_layers=2, max_position_embeddings=1024)

# A schema with every supported keyword: declared-order properties with an optional one, bounded strings, integer
# bounds, enums with characters that need escapes, a type list, anyOf, a free object and a recursive $ref.
SCHEMA = {
    "type": "object",
    "$defs": {"node": {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 99},
        "kids": {"type": "array", "maxItems": 2, "items": {"$ref": "#/$defs/node"}}}, "required": ["id"]}},
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 6},
        "kind": {"enum": ["a", "b\"c", "d\\e", 3, None]},
        "n": {"type": ["integer", "null"], "minimum": -5, "maximum": 120},
        "x": {"type": "number"},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "minItems": 1, "maxItems": 3, "items": {"anyOf": [{"type": "string", "maxLength": 3},
                                                                                    {"const": 7}]}},
        "meta": {"type": "object", "additionalProperties": {"type": "integer"}},
        "tree": {"$ref": "#/$defs/node"},
    },
    "required": ["name", "kind", "n", "tags"],
}


def reference_valid(value, schema, root):
    """A validator of the keywords the grammar supports, written from the JSON Schema spec."""
    if schema is True or schema == {}:
        return True
    if "$ref" in schema:
        ref = schema["$ref"]
        return reference_valid(value, root if ref == "#" else root[ref.split("/")[1]][ref.split("/")[2]], root)
    if "anyOf" in schema:
        return any(reference_valid(value, s, root) for s in schema["anyOf"])
    if "const" in schema or "enum" in schema:
        allowed = [schema["const"]] if "const" in schema else schema["enum"]
        return any(type(value) is type(a) and value == a for a in allowed)
    kinds = schema.get("type")
    kinds = kinds if isinstance(kinds, list) else [kinds or ("object" if "properties" in schema else "array")]
    return any(_typed_valid(value, schema, k, root) for k in kinds)


def _typed_valid(value, schema, kind, root):
    if kind == "object":
        if not isinstance(value, dict) or any(r not in value for r in schema.get("required", [])):
            return False
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        return all(reference_valid(v, props[k], root) if k in props else
                   (extra is not False and reference_valid(v, extra, root)) for k, v in value.items())
    if kind == "array":
        return (isinstance(value, list) and schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", 1e9)
                and all(reference_valid(v, schema.get("items", True), root) for v in value))
    if kind == "string":
        return isinstance(value, str) and schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", 1e9)
    if kind in ("integer", "number"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if kind == "integer" and not isinstance(value, int):
            return False
        return schema.get("minimum", -1e300) <= value <= schema.get("maximum", 1e300)
    if kind == "boolean":
        return isinstance(value, bool)
    return value is None


def random_document(rng: random.Random):
    """A document valid under SCHEMA, its properties in declared order."""
    def node(depth):
        d = {"id": rng.randint(0, 99)}
        if depth < 2 and rng.random() < 0.6:
            d["kids"] = [node(depth + 1) for _ in range(rng.randint(0, 2))]
        return d
    doc = {"name": "".join(rng.choice("xy z\"\\é\n") for _ in range(rng.randint(1, 6))),
           "kind": rng.choice(["a", "b\"c", "d\\e", 3, None]),
           "n": rng.choice([None, -5, 0, 7, 120, rng.randint(-5, 120)])}
    if rng.random() < 0.5:
        doc["x"] = rng.choice([0.0, -1.5, 2.5e-3, 12, 1e20])
    if rng.random() < 0.5:
        doc["ok"] = rng.random() < 0.5
    doc["tags"] = [rng.choice(["", "ab", "q\"", 7]) for _ in range(rng.randint(1, 3))]
    if rng.random() < 0.5:
        doc["meta"] = {k: rng.randint(-3, 3) for k in rng.sample(["u", "v", "w\"x"], rng.randint(0, 3))}
    if rng.random() < 0.7:
        doc["tree"] = node(0)
    return doc


def _mutations(text: str, rng: random.Random, n: int):
    alphabet = '{}[]:,"\\ 0123456789-.eEtrufalsn xyab'
    for _ in range(n):
        i = rng.randrange(len(text) + 1)
        op = rng.randrange(3)
        if op == 0:
            yield text[:i] + rng.choice(alphabet) + text[i:]
        elif op == 1 and i < len(text):
            yield text[:i] + text[i + 1:]
        elif i < len(text):
            yield text[:i] + rng.choice(alphabet) + text[i + 1:]


def test_valid_documents_are_accepted_with_every_prefix_live():
    g = compile_schema(SCHEMA)
    rng = random.Random(0)
    for k in range(150):
        doc = random_document(rng)
        assert reference_valid(doc, SCHEMA, SCHEMA), doc
        for text in (json.dumps(doc, ensure_ascii=False), json.dumps(doc, indent=2), json.dumps(doc)):
            state = g.start()
            for i, c in enumerate(text):
                state = g.step(state, c)
                assert state is not None, (text[:i + 1], text)
            assert g.is_complete(state), text


def test_every_accepted_text_is_valid_json_under_the_schema():
    """Soundness against the reference: of 30,000 mutated documents, whatever the grammar accepts parses and
    validates; and it accepts none of the invalid ones among them that keep declared order."""
    g = compile_schema(SCHEMA)
    rng = random.Random(1)
    accepted = rejected = 0
    for k in range(300):
        text = json.dumps(random_document(rng))
        for m in _mutations(text, rng, 100):
            if g.accepts(m):
                accepted += 1
                value = json.loads(m)
                assert reference_valid(value, SCHEMA, SCHEMA), m
            else:
                rejected += 1
    assert accepted > 1000 and rejected > 10000      # both sides exercised (e.g. digits and whitespace edits)


@pytest.mark.parametrize("text,ok", [
    ('{"name":"a","kind":"a","n":null,"tags":[7]}', True),
    ('{"name":"","kind":"a","n":null,"tags":[7]}', False),          # minLength
    ('{"name":"abcdefg","kind":"a","n":null,"tags":[7]}', False),   # maxLength 6
    ('{"name":"a","kind":"b","n":null,"tags":[7]}', False),         # not in enum
    ('{"name":"a","kind":3,"n":121,"tags":[7]}', False),            # maximum
    ('{"name":"a","kind":3,"n":-6,"tags":[7]}', False),             # minimum
    ('{"name":"a","kind":3,"n":-0,"tags":[7]}', True),
    ('{"name":"a","kind":3,"n":1.5,"tags":[7]}', False),            # integer
    ('{"name":"a","kind":3,"n":01,"tags":[7]}', False),             # leading zero
    ('{"name":"a","kind":3,"n":1,"tags":[]}', False),               # minItems
    ('{"name":"a","kind":3,"n":1,"tags":[7,7,7,7]}', False),        # maxItems
    ('{"kind":3,"name":"a","n":1,"tags":[7]}', False),              # declared order only
    ('{"name":"a","kind":3,"n":1,"tags":[7],"tree":{"id":1,"kids":[{"id":2,"kids":[]}]}}', True),
    ('{"name":"a","kind":3,"n":1,"tags":[7],"tree":{"kids":[]}}', False),    # required id in the $ref
    ('{"name":"a","kind":3,"n":1,"tags":[7],"meta":{"p":1,"q":-2}}', True),
    ('{"name":"a","kind":3,"n":1,"tags":[7],"meta":{"p":"1"}}', False),
    ('{"name":"a\\u00e9\\n","kind":"d\\\\e","n":1,"tags":["q\\""]}', True),
    ('{"name":"a\\x","kind":3,"n":1,"tags":[7]}', False),           # bad escape
    ('{"name":"a\n","kind":3,"n":1,"tags":[7]}', False),            # raw control character
    (' {"name":"a","kind":3,"n":1,"tags":[7]}', False),             # nothing before the value
    ('{"name":"a","kind":3,"n":1,"tags":[7]} ', False),             # nor after it
    ('{"name":"a","kind":3,"n":1,"x":-1.5e+3,"tags":[7]}', True),
    ('{"name":"a","kind":3,"n":1,"tags":[7],"x":1}', False),       # x comes before tags
    ('{"name":"a","kind":3,"n":1,"x":1e100,"tags":[7]}', False),   # exponent digits: a finite double
])
def test_grammar_cases(text, ok):
    assert compile_schema(SCHEMA).accepts(text) is ok
    if ok:
        assert reference_valid(json.loads(text), SCHEMA, SCHEMA)


def test_whitespace_runs_are_bounded():
    g = compile_schema({"type": "array"})
    assert g.accepts("[" + " " * MAX_WHITESPACE + "1]")
    assert not g.accepts("[" + " " * (MAX_WHITESPACE + 1) + "1]")


@pytest.mark.parametrize("schema,needle", [
    ({"type": "string", "pattern": "a+"}, "pattern"),
    ({"oneOf": [{"type": "string"}]}, "oneOf"),
    ({"type": "number", "minimum": 0}, "integers only"),
    ({"type": "thing"}, "thing"),
    ({"type": "object", "properties": {"a": True}, "required": ["b"]}, "['b'] are not in properties"),
    ({"$ref": "#/$defs/missing"}, "no 'missing'"),
    ({"type": "array", "minItems": 3, "maxItems": 2}, "maxItems=2 < minItems=3"),
    ({"type": "object", "properties": {"a": {"type": "string", "maxLength": -1}}}, "schema.properties.a.maxLength"),
])
def test_unsupported_schemas_are_named(schema, needle):
    with pytest.raises(SchemaError, match=None) as e:
        compile_schema(schema)
    assert needle in str(e.value)


# ------------------------------------------------------------------------------------------------
# Token masks

@pytest.fixture(scope="module")
def vocab(tokenizer):
    return TokenVocab.from_tokenizer(tokenizer, CFG.vocab_size)


def test_vocab_texts_concatenate_to_the_decoded_text(tokenizer, vocab):
    text = '{"name": "ab c", "n": 12, "ok": true, "tags": ["a", "b\\"c"]}\nand more words here'
    ids = tokenizer.encode(text)
    assert "".join(vocab.strings[t] for t in ids) == tokenizer.decode(ids) == text
    assert all(vocab.strings[t] is None for t in tokenizer.special_token_ids)


def test_masks_equal_brute_force_over_the_vocabulary(tokenizer, vocab):
    """At every state along documents (and their invalid continuations), the trie walk and the string fast path
    allow exactly the tokens whose whole text the grammar reads; the stop token exactly when the value is whole."""
    stop = 2
    g = compile_schema(SCHEMA)
    constraint = JsonConstraint(g, vocab, [stop])
    rng = random.Random(2)
    checked = 0
    for k in range(6):
        text = json.dumps(random_document(rng), indent=1 if k % 2 else None)
        state = g.start()
        for i in range(0, len(text) + 1):
            if i % 3 == 0 or i == len(text):
                brute = np.array([s is not None and g.feed(state, s) is not None for s in vocab.strings])
                brute[stop] = g.is_complete(state)
                np.testing.assert_array_equal(constraint.allowed(state), brute, err_msg=repr(text[:i]))
                checked += 1
            if i < len(text):
                state = g.step(state, text[i])
    assert checked > 100 and constraint.stats["computed"] > 50


def test_advance_rejects_what_the_mask_forbids(vocab):
    constraint = JsonConstraint(compile_schema({"type": "boolean"}), vocab, [2])
    state = constraint.start()
    t_id = vocab.strings.index("t") if "t" in vocab.strings else next(
        i for i, s in enumerate(vocab.strings) if s and s[0] == "t" and "true".startswith(s))
    x_id = next(i for i, s in enumerate(vocab.strings) if s and s[0] == "x")
    assert constraint.allowed(state)[t_id] and not constraint.allowed(state)[x_id]
    with pytest.raises(ValueError, match="not allowed"):
        constraint.advance(state, x_id)
    with pytest.raises(ValueError, match="before the JSON value is complete"):
        constraint.advance(state, 2)
    assert constraint.advance(state, t_id) is not None


# ------------------------------------------------------------------------------------------------
# The Sampler

SMALL = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 4},
    "n": {"type": "integer", "minimum": 0, "maximum": 99},
    "ok": {"type": "boolean"},
    "tags": {"type": "array", "maxItems": 2, "items": {"enum": ["a", "b\"c"]}}},
    "required": ["name", "n", "ok"]}


@pytest.fixture(scope="module")
def model():
    return init_model(CFG, seed=3)


@pytest.fixture(scope="module")
def sampler(model, tokenizer):
    return Sampler(model, tokenizer, default_stop_token_ids=(2,), decode_chunk=8, min_batch=4)


def _check_rows(constraint, completions, *, finished_at_least: int):
    """Every row's tokens were allowed one after another; a row that stopped is a whole valid value."""
    g, done = constraint.grammar, 0
    for c in completions:
        state = constraint.start()
        for t in c.tokens:
            assert constraint.allowed(state)[t]
            state = constraint.advance(state, t)
        if c.finish_reason == "stop":
            done += 1
            assert g.is_complete(state)
            assert reference_valid(json.loads(c.text), SMALL, SMALL), c.text
    assert done >= finished_at_least


def test_sampler_generates_only_what_the_schema_allows(sampler, vocab, model):
    constraint = JsonConstraint(compile_schema(SMALL), vocab, [2])
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [13], [14, 15]]
    greedy = SamplingParams(max_new_tokens=160, temperature=0.0, constraint=constraint)
    sampled = [SamplingParams(max_new_tokens=160, temperature=1.0, seed=s, constraint=constraint)
               for s in range(4)]
    out = sampler.generate(prompts, greedy) + sampler.generate(prompts, sampled)
    _check_rows(constraint, out, finished_at_least=4)
    # Log-probs are the unconstrained model's (what RL's ratios need), not the masked distribution's.
    forward_check(model, prompts + prompts, out, routing=False)
    assert all(c.sampling_logprobs[-1] <= 0 for c in out[4:])


def test_constrained_and_free_rows_share_a_batch(sampler, vocab):
    constraint = JsonConstraint(compile_schema(SMALL), vocab, [2])
    free = SamplingParams(max_new_tokens=24, temperature=0.0)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    alone = sampler.generate(prompts, free)
    mixed = sampler.generate(prompts, [free, SamplingParams(max_new_tokens=160, temperature=0.0,
                                                             constraint=constraint)])
    assert mixed[0].tokens == alone[0].tokens
    _check_rows(constraint, mixed[1:], finished_at_least=0)


def test_sessions_decode_under_the_constraint(sampler, vocab):
    constraint = JsonConstraint(compile_schema(SMALL), vocab, [2])
    sp = SamplingParams(max_new_tokens=160, temperature=1.0, seed=3, constraint=constraint)
    first = sampler.generate([[5, 6, 7]], sp, session_ids=["s"])
    again = sampler.generate([[5, 6, 7] + first[0].tokens + [9, 9]], sp, session_ids=["s"])
    plain = sampler.generate([[5, 6, 7] + first[0].tokens + [9, 9]], sp)
    sampler.end_session("s")
    assert again[0].tokens == plain[0].tokens
    _check_rows(constraint, first + again, finished_at_least=0)


def test_a_constrained_request_needs_a_stop_token(model, tokenizer, vocab):
    s = Sampler(model, tokenizer, default_stop_token_ids=())
    with pytest.raises(ValueError, match="needs a stop token"):
        s.generate([[5]], SamplingParams(constraint=JsonConstraint(compile_schema(SMALL), vocab, [2])))
    with pytest.raises(ValueError, match="constraint"):
        SamplingParams(constraint="json")


# ------------------------------------------------------------------------------------------------
# The server's response_format

@pytest.fixture(scope="module")
def server(model, tokenizer):
    engine = ChatEngine(Sampler(model, tokenizer, min_batch=4), model_name="tiny", chat_template="glm45")
    with ServerThread(create_app(engine)) as srv:
        srv.engine = engine
        srv.client = openai.OpenAI(base_url=srv.url, api_key="unused", max_retries=0, timeout=300)
        yield srv
    engine.close()


def test_response_format_json_schema_and_json_object(server):
    messages = [{"role": "user", "content": "Describe the item as JSON."}]
    done = 0
    for seed in range(3):
        r = server.client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=160, temperature=1.0, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "item", "schema": SMALL}})
        choice = r.choices[0]
        assert compile_schema(SMALL).feed(compile_schema(SMALL).start(), choice.message.content) is not None
        if choice.finish_reason == "stop":
            done += 1
            assert reference_valid(json.loads(choice.message.content), SMALL, SMALL)
    assert done >= 1
    r = server.client.chat.completions.create(model="tiny", messages=messages, max_tokens=48, temperature=0.0,
                                              response_format={"type": "json_object"})
    text = r.choices[0].message.content
    assert text.startswith("{") and compile_schema({"type": "object"}).feed(
        compile_schema({"type": "object"}).start(), text) is not None
    assert len(server.engine._constraints) == 2          # one per schema, reused across requests


def test_bad_response_formats_get_400_naming_the_field(server):
    messages = [{"role": "user", "content": "hi"}]
    for fmt, needle in (({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string",
                                                                                         "pattern": "a"}}},
                         "pattern"),
                        ({"type": "xml"}, "response_format"),
                        ({"type": "json_schema", "json_schema": {"name": "x"}}, "json_schema.schema")):
        with pytest.raises(openai.BadRequestError) as e:
            server.client.chat.completions.create(model="tiny", messages=messages, max_tokens=4,
                                                  response_format=fmt)
        assert needle in str(e.value)


# ------------------------------------------------------------------------------------------------
# The rubric drafter's schemas

@pytest.mark.parametrize("key,leaves", [("sections", False), ("subtasks", False), ("criteria", True)])
def test_drafter_step_schemas_accept_what_the_drafter_loads(key, leaves):
    schema = step_schema(key, 3, leaves)
    g = compile_schema(schema)
    item = {"requirements": "The loss is implemented as in Eq. 3"}
    if leaves:
        item |= {"task_category": DRAFT_CATEGORIES[1], "finegrained_task_category": FINEGRAINED_CATEGORIES[0]}
    item["weight"] = 2
    assert g.accepts(json.dumps({key: [item, item]}, indent=2))
    assert not g.accepts(json.dumps({key: [item] * 4}))                       # at most the step's limit
    assert not g.accepts(json.dumps({key: [item | {"weight": 0}]}))         # weights >= 1
    if leaves:
        assert not g.accepts(json.dumps({key: [item | {"task_category": "Other"}]}))
