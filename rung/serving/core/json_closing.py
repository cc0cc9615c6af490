"""The shortest text that completes a JSON prefix into a JSON document — how JSON mode ends an object on time.

A request in JSON mode whose budget (max_tokens) is about to run out is steered onto this completion token by token
(`worker/grammar.py`), so it ends as parseable JSON instead of being cut in the middle of a string. The prefix is
one the JSON grammar accepted (the mask saw to that); the completion closes an open string or escape, finishes a
partial literal or number, gives a dangling key the value `null` (a key after a comma the empty name), and closes
every open array and object. Compact, as the mask writes JSON: no whitespace.
"""

from __future__ import annotations

LITERALS = ("true", "false", "null")


def closing(prefix: str) -> str:
    stack: list[str] = []  # "{" / "[" of the open containers
    expect = "value"  # value | key | colon | comma (after a value) | key_or_close | value_or_close
    in_string, escape, unicode_left, string_is_key = False, False, 0, False
    token = ""  # a literal or number being written
    for char in prefix:
        if in_string:
            if unicode_left:
                unicode_left -= 1
            elif escape:
                escape, unicode_left = False, 4 if char == "u" else 0
            elif char == "\\":
                escape = True
            elif char == '"':
                in_string = False
                expect = "colon" if string_is_key else "comma"
            continue
        if token and (char.isalnum() or char in ".+-"):
            token += char
            continue
        token = ""
        if char == '"':
            in_string, string_is_key = True, expect in ("key", "key_or_close")
        elif char in "{[":
            stack.append(char)
            expect = "key_or_close" if char == "{" else "value_or_close"
        elif char in "}]":
            stack.pop()
            expect = "comma"
        elif char == ":":
            expect = "value"
        elif char == ",":
            expect = "key" if stack[-1] == "{" else "value"
        elif char.isalnum() or char == "-":
            token, expect = char, "comma"
    tail = ""
    if in_string:
        tail += "0" * unicode_left + ("n" if escape else "") + '"'
        if string_is_key:
            tail += ":null"
    elif token:
        literal = next((word for word in LITERALS if word.startswith(token)), None)
        tail += literal[len(token):] if literal else ("0" if token[-1] in "-+.eE" else "")
    elif expect == "key":
        tail += '"":null'
    elif expect == "colon":
        tail += ":null"
    elif expect == "value" and stack:
        tail += "null"
    elif expect == "value":
        tail += "{}"  # nothing written yet: the smallest object
    return tail + "".join("}" if c == "{" else "]" for c in reversed(stack))
