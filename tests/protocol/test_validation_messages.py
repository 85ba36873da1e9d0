"""A value that breaks a pattern is refused in words, not in regex."""

from __future__ import annotations

import inspect

import msgspec
import msgspec.inspect as mi
import pytest

from dailydoco import protocol as p
from dailydoco.protocol import live, messages, video


def _patterns(node, seen: set[int]) -> set[str]:
    """Every string pattern in a msgspec type description, however nested."""
    if id(node) in seen:
        return set()
    seen.add(id(node))
    if isinstance(node, mi.StrType):
        return {node.pattern} if node.pattern else set()
    found: set[str] = set()
    if isinstance(node, msgspec.Struct):
        for field in msgspec.structs.fields(node):
            found |= _patterns(getattr(node, field.name), seen)
    elif isinstance(node, (tuple, list)):
        for item in node:
            found |= _patterns(item, seen)
    return found


def _protocol_structs() -> list[type]:
    return [cls for module in (messages, live, video) for _, cls in inspect.getmembers(module, inspect.isclass)
            if issubclass(cls, msgspec.Struct) and cls.__module__ == module.__name__]


def test_every_pattern_of_the_protocol_has_a_meaning():
    """A pattern added without one would be reported as its regex again; a
    meaning no pattern uses is dead."""
    patterns = set()
    for info in mi.multi_type_info(_protocol_structs()):
        patterns |= _patterns(info, set())
    assert patterns == set(p.PATTERN_MEANINGS), patterns ^ set(p.PATTERN_MEANINGS)


@pytest.mark.parametrize("body, type_, expected", [
    (b'{"transaction_id": "x", "user_id": "u", "amount_micros": 5, "currency": "usd"}', p.TransactionRequest,
     "Expected a currency code of three capital letters (ISO 4217), such as USD - at `$.currency`"),
    (b'{"transaction_id": "x", "user_id": "u", "amount_micros": 5, "currency": "USD\\n"}', p.TransactionRequest,
     "Expected a currency code of three capital letters (ISO 4217), such as USD - at `$.currency`"),
    (b'{"transaction_id": "-x", "user_id": "u", "amount_micros": 5}', p.TransactionRequest,
     "Expected an id of 1 to 128 ASCII letters, digits, '_', '.', ':' or '-', starting with a letter or digit"
     " - at `$.transaction_id`"),
    (b'{"refund_id": "r", "amount_micros": 5, "reason": "a\\u0000"}', p.RefundRequest,
     "Expected text without a NUL character - at `$.reason`"),
    (b'{"user_id": "u", "path": "a\\tb.mp4"}', video.VideoJobRequest,
     "Expected a path without control characters - at `$.path`"),
])
def test_a_broken_pattern_is_named_by_what_it_asks_for(body, type_, expected):
    with pytest.raises(msgspec.ValidationError) as caught:
        msgspec.json.decode(body, type=type_)
    assert "regex" in str(caught.value)  # what msgspec says, which the message replaces
    assert p.validation_message(caught.value) == expected


def test_other_validation_messages_pass_through():
    with pytest.raises(msgspec.ValidationError) as caught:
        msgspec.json.decode(b'{"transaction_id": "x", "user_id": "u", "amount_micros": 0}', type=p.TransactionRequest)
    assert p.validation_message(caught.value) == str(caught.value) == "Expected `int` >= 1 - at `$.amount_micros`"
