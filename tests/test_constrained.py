"""The JSON automaton of constrained decoding, byte by byte: every valid document is accepted and
complete, every invalid one is refused at the byte where it goes wrong, and a schema's rules hold."""
import json

import jsonschema
import pytest

from llamaforge.errors import LlamaforgeError
from llamaforge.model.constrained import JSONConstraint


def accepts(schema, text: str) -> bool:
    """Whether the whole of `text` is accepted as a complete value."""
    c = JSONConstraint(schema)
    data = text.encode()
    if not c.accepts(data):
        return False
    c.advance(data)
    return c.complete


ANY_VALID = ['{}', '[]', '0', '-12.5e+3', '"x"', 'true', 'null', '{"a": [1, {"b": null}], "c": "\\u00e9\\n"}',
             '[1,2,3]', '"羊驼 🦙"', '{\n  "k": false\n}', '[{"": []}]']
ANY_INVALID = ['{', '[1,]', '01', '1.', '"x', 'tru', '{"a" 1}', '{"a":}', '[1 2]', '"\\x"', '{,}', '"a\tb"',
               '-', '1e', '{"a":1,}', '  ' * 20 + '1']


@pytest.mark.parametrize("text", ANY_VALID)
def test_valid_json_is_accepted_and_complete(text):
    json.loads(text)
    assert accepts(None, text)


@pytest.mark.parametrize("text", ANY_INVALID)
def test_invalid_json_is_refused(text):
    assert not accepts(None, text)


def test_invalid_utf8_and_partial_characters_are_refused():
    c = JSONConstraint({"type": "string"})
    assert c.accepts(b'"\xe7\xbe') and not c.accepts(b'"\xe7\xbe"'), "a string cannot end inside a character"
    assert not c.accepts(b'"\xff') and not c.accepts(b'"\x80') and not c.accepts(b'"\xe7A')


def test_whitespace_is_bounded():
    assert accepts(None, '{ "a":\n    1}')
    assert not accepts(None, '{\n\n"a": 1}'), "one newline (and its indent) between tokens, as llama.cpp's grammar"
    assert not accepts(None, "[\n" + " " * 21 + "1]")


PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 5}, "age": {"type": "integer"},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b", 3]},
                                                    "minItems": 1, "maxItems": 2}},
          "required": ["name", "age"]}


@pytest.mark.parametrize("text, ok", [
    ('{"name": "Ann", "age": 3}', True),
    ('{"age": 3, "name": "Ann", "tags": ["b", 3]}', True),
    ('{"name": "Ann"}', False),                          # required
    ('{"name": "Annabel", "age": 3}', False),            # maxLength
    ('{"name": "羊驼羊驼羊", "age": 3}', True),            # characters, not bytes
    ('{"name": "Ann", "age": 3.5}', False),              # integer
    ('{"name": "Ann", "age": 3, "x": 1}', False),        # listed properties only
    ('{"name": "Ann", "name": "Bo", "age": 3}', False),  # no key twice
    ('{"name": "Ann", "age": 3, "tags": []}', False),    # minItems
    ('{"name": "Ann", "age": 3, "tags": ["a", "a", "b"]}', False),   # maxItems
    ('{"name": "Ann", "age": 3, "tags": ["c"]}', False),  # enum
    ('{"n\\u0061me": "Ann", "age": 3}', False),          # a listed name is written plainly
])
def test_a_schema_is_enforced(text, ok):
    assert accepts(PERSON, text) is ok


def test_refs_any_of_and_open_objects():
    schema = {"$defs": {"node": {"anyOf": [{"type": "integer"}, {"type": "array", "items": {"$ref": "#/$defs/node"}}]}},
              "$ref": "#/$defs/node"}
    assert accepts(schema, "[1, [2, [3]], []]") and not accepts(schema, '[1, "x"]')
    open_object = {"type": "object", "additionalProperties": {"type": "number"}}
    assert accepts(open_object, '{"anything": 1.5}') and not accepts(open_object, '{"a": "b"}')
    assert accepts({"type": ["string", "null"]}, "null") and not accepts({"type": ["string", "null"]}, "1")


def test_a_complete_value_allows_nothing_more():
    c = JSONConstraint(PERSON)
    c.advance(b'{"name":"A","age":1}')
    assert c.complete and not c.accepts(b" ") and not c.accepts(b",")


@pytest.mark.parametrize("schema", [{"$ref": "other.json#/x"}, {"$ref": "#/$defs/missing"}, [1]])
def test_unsupported_schemas_are_named(schema):
    with pytest.raises(LlamaforgeError, match="json_schema"):
        JSONConstraint(schema)


NESTED = {"type": "object", "properties": {
    "id": {"type": "integer"}, "label": {"enum": ["alpha", "be"]}, "flag": {"type": "boolean"},
    "items": {"type": "array", "minItems": 2, "items": {"type": "object", "properties": {"x": {"type": "number"},
                                                                                          "why": {"type": "string"}},
                                                        "required": ["x"]}},
    "note": {"anyOf": [{"type": "null"}, {"type": "string"}]}},
    "required": ["id", "items", "label"]}
DOCUMENTS = [(None, '{"a": [1, {"b": "x\\u00e9y"}, -2.5e3], "c": true, "d": null, "e": "羊驼"}'),
             (NESTED, '{"label": "alpha", "items": [{"x": 1.5, "why": "because"}, {"x": -0}, {"why": "", "x": 2}],'
                      ' "id": 12, "note": "n", "flag": false}'),
             (PERSON, '{"tags": ["a", 3], "name": "Ann", "age": 42}')]


@pytest.mark.parametrize("schema, doc", DOCUMENTS)
def test_every_prefix_has_a_shortest_completion(schema, doc):
    """Cut a valid document anywhere: completion() makes the rest a whole, valid value, and is
    never longer than the rest of the document (what a generation short of tokens writes)."""
    data = doc.encode()
    for cut in range(len(data) + 1):
        c = JSONConstraint(schema)
        c.advance(data[:cut])
        tail = c.completion()
        assert len(tail) <= len(data) - cut, (data[:cut], tail)
        c.advance(tail)
        assert c.complete, (data[:cut], tail)
        value = json.loads(data[:cut] + tail)
        if schema is not None:
            jsonschema.validate(value, schema)
