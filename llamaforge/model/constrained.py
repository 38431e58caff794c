"""Constrained decoding: output that always parses as JSON and, given a JSON schema, matches it.

A pushdown automaton reads the output byte by byte (JSON's structure is ASCII; a string may hold
any UTF-8). Its state is a stack of frames, immutable, so that trying a token is cheap: feed the
token's bytes to a copy and see whether any state survives. `anyOf`, `oneOf` and type lists make it
nondeterministic, so it keeps a set of states. A token is allowed when some state survives its
bytes; end of sequence only when some state holds a complete value.

The schema subset: type (object, array, string, number, integer, boolean, null, or a list of
them), properties, required, additionalProperties (false when properties are listed and it is not
given, as in OpenAI's structured outputs), items, minItems, maxItems, enum, const,
maxLength, anyOf / oneOf, and local $ref (#/$defs/..., #/definitions/...). Other keywords are
not enforced.
"""
from __future__ import annotations

import codecs
import json

from ..errors import LlamaforgeError

WHITESPACE = b" \t\n\r"
MAX_INDENT = 20                  # whitespace between tokens: "", " ", or "\n" and up to 20 of " \t"
NUMBER_BYTES = b"0123456789+-.eE"
ANY = 0                          # the schema id of "any JSON value"


class Schemas:
    """JSON schemas interned as small integers (states must be hashable), $refs resolved."""

    def __init__(self, root: dict | bool):
        self.nodes: list[dict] = [{}]
        self.ids: dict[int, int] = {}
        if not isinstance(root, (dict, bool)):
            raise LlamaforgeError(f"json_schema: a schema must be an object, not {root!r}")
        self.root = root if isinstance(root, dict) else {}
        self.top = self.intern(self.root)

    def intern(self, schema) -> int:
        if schema is True or schema is None or schema == {}:
            return ANY
        if not isinstance(schema, dict):
            raise LlamaforgeError(f"json_schema: a schema must be an object, not {schema!r}")
        while "$ref" in schema:
            schema = self.resolve(schema["$ref"])
        if id(schema) not in self.ids:
            self.ids[id(schema)] = len(self.nodes)
            self.nodes.append(schema)
        return self.ids[id(schema)]

    def resolve(self, ref: str) -> dict:
        node = self.root
        if not ref.startswith("#/"):
            raise LlamaforgeError(f"json_schema: only local $ref (#/...) is supported, not {ref!r}")
        for part in ref[2:].split("/"):
            node = node.get(part) if isinstance(node, dict) else None
            if node is None:
                raise LlamaforgeError(f"json_schema: $ref {ref!r} points nowhere")
        return node

    def __getitem__(self, sid: int) -> dict:
        return self.nodes[sid]


def _alternatives(schemas: Schemas, sid: int) -> list[tuple[int, str | None]]:
    """(schema id, the one type it allows or None for any) for each way a value may look."""
    s = schemas[sid]
    for key in ("anyOf", "oneOf"):
        if key in s:
            return [a for sub in s[key] for a in _alternatives(schemas, schemas.intern(sub))]
    types = s.get("type")
    if isinstance(types, list):
        return [(sid, t) for t in types]
    return [(sid, types)]


class JSONConstraint:
    """The set of parser states after the bytes fed so far.

    A frame is a tuple whose first item names it:
      ("value", sid, type)                a value of schema sid is expected (type: one alternative)
      ("string", sid, bytes, escape, role) inside a string; role "key" (of an object) or "value"
      ("number", sid, bytes, integer)
      ("literal", rest)                   the rest of true / false / null
      ("enumtext", sid, bytes)            an enum / const value, as JSON text typed so far
      ("object", sid, phase, keys, key)   phase: "first" | "key" | "colon" | "value" | "next"
      ("array", sid, phase, count)        phase: "first" | "value" | "next"
      ("done",)
    A state is (stack of frames, whitespace run).
    """

    def __init__(self, schema: dict | bool | None = None):
        self.schemas = Schemas(schema if schema is not None else {})
        self.states = frozenset(self._expect(((),), self.schemas.top, 0))

    # --- the public face --------------------------------------------------------------------------
    def accepts(self, data: bytes) -> bool:
        return bool(self._feed(self.states, data))

    def advance(self, data: bytes):
        states = self._feed(self.states, data)
        if not states:
            raise ValueError("bytes the constraint does not accept")
        self.states = states

    @property
    def complete(self) -> bool:
        """A whole value has been read: the output may (and must) end here. (A number at the top
        ends only with the output, so a complete one counts.)"""
        return any(stack and (stack[-1] == ("done",) or len(stack) == 1 and stack[0][0] == "number"
                              and _number_complete(stack[0][2])) for stack, _ in self.states)

    def completion(self) -> bytes:
        """The shortest bytes that make the value complete (b"" when it is): what a generation
        that is running out of tokens writes, so that it still ends in a whole value."""
        best = None
        for stack, _ in self.states:
            tail = self._close(stack)
            if tail is not None and (best is None or len(tail) < len(best)):
                best = tail
        return best or b""

    # --- the shortest completion ------------------------------------------------------------------
    def _close(self, stack) -> bytes | None:
        """Bytes that finish the top frame, then each frame below it in turn."""
        out = b""
        for depth in range(len(stack) - 1, -1, -1):
            frame, top = stack[depth], depth == len(stack) - 1
            kind = frame[0]
            if kind == "done":
                continue
            if kind == "value":
                out += self._shortest(frame[1], frame[2])
            elif kind == "string":
                _, sid, text, escape, role = frame
                if escape is True:
                    out += b"n"
                elif escape:
                    out += b"0" * (5 - len(escape))
                out += _finish_character(text)
                if role == "key":   # the key ends, and its value follows: the object frame below does it
                    obj = stack[depth - 1]
                    name = self._shortest_key(obj, text)
                    if name is None:
                        return None
                    out += name[len(text):] + b'":' + self._shortest(self._property(obj[1], name), None)
                    stack = stack[:depth - 1] + (obj[:2] + ("next", obj[3] | {name}, None),)
                    tail, rest = self._close_object(stack[-1]), self._close_parents(stack[:-1])
                    return None if tail is None or rest is None else out + tail + rest
                out += b'"'
            elif kind == "number":
                out += b"" if _number_complete(frame[2]) else b"0"
            elif kind == "literal":
                out += frame[1]
            elif kind == "enumtext":
                s = self.schemas[frame[1]]
                options = [json.dumps(v, ensure_ascii=False).encode() for v in (s["enum"] if "enum" in s else [s["const"]])]
                out += min((o for o in options if o.startswith(frame[2])), key=len)[len(frame[2]):]
            elif kind == "object":
                tail = self._close_object(frame if top else frame[:2] + ("next", frame[3] | {frame[4]}, None))
                if tail is None:
                    return None
                out += tail
            elif kind == "array":
                _, sid, phase, count = frame
                if not top:   # its item just ended
                    phase, count = "next", count + 1
                s = self.schemas[sid]
                item = self._shortest(self.schemas.intern(s.get("items", {})), None)
                missing = max(0, s.get("minItems", 0) - count)
                lead = b"," if phase == "next" else b""
                out += b"".join((lead if i == 0 else b",") + item for i in range(missing)) + b"]"
        return out

    def _close_parents(self, stack) -> bytes | None:
        """Finish the frames of `stack`, each of whose child value just ended."""
        if not stack:
            return b""
        top = stack[-1]
        if top[0] == "object":
            stack = stack[:-1] + (top[:2] + ("next", top[3] | {top[4]}, None),)
        elif top[0] == "array":
            stack = stack[:-1] + (top[:2] + ("next", top[3] + 1),)
        return self._close(stack)

    def _close_object(self, frame) -> bytes | None:
        """Finish an object: its pending value, its missing required properties, the brace."""
        _, sid, phase, keys, key = frame
        s = self.schemas[sid]
        out = b""
        if phase == "colon":
            out += b":" + self._shortest(self._property(sid, key), None)
            keys, phase = keys | {key}, "next"
        missing = [r.encode() for r in s.get("required", []) if r.encode() not in keys]
        if phase == "key" and not missing:   # a comma was written, so a key must come
            name = self._shortest_key(frame, b"")
            if name is None:
                return None
            missing = [name]
        pairs = [b'"' + k + b'":' + self._shortest(self._property(sid, k), None) for k in missing]
        lead = b"," if phase == "next" and pairs else b""
        return out + lead + b",".join(pairs) + b"}"

    def _property(self, sid: int, name: bytes) -> int:
        s = self.schemas[sid]
        value = s.get("properties", {}).get(name.decode("utf-8", "replace"), s.get("additionalProperties", {}))
        return self.schemas.intern(value if isinstance(value, dict) else {})

    def _shortest_key(self, obj, typed: bytes) -> bytes | None:
        """The key to end a key string begun with `typed`: a missing required one, else the shortest."""
        _, sid, _, keys, _ = obj
        s = self.schemas[sid]
        if not _closed(s):
            return typed
        names = [n.encode() for n in s.get("properties", {}) if n.encode() not in keys and n.encode().startswith(typed)]
        required = [n for n in names if n.decode() in s.get("required", [])]
        return min(required or names, key=len) if names else None

    def _shortest(self, sid: int, kind: str | None, depth: int = 0) -> bytes:
        """The shortest JSON text of a value of schema sid (of type `kind`, or any it allows)."""
        s = self.schemas[sid]
        if "enum" in s or "const" in s:
            return min((json.dumps(v, ensure_ascii=False).encode() for v in (s["enum"] if "enum" in s else [s["const"]])),
                       key=len)
        if kind is None:
            alternatives = _alternatives(self.schemas, sid)
            if len(alternatives) > 1 or alternatives[0][0] != sid:
                return min((self._shortest(a, k, depth + 1) for a, k in alternatives), key=len)
            kind = alternatives[0][1]
        if depth > 32:
            raise LlamaforgeError("json_schema: its required values nest without end")
        if kind == "object":
            return b"{" + b",".join(json.dumps(k, ensure_ascii=False).encode() + b":" +
                                    self._shortest(self._property(sid, k.encode()), None, depth + 1)
                                    for k in s.get("required", [])) + b"}"
        if kind == "array":
            item = self._shortest(self.schemas.intern(s.get("items", {})), None, depth + 1)
            return b"[" + b",".join([item] * s.get("minItems", 0)) + b"]"
        return {"string": b'""', "boolean": b"true", "null": b"null"}.get(kind, b"0")

    # --- the automaton --------------------------------------------------------------------------
    def _expect(self, stack_tuple, sid: int, run: int):
        """States expecting a value of schema sid on top of `stack_tuple` (a 1-tuple holding the stack)."""
        stack = stack_tuple[0]
        return {(stack + (("value", alt, kind),), run) for alt, kind in _alternatives(self.schemas, sid)}

    def _feed(self, states, data: bytes) -> frozenset:
        for byte in data:
            nxt = set()
            for stack, run in states:
                nxt |= self._step(stack, run, byte)
            states = frozenset(nxt)
            if not states:
                break
        return states

    def _step(self, stack, run, b) -> set:
        if not stack:
            return set()
        frame, below = stack[-1], stack[:-1]
        kind = frame[0]
        ws = b in WHITESPACE
        if kind == "done":
            return set()
        if kind == "value":
            if ws:
                return _space(stack, run, b)
            return self._begin(below, frame[1], frame[2], b)
        if kind == "string":
            return self._string(below, frame, b)
        if kind == "number":
            _, sid, text, integer = frame
            if b in NUMBER_BYTES and not (integer and b in b".eE"):
                candidate = text + bytes([b])
                return {(below + (("number", sid, candidate, integer),), 0)} if _number_prefix(candidate) else set()
            if not _number_complete(text):
                return set()
            out = set()
            for st, r in self._finish_value(below, 0):   # the number ends here; the byte is the parent's
                out |= self._step(st, r, b)
            return out
        if kind == "enumtext":   # an enum or const value, typed so far
            return self._enum(below, frame[1], frame[2] + bytes([b]))
        if kind == "literal":
            rest = frame[1]
            if b != rest[0]:
                return set()
            return self._finish_value(below, 0) if len(rest) == 1 else {(below + (("literal", rest[1:]),), 0)}
        if kind == "object":
            return self._object(below, frame, b, ws, run)
        if kind == "array":
            return self._array(below, frame, b, ws, run)
        return set()

    def _begin(self, below, sid, kind, b) -> set:
        """The first byte of a value of schema sid (one alternative: `kind`)."""
        s = self.schemas[sid]
        allowed = {kind} if kind else {"object", "array", "string", "number", "integer", "boolean", "null"}
        if "enum" in s or "const" in s:
            return self._enum(below, sid, bytes([b]))
        if b == ord("{") and "object" in allowed:
            return {(below + (("object", sid, "first", frozenset(), None),), 0)}
        if b == ord("[") and "array" in allowed:
            return {(below + (("array", sid, "first", 0),), 0)}
        if b == ord('"') and "string" in allowed:
            return {(below + (("string", sid, b"", False, "value"),), 0)}
        if (chr(b).isdigit() or b == ord("-")) and allowed & {"number", "integer"}:
            integer = "number" not in allowed
            return {(below + (("number", sid, bytes([b]), integer),), 0)}
        for word, typ in ((b"true", "boolean"), (b"false", "boolean"), (b"null", "null")):
            if b == word[0] and typ in allowed:
                return {(below + (("literal", word[1:]),), 0)}
        return set()

    def _enum(self, below, sid, typed: bytes) -> set:
        """An enum (or const) value is one of a few JSON texts: type it byte by byte."""
        s = self.schemas[sid]
        options = [json.dumps(v, ensure_ascii=False).encode() for v in (s["enum"] if "enum" in s else [s["const"]])]
        matches = [o for o in options if o.startswith(typed)]
        if not matches:
            return set()
        out = set()
        if any(o == typed for o in matches):
            out |= self._finish_value(below, 0)
        if any(len(o) > len(typed) for o in matches):
            out.add((below + (("enumtext", sid, typed),), 0))
        return out

    def _string(self, below, frame, b) -> set:
        _, sid, text, escape, role = frame
        if escape:
            if escape is True:
                if b == ord("u"):
                    return {(below + (("string", sid, text, "u", role),), 0)}
                if b not in b'"\\/bfnrt':
                    return set()
                return self._string_char(below, sid, text + bytes([b]), role)
            hexes = escape[1:]   # "u", "uX", ...
            if chr(b) not in "0123456789abcdefABCDEF":
                return set()
            if len(hexes) == 3:
                return self._string_char(below, sid, text + b"?", role)   # some character
            return {(below + (("string", sid, text, escape + chr(b), role),), 0)}
        if b == ord("\\"):
            if role == "key" and _closed(self.schemas[below[-1][1]]):
                return set()   # a listed property's name is written plainly
            if self._full(sid, text, role):
                return set()   # an escape is one more character: no room
            return {(below + (("string", sid, text, True, role),), 0)}
        if b == ord('"'):
            if not _utf8_complete(text):
                return set()
            if role == "key":
                parent = below[-1]
                if not self._key_allowed(parent, text, whole=True):
                    return set()
                _, psid, _, keys, _ = parent
                return {(below[:-1] + (("object", psid, "colon", keys | {text}, text),), 0)}
            return self._finish_value(below, 0)
        if b < 0x20:
            return set()   # control characters must be escaped
        return self._string_char(below, sid, text + bytes([b]), role)

    def _string_char(self, below, sid, text, role) -> set:
        """One more byte of a string's text: valid UTF-8 so far, within maxLength, and, for a key of
        a closed object, the beginning of a property it may still have."""
        if not _utf8_prefix(text):
            return set()
        if role == "key" and not self._key_allowed(below[-1], text, whole=False):
            return set()
        max_len = self.schemas[sid].get("maxLength") if role == "value" else None
        if max_len is not None and _characters(text) > max_len:
            return set()
        return {(below + (("string", sid, text, False, role),), 0)}

    def _full(self, sid, text, role) -> bool:
        max_len = self.schemas[sid].get("maxLength") if role == "value" else None
        return max_len is not None and _characters(text) >= max_len

    def _key_allowed(self, obj, key: bytes, whole: bool) -> bool:
        _, sid, _, keys, _ = obj
        s = self.schemas[sid]
        if key in keys and whole:
            return False   # no key twice
        closed = _closed(s)
        names = [n.encode() for n in s.get("properties", {}) if n.encode() not in keys]
        if not closed:
            return True
        return any(n == key for n in names) if whole else any(n.startswith(key) for n in names)

    def _object(self, below, frame, b, ws, run) -> set:
        _, sid, phase, keys, key = frame
        s = self.schemas[sid]
        if ws:
            return _space(below + (frame,), run, b) if phase != "value" else set()
        required = {r.encode() for r in s.get("required", [])}
        if phase in ("first", "key") and b == ord('"'):
            return {(below + (("object", sid, "key", keys, None), ("string", sid, b"", False, "key")), 0)}
        if phase == "first" and b == ord("}") or phase == "next" and b == ord("}"):
            return self._finish_value(below, 0) if required <= keys else set()
        if phase == "next" and b == ord(","):
            if _closed(s) and not {n.encode() for n in s.get("properties", {})} - keys:
                return set()   # no key left to write
            return {(below + (("object", sid, "key", keys, None),), 0)}
        if phase == "colon" and b == ord(":"):
            props = s.get("properties", {})
            name = key.decode("utf-8", "replace")
            value = props.get(name, s.get("additionalProperties", {}))
            vid = self.schemas.intern(value if isinstance(value, dict) else {})
            return self._expect((below + (("object", sid, "value", keys, key),),), vid, 0)
        return set()

    def _array(self, below, frame, b, ws, run) -> set:
        _, sid, phase, count = frame
        s = self.schemas[sid]
        if ws:
            return _space(below + (frame,), run, b)
        if b == ord("]") and phase in ("first", "next"):
            return self._finish_value(below, 0) if count >= s.get("minItems", 0) else set()
        items = self.schemas.intern(s.get("items", {}))
        if phase == "next" and b == ord(","):
            if "maxItems" in s and count >= s["maxItems"]:
                return set()
            return self._expect((below + (("array", sid, "value", count),),), items, 0)
        if phase == "first":   # the first item begins with this byte
            if s.get("maxItems") == 0:
                return set()
            out = set()
            for st, r in self._expect((below + (("array", sid, "value", count),),), items, 0):
                out |= self._step(st, r, b)
            return out
        return set()

    def _finish_value(self, below, run) -> set:
        """A value is complete: its container moves on (or the document is done)."""
        if not below:
            return {((("done",),), run)}
        parent = below[-1]
        if parent[0] == "object":
            _, sid, _, keys, key = parent
            return {(below[:-1] + (("object", sid, "next", keys, None),), run)}
        if parent[0] == "array":
            _, sid, _, count = parent
            return {(below[:-1] + (("array", sid, "next", count + 1),), run)}
        return set()


def _space(stack, run: int, b: int) -> set:
    """Whitespace between tokens, as llama.cpp's JSON grammars allow it: one space, or a newline
    and an indent of at most MAX_INDENT spaces or tabs; so a model cannot spin in whitespace
    instead of writing the value. `run`: 0 none yet, -1 after the one space, k > 0 after the
    newline and k - 1 indent characters."""
    if run == 0:
        nxt = -1 if b == ord(" ") else 1 if b == ord("\n") else None
    else:
        nxt = run + 1 if run > 0 and b in b" \t" and run <= MAX_INDENT else None
    return {(stack, nxt)} if nxt is not None else set()


def _closed(s: dict) -> bool:
    """Whether an object schema allows only its listed properties. It does when it says so, and
    when it lists properties without saying (as OpenAI's structured outputs, llama.cpp's grammars
    and vLLM do: a model given a free hand invents keys)."""
    extra = s.get("additionalProperties")
    return extra is False or extra is None and "properties" in s


def _characters(text: bytes) -> int:
    """Characters in valid UTF-8 (a partial last one counts): the bytes that are not continuations."""
    return sum((b & 0xC0) != 0x80 for b in text)


def _finish_character(text: bytes) -> bytes:
    """The continuation bytes that end a partial UTF-8 character at the end of `text`."""
    out = b""
    while not _utf8_complete(text + out):
        out += next(bytes([b]) for b in range(0x80, 0xC0) if _utf8_prefix(text + out + bytes([b])))
    return out


def _last_character(text: bytes) -> bytes:
    """The bytes of the last, perhaps partial, character of UTF-8 text."""
    i = len(text) - 1
    while i > 0 and i > len(text) - 4 and (text[i] & 0xC0) == 0x80:
        i -= 1
    return text[max(i, 0):]


def _utf8_prefix(text: bytes) -> bool:
    """Whether `text`, whose bytes but the last were a valid UTF-8 prefix, still is one: only its
    last character needs checking."""
    last = _last_character(text)
    if len(last) == 1 and len(text) > 1 and not _utf8_complete(text[:-1]):
        return False   # a new character began before the one before it was whole
    try:
        codecs.utf_8_decode(last, "strict", False)
    except UnicodeDecodeError:
        return False
    return True


def _utf8_complete(text: bytes) -> bool:
    """Whether valid UTF-8 prefix `text` ends on a whole character."""
    tail = _last_character(text)
    return codecs.utf_8_decode(tail, "strict", False)[1] == len(tail)


def _number_prefix(text: bytes) -> bool:
    """Whether `text` can begin a JSON number."""
    import re
    return re.fullmatch(rb"-?(0|[1-9][0-9]*)?(\.[0-9]*)?([eE][+-]?[0-9]*)?", text) is not None and \
        re.fullmatch(rb"-?(0(\.|[eE]|$)|[1-9]|$).*", text, re.S) is not None


def _number_complete(text: bytes) -> bool:
    import re
    return re.fullmatch(rb"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?", text) is not None
