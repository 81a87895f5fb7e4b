"""The checking rule of clients/conformance/README.md, in Python: one actual frame against one
expected frame of ``protocol-v1.json`` (``vary`` placeholders, ``required_keys``).

Used by the replay against a real daemon (tests/integration/test_conformance.py) and by the
unit test that holds the file to its generator; a client in another language implements the
same five steps.
"""

from __future__ import annotations

import re
import struct
from typing import Any

import msgspec

__all__ = ["ConformanceError", "check_frame", "locate"]

_PREFIX = struct.Struct(">I")
_TOKEN = re.compile(r"([^.\[\]]+)|\[(\*|\d+)\]")


class ConformanceError(AssertionError):
    """An actual frame that breaks the rule; the message says which step and where."""


def _tokens(path: str) -> list[str | int]:
    out: list[str | int] = []
    for key, index in _TOKEN.findall(path):
        out.append(key if key else ("*" if index == "*" else int(index)))
    return out


def locate(root: Any, path: str) -> list[tuple[Any, Any]]:
    """Every (container, key or index) that ``path`` names in ``root``; empty when absent."""
    places: list[tuple[Any, Any]] = [(None, root)]
    tokens = _tokens(path)
    found: list[tuple[Any, Any]] = []
    for depth, tok in enumerate(tokens):
        nxt: list[tuple[Any, Any]] = []
        for parent, key in places:
            node = root if parent is None else parent[key]
            if tok == "*":
                if isinstance(node, list):
                    nxt.extend((node, i) for i in range(len(node)))
            elif isinstance(tok, int):
                if isinstance(node, list) and tok < len(node):
                    nxt.append((node, tok))
            elif isinstance(node, dict) and tok in node:
                nxt.append((node, tok))
        places = nxt
        if depth == len(tokens) - 1:
            found = places
    return found


def _of_kind(value: Any, kind: str) -> bool:
    if kind == "uint":
        return type(value) is int and value >= 0
    if kind == "int":
        return type(value) is int
    if kind == "str":
        return type(value) is str
    if kind == "map":
        return type(value) is dict
    raise ValueError(f"unknown vary kind {kind!r}")


def check_frame(actual: bytes, expected: dict[str, Any]) -> None:
    """Raise ConformanceError unless ``actual`` (one whole frame, prefix included) matches
    ``expected`` (a ``daemon`` entry of a vector)."""
    want = bytes.fromhex(expected["frame"])
    if len(actual) < 4 or _PREFIX.unpack_from(actual)[0] != len(actual) - 4:
        raise ConformanceError(f"step 1: length prefix does not match the body: {actual[:8].hex()}")
    body = actual[4:]
    try:
        value = msgspec.msgpack.decode(body)
    except msgspec.DecodeError as exc:
        raise ConformanceError(f"not msgpack: {exc}: {actual.hex()}") from None
    if msgspec.msgpack.encode(value) != body:
        raise ConformanceError(f"step 2: not in the smallest encoding: {actual.hex()}")
    for path, keys in expected.get("required_keys", {}).items():
        places = locate(value, path)
        if not places:
            raise ConformanceError(f"step 4: no map at {path}")
        for parent, key in places:
            node = value if parent is None else parent[key]
            missing = [k for k in keys if not isinstance(node, dict) or k not in node]
            if missing:
                raise ConformanceError(f"step 4: {path} lacks {missing}")
    reference = msgspec.msgpack.decode(want[4:])
    for path, kind in expected.get("vary", {}).items():
        places = locate(value, path)
        ref_places = locate(reference, path)
        if len(places) != len(ref_places):
            raise ConformanceError(f"step 3: {path} names {len(places)} values, expected {len(ref_places)}: {value!r}")
        for (parent, key), (rparent, rkey) in zip(places, ref_places):
            if not _of_kind(parent[key], kind):
                raise ConformanceError(f"step 3: {path} = {parent[key]!r} is not a {kind}")
            parent[key] = rparent[rkey]
    again = msgspec.msgpack.encode(value)
    got = _PREFIX.pack(len(again)) + again
    if got != want:
        raise ConformanceError(
            f"step 5: differs after the vary substitutions\n  expected {want.hex()}\n  got      {got.hex()}\n"
            f"  expected {msgspec.msgpack.decode(want[4:])!r}\n  got      {value!r}"
        )
