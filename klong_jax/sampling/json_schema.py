"""The JSON texts a JSON schema allows, read one character at a time: the grammar behind constrained decoding.

    grammar = compile_schema({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]})
    state = grammar.start()
    for ch in '{"n": 12}':
        state = grammar.step(state, ch)      # None: no text the schema allows starts this way
    grammar.is_complete(state)               # True: the text read so far is a whole allowed value

Soundness is the contract: every text that reaches a complete state parses with `json.loads` and is valid under
the schema. The grammar does not reach every valid text; what it leaves out, on purpose:
  - object properties come in the schema's `properties` order, each at most once; a property that is not
    `required` may be left out; properties the schema does not declare are never produced (an object schema
    without `properties` takes any keys, each value under `additionalProperties`, or any value);
  - whitespace between tokens: at most MAX_WHITESPACE characters in a row (a model cannot stall on it), and none
    before or after the top-level value (a whole value ends the text);
  - numbers: at most MAX_INT_DIGITS integer and MAX_FRAC_DIGITS fraction digits, MAX_EXP_DIGITS exponent digits.
Supported keywords: type (a name or a list), properties, required, additionalProperties, items, minItems, maxItems,
enum, const, anyOf, $ref (to "#", "#/$defs/NAME" or "#/definitions/NAME"; recursive schemas too), $defs /
definitions, minLength / maxLength (characters, an escape counting as one), minimum / maximum (integers only).
Annotations (title, description, default, examples, format, $schema, $id, $comment, strict, ...) are ignored; any
other keyword (pattern, oneOf, allOf, not, ...) is a SchemaError naming its place in the schema, never a
silently looser grammar.

A state is a frozenset of configurations (the grammar is a nondeterministic pushdown automaton: `anyOf`, and a
number or literal that may end or go on). A configuration is (frames, whitespace run): a tuple of frames, the
innermost last, each a small tuple (kinds below), so states hash and compare by value and serve as cache keys.
  ("v", node)                       a value of `node` is expected (whitespace may come first)
  ("s", node, n, esc, text)         inside a string: n characters so far (capped at minLength when there is no
                                    maxLength, so states repeat), esc 0 / -1 after a backslash / k hex digits
                                    still due; text: the raw characters so far for enum strings (None otherwise)
  ("n", node, phase, text)          inside a number (phase: sign zero int dot frac e esign exp)
  ("l", node, candidates, pos)      inside a literal (true, false, null, a non-string enum value)
  ("o", node, i, phase, j)          inside an object with declared properties: properties before i are done;
                                    phase first / key / K (a key is being read) / colon / V / next; j: the
                                    property whose key was read
  ("f", node, phase)                inside an object with free keys
  ("a", node, count, phase)         inside an array: count items done; phase first / item / V / next
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

MAX_WHITESPACE = 24
MAX_INT_DIGITS = 15
MAX_FRAC_DIGITS = 15
MAX_EXP_DIGITS = 2          # with MAX_INT_DIGITS: every number a finite double (< 1e115)

WHITESPACE = frozenset(" \t\n\r")
_DIGITS = frozenset("0123456789")
_HEX = frozenset("0123456789abcdefABCDEF")
_ESCAPES = frozenset('"\\/bfnrt')
_ANNOTATIONS = frozenset({"title", "description", "default", "examples", "format", "$schema", "$id", "$comment",
                          "strict", "name", "readOnly", "writeOnly", "deprecated", "contentMediaType",
                          "contentEncoding"})
_SUPPORTED = frozenset({"type", "properties", "required", "additionalProperties", "items", "minItems", "maxItems",
                        "enum", "const", "anyOf", "$ref", "$defs", "definitions", "minLength", "maxLength",
                        "minimum", "maximum"})
_TYPES = ("object", "array", "string", "integer", "number", "boolean", "null")


class SchemaError(ValueError):
    """A schema the grammar cannot follow; the message names the place ("schema.properties.x.items") and why."""


# ------------------------------------------------------------------------------------------------
# Compiled schema nodes (compared by identity: one object per place in the schema)

@dataclass(eq=False)
class Node:
    where: str


@dataclass(eq=False)
class AnyValue(Node):
    """Any JSON value."""


@dataclass(eq=False)
class ObjectNode(Node):
    """props: (name, JSON-encoded name without quotes, value node, required) in order; free: the value node of
    any key when no property is declared (None: declared properties only)."""
    props: tuple = ()
    free: Node | None = None
    key_nodes: tuple = ()       # key_nodes[i]: an enum StringNode of the names that may come next from i
    closable: tuple = ()        # closable[i]: no required property at index >= i


@dataclass(eq=False)
class ArrayNode(Node):
    item: Node | None = None
    min_items: int = 0
    max_items: int | None = None


@dataclass(eq=False)
class StringNode(Node):
    enum: tuple | None = None           # JSON-encoded contents (no quotes) of the allowed strings
    min_len: int = 0
    max_len: int | None = None
    prefixes: frozenset = frozenset()   # every prefix of an encoded enum string


@dataclass(eq=False)
class NumberNode(Node):
    integer: bool = False
    minimum: int | None = None
    maximum: int | None = None


@dataclass(eq=False)
class LiteralNode(Node):
    texts: tuple = ()                   # the allowed texts (true, false, null, compact JSON of enum values)


@dataclass(eq=False)
class UnionNode(Node):
    options: tuple = ()


@dataclass(eq=False)
class RefNode(Node):
    target: Node | None = None


def _free_string(where: str) -> StringNode:
    return StringNode(where)


ANY = AnyValue("any")
_ANY_OPTIONS = (ObjectNode("any.object", free=ANY), ArrayNode("any.array", item=ANY), _free_string("any.string"),
                NumberNode("any.number"), LiteralNode("any.literal", texts=("true", "false", "null")))
_FREE_KEY = _free_string("key")


# ------------------------------------------------------------------------------------------------
# Compiling a schema

def _encoded(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)[1:-1]


def _enum_string(where: str, values) -> StringNode:
    enc = tuple(dict.fromkeys(_encoded(v) for v in values))
    return StringNode(where, enum=enc, prefixes=frozenset(e[:k] for e in enc for k in range(len(e) + 1)))


class _Compiler:
    def __init__(self, root: Mapping):
        self.root = root
        self.refs: dict[str, RefNode] = {}

    def ref(self, ref: str, where: str) -> Node:
        if ref in self.refs:
            return self.refs[ref]
        if ref == "#":
            target_schema, target_where = self.root, "schema"
        else:
            parts = ref.split("/")
            if len(parts) != 3 or parts[0] != "#" or parts[1] not in ("$defs", "definitions"):
                raise SchemaError(f"{where}.$ref={ref!r}: only '#', '#/$defs/NAME' and '#/definitions/NAME' "
                                  "are supported")
            defs = self.root.get(parts[1])
            if not isinstance(defs, Mapping) or parts[2] not in defs:
                raise SchemaError(f"{where}.$ref={ref!r}: schema.{parts[1]} has no {parts[2]!r}")
            target_schema, target_where = defs[parts[2]], f"schema.{parts[1]}.{parts[2]}"
        node = RefNode(where)
        self.refs[ref] = node            # before compiling the target: a recursive schema refers to itself
        node.target = self.compile(target_schema, target_where)
        return node

    def compile(self, schema, where: str) -> Node:
        if schema is True or (isinstance(schema, Mapping) and not (set(schema) - _ANNOTATIONS - {"$defs",
                                                                                                  "definitions"})):
            return ANY
        if not isinstance(schema, Mapping):
            raise SchemaError(f"{where}: a schema must be an object (or true), got {schema!r}")
        unknown = sorted(set(schema) - _SUPPORTED - _ANNOTATIONS)
        if unknown:
            raise SchemaError(f"{where}: keyword(s) {unknown} are not supported by constrained decoding "
                              f"(supported: {sorted(_SUPPORTED)})")
        if "$ref" in schema:
            if set(schema) - _ANNOTATIONS - {"$ref", "$defs", "definitions"}:
                raise SchemaError(f"{where}: $ref next to other keywords is not supported")
            return self.ref(schema["$ref"], where)
        if "anyOf" in schema:
            options = schema["anyOf"]
            if not isinstance(options, list) or not options:
                raise SchemaError(f"{where}.anyOf: a non-empty list of schemas is required")
            if set(schema) - _ANNOTATIONS - {"anyOf", "$defs", "definitions"}:
                raise SchemaError(f"{where}: anyOf next to other keywords is not supported (move them into "
                                  "each option)")
            return UnionNode(where, tuple(self.compile(o, f"{where}.anyOf[{k}]") for k, o in enumerate(options)))
        if "const" in schema or "enum" in schema:
            values = [schema["const"]] if "const" in schema else schema["enum"]
            if not isinstance(values, list) or not values:
                raise SchemaError(f"{where}.enum: a non-empty list is required")
            strings = [v for v in values if isinstance(v, str)]
            others = tuple(dict.fromkeys(json.dumps(v, separators=(",", ":"), ensure_ascii=False)
                                         for v in values if not isinstance(v, str)))
            nodes = ([_enum_string(where, strings)] if strings else []) + \
                    ([LiteralNode(where, texts=others)] if others else [])
            return nodes[0] if len(nodes) == 1 else UnionNode(where, tuple(nodes))
        kind = schema.get("type")
        if isinstance(kind, list):
            if not kind or any(k not in _TYPES for k in kind):
                raise SchemaError(f"{where}.type={kind!r}: each must be one of {list(_TYPES)}")
            return UnionNode(where, tuple(self.typed(schema, k, where) for k in dict.fromkeys(kind)))
        if kind is None:
            kind = ("object" if "properties" in schema or "additionalProperties" in schema else
                    "array" if "items" in schema else None)
            if kind is None:
                raise SchemaError(f"{where}: no type, and nothing to tell it from (give 'type')")
        if kind not in _TYPES:
            raise SchemaError(f"{where}.type={kind!r}: must be one of {list(_TYPES)}")
        return self.typed(schema, kind, where)

    def typed(self, schema: Mapping, kind: str, where: str) -> Node:
        def count(key, default=None):
            value = schema.get(key, default)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise SchemaError(f"{where}.{key}={value!r}: a non-negative integer is required")
            return value

        if kind == "object":
            props = schema.get("properties") or {}
            required = schema.get("required") or []
            if not isinstance(props, Mapping) or not isinstance(required, list):
                raise SchemaError(f"{where}: properties must be an object and required a list")
            missing = [r for r in required if r not in props]
            if missing:
                raise SchemaError(f"{where}.required: {missing} are not in properties")
            node = ObjectNode(where)
            node.props = tuple((name, _encoded(name), self.compile(sub, f"{where}.properties.{name}"),
                                name in required) for name, sub in props.items())
            if not props:
                extra = schema.get("additionalProperties", True)
                node.free = None if extra is False else self.compile(extra, f"{where}.additionalProperties")
            n = len(node.props)
            node.closable = tuple(not any(p[3] for p in node.props[i:]) for i in range(n + 1))
            keys = []
            for i in range(n + 1):
                names = []
                for p in node.props[i:]:
                    names.append(p[0])
                    if p[3]:
                        break
                keys.append(_enum_string(f"{where}.keys", names) if names else None)
            node.key_nodes = tuple(keys)
            return node
        if kind == "array":
            items = schema.get("items", True)
            lo, hi = count("minItems", 0), count("maxItems")
            if hi is not None and hi < lo:
                raise SchemaError(f"{where}: maxItems={hi} < minItems={lo}")
            return ArrayNode(where, item=self.compile(items, f"{where}.items"), min_items=lo, max_items=hi)
        if kind == "string":
            lo, hi = count("minLength", 0), count("maxLength")
            if hi is not None and hi < lo:
                raise SchemaError(f"{where}: maxLength={hi} < minLength={lo}")
            return StringNode(where, min_len=lo, max_len=hi)
        if kind in ("integer", "number"):
            lo, hi = schema.get("minimum"), schema.get("maximum")
            for key, value in (("minimum", lo), ("maximum", hi)):
                if value is None:
                    continue
                if kind == "number":
                    raise SchemaError(f"{where}.{key}: bounds are supported for integers only")
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
                    raise SchemaError(f"{where}.{key}={value!r}: an integer is required")
            lo = None if lo is None else int(lo)
            hi = None if hi is None else int(hi)
            if lo is not None and hi is not None and hi < lo:
                raise SchemaError(f"{where}: maximum={hi} < minimum={lo}")
            return NumberNode(where, integer=kind == "integer", minimum=lo, maximum=hi)
        if kind == "boolean":
            return LiteralNode(where, texts=("true", "false"))
        return LiteralNode(where, texts=("null",))


# ------------------------------------------------------------------------------------------------
# Stepping

def _int_feasible(node: NumberNode, text: str, final: bool) -> bool:
    """Whether an integer that starts with `text` (digits after an optional '-') can end in [minimum, maximum];
    final: the text is the whole integer."""
    lo, hi = node.minimum, node.maximum
    if lo is None and hi is None:
        return True
    negative = text.startswith("-")
    digits = text[1:] if negative else text
    p = int(digits)
    more = 0 if final or p == 0 else MAX_INT_DIGITS - len(digits)
    for k in range(more + 1):
        a, b = (p, p) if k == 0 else (p * 10 ** k, (p + 1) * 10 ** k - 1)
        if negative:
            a, b = -b, -a
        if (lo is None or b >= lo) and (hi is None or a <= hi):
            return True
    return False


def _done(rest: tuple, result=None):
    """The configurations after the value on top of `rest` finished (result: a key's encoded text)."""
    if not rest:
        return [((), 0)]
    parent = rest[-1]
    kind, below = parent[0], rest[:-1]
    if kind == "o":
        _, node, i, phase, _ = parent
        if phase == "K":
            j = next(k for k in range(i, len(node.props)) if node.props[k][1] == result)
            return [(below + (("o", node, j + 1, "colon", j),), 0)]
        return [(below + (("o", node, i, "next", -1),), 0)]                 # phase V
    if kind == "f":
        return [(below + (("f", parent[1], "colon" if parent[2] == "K" else "next"),), 0)]
    _, node, n, _ = parent                                                  # "a", phase V
    return [(below + (("a", node, n + 1, "next"),), 0)]


def _number(rest: tuple, node: NumberNode, phase: str, text: str):
    """Configurations of a number that has read `text` and is in `phase`: going on, and (when the text is a
    whole number the node allows) finished."""
    out = [(rest + (("n", node, phase, text),), 0)]
    if phase in ("zero", "int", "frac", "exp"):
        if not node.integer or _int_feasible(node, text, True):
            out += _done(rest)
    return out


def _begin(rest: tuple, node: Node, c: str):
    """Configurations after `c`, the first character of a value of `node`, with `rest` below it."""
    if isinstance(node, RefNode):
        return _begin(rest, node.target, c)
    if isinstance(node, (UnionNode, AnyValue)):
        options = node.options if isinstance(node, UnionNode) else _ANY_OPTIONS
        return [cfg for option in options for cfg in _begin(rest, option, c)]
    if isinstance(node, ObjectNode):
        if c != "{":
            return []
        if node.free is not None:
            return [(rest + (("f", node, "first"),), 0)]
        return [(rest + (("o", node, 0, "first", -1),), 0)]
    if isinstance(node, ArrayNode):
        return [(rest + (("a", node, 0, "first"),), 0)] if c == "[" else []
    if isinstance(node, StringNode):
        if c != '"':
            return []
        return [(rest + (("s", node, 0, 0, "" if node.enum is not None else None),), 0)]
    if isinstance(node, NumberNode):
        if c == "-":
            if node.minimum is not None and node.minimum >= 0:
                return []
            return [(rest + (("n", node, "sign", "-"),), 0)]
        if c not in _DIGITS or (node.integer and not _int_feasible(node, c, c == "0")):
            return []
        return _number(rest, node, "zero" if c == "0" else "int", c)
    if isinstance(node, LiteralNode):
        cands = tuple(t for t in node.texts if t[0] == c)
        if not cands:
            return []
        out = []
        longer = tuple(t for t in cands if len(t) > 1)
        if longer:
            out.append((rest + (("l", node, longer, 1),), 0))
        if c in cands:
            out += _done(rest)
        return out
    raise TypeError(f"unknown schema node {node!r}")


def _step_number(rest: tuple, frame: tuple, c: str):
    _, node, phase, text = frame
    t = text + c
    digits = len(text.lstrip("-").split(".")[0].split("e")[0].split("E")[0])
    if c in _DIGITS:
        if phase == "sign":
            if node.integer and not _int_feasible(node, t, c == "0"):
                return []
            return _number(rest, node, "zero" if c == "0" else "int", t)
        if phase == "int":
            if digits >= MAX_INT_DIGITS or (node.integer and not _int_feasible(node, t, False)):
                return []
            return _number(rest, node, "int", t)
        if phase in ("dot", "frac"):
            frac = len(t.split(".")[1])
            return _number(rest, node, "frac", t) if frac <= MAX_FRAC_DIGITS else []
        if phase in ("e", "esign", "exp"):
            exp = len(t.split("e" if "e" in t else "E")[1].lstrip("+-"))
            return _number(rest, node, "exp", t) if exp <= MAX_EXP_DIGITS else []
        return []
    if node.integer:
        return []
    if c == "." and phase in ("zero", "int"):
        return [(rest + (("n", node, "dot", t),), 0)]
    if c in "eE" and phase in ("zero", "int", "frac"):
        return [(rest + (("n", node, "e", t),), 0)]
    if c in "+-" and phase == "e":
        return [(rest + (("n", node, "esign", t),), 0)]
    return []


def _step_string(rest: tuple, frame: tuple, c: str):
    _, node, n, esc, text = frame
    if node.enum is not None:                      # match the encoded text; escapes are ordinary characters
        if c == '"' and text in node.enum:      # an encoded string never ends in an escaping backslash
            return _done(rest, text)
        t = text + c
        return [(rest + (("s", node, 0, 0, t),), 0)] if t in node.prefixes else []
    cap = node.max_len
    if esc == -1:
        if c in _ESCAPES:
            esc, n = 0, n + 1
        elif c == "u":
            esc = 4
        else:
            return []
    elif esc > 0:
        if c not in _HEX:
            return []
        esc -= 1
        n += esc == 0
    elif c == '"':
        return _done(rest) if n >= node.min_len else []
    elif c == "\\":
        if cap is not None and n >= cap:
            return []
        esc = -1
    elif ord(c) < 0x20:
        return []
    else:
        if cap is not None and n >= cap:
            return []
        n += 1
    if cap is None:
        n = min(n, node.min_len)                   # beyond minLength the count changes nothing
    return [(rest + (("s", node, n, esc, None),), 0)]


def _key_start(rest: tuple, frame_then: tuple, key_node: StringNode | None, c: str):
    if c != '"' or key_node is None:
        return []
    return [(rest + (frame_then, ("s", key_node, 0, 0, "" if key_node.enum is not None else None)), 0)]


def _step_config(frames: tuple, ws: int, c: str):
    """The configurations after character c from one configuration (an empty list: c is not allowed)."""
    is_ws = c in WHITESPACE
    if not frames:                                     # the value is whole: nothing may follow it
        return []
    top, rest = frames[-1], frames[:-1]
    kind = top[0]
    if kind == "s":
        return _step_string(rest, top, c)
    if kind == "n":
        return _step_number(rest, top, c)
    if kind == "l":
        _, node, cands, pos = top
        matched = tuple(t for t in cands if t[pos] == c)
        out = []
        longer = tuple(t for t in matched if len(t) > pos + 1)
        if longer:
            out.append((rest + (("l", node, longer, pos + 1),), 0))
        if any(len(t) == pos + 1 for t in matched):
            out += _done(rest)
        return out
    if is_ws:                                          # between tokens of a value, an object or an array
        return [(frames, ws + 1)] if ws < MAX_WHITESPACE else []
    if kind == "v":
        return _begin(rest, top[1], c)
    if kind == "o":
        _, node, i, phase, j = top
        if phase in ("first", "key"):
            if c == "}" and phase == "first" and node.closable[i]:
                return _done(rest)
            return _key_start(rest, ("o", node, i, "K", -1), node.key_nodes[i], c)
        if phase == "colon":
            return [(rest + (("o", node, i, "V", -1), ("v", node.props[j][2])), 0)] if c == ":" else []
        if phase == "next":
            if c == "}" and node.closable[i]:
                return _done(rest)
            if c == "," and node.key_nodes[i] is not None:
                return [(rest + (("o", node, i, "key", -1),), 0)]
        return []
    if kind == "f":
        _, node, phase = top
        if phase in ("first", "key"):
            if c == "}" and phase == "first":
                return _done(rest)
            return _key_start(rest, ("f", node, "K"), _FREE_KEY, c)
        if phase == "colon":
            return [(rest + (("f", node, "V"), ("v", node.free)), 0)] if c == ":" else []
        if phase == "next":
            if c == "}":
                return _done(rest)
            if c == ",":
                return [(rest + (("f", node, "key"),), 0)]
        return []
    # kind == "a"
    _, node, n, phase = top
    room = node.max_items is None or n < node.max_items
    if phase == "first" and c == "]":
        return _done(rest) if node.min_items == 0 else []
    if phase in ("first", "item"):
        return _begin(rest + (("a", node, n, "V"),), node.item, c) if room else []
    if phase == "next":
        if c == "]":
            return _done(rest) if n >= node.min_items else []
        if c == "," and room:
            return [(rest + (("a", node, n, "item"),), 0)]
    return []


@dataclass(eq=False)
class JsonGrammar:
    """The compiled schema (module docstring). Thread-safe: states are values."""
    root: Node
    schema: object = None
    _start: frozenset = field(init=False)

    def __post_init__(self):
        # The whitespace run starts full: no whitespace before the top-level value.
        self._start = frozenset({((("v", self.root),), MAX_WHITESPACE)})

    def start(self) -> frozenset:
        return self._start

    def step(self, state: frozenset, c: str) -> frozenset | None:
        """The state after character c, or None when no allowed text goes on this way."""
        out = frozenset(cfg for frames, ws in state for cfg in _step_config(frames, ws, c))
        return out or None

    def feed(self, state: frozenset, text: str) -> frozenset | None:
        for c in text:
            state = self.step(state, c)
            if state is None:
                return None
        return state

    def is_complete(self, state: frozenset) -> bool:
        """Whether the text read is a whole allowed value."""
        return any(not frames for frames, _ in state)

    def accepts(self, text: str) -> bool:
        state = self.feed(self.start(), text)
        return state is not None and self.is_complete(state)

    @staticmethod
    def free_string_top(state: frozenset):
        """(node, n, rest frames, whitespace) when the state is one configuration inside a non-enum string with
        no escape pending (the fast path of token masks), else None."""
        if len(state) != 1:
            return None
        ((frames, ws),) = state
        if not frames:
            return None
        top = frames[-1]
        if top[0] != "s" or top[3] != 0 or top[1].enum is not None:
            return None
        return top[1], top[2], frames[:-1], ws


def compile_schema(schema) -> JsonGrammar:
    """The grammar of a JSON schema (a dict; `True` or `{}`: any JSON value). SchemaError when unsupported."""
    return JsonGrammar(_Compiler(schema if isinstance(schema, Mapping) else {}).compile(schema, "schema"), schema)


def json_object_grammar() -> JsonGrammar:
    """Any JSON object (OpenAI's response_format {"type": "json_object"})."""
    return compile_schema({"type": "object"})


__all__ = ["SchemaError", "JsonGrammar", "compile_schema", "json_object_grammar", "MAX_WHITESPACE", "WHITESPACE"]
