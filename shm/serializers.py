"""Turning the values and keys an application sends into bytes.

A :class:`shm.Producer` takes a serializer per side: ``None``/``"bytes"`` (bytes-like as they
are, str as UTF-8), ``"str"``, ``"json"``, ``"msgpack"`` or a callable returning bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

__all__ = ["Serializer", "serializer", "as_bytes", "bytes_list"]

Serializer = Callable[[Any], bytes]

_BYTES_LIKE = {bytes, bytearray, memoryview, type(None)}


def serializer(spec: str | Serializer | None) -> Serializer | None:
    """The callable for ``spec``; None when values go as they are (see :func:`as_bytes`).

    Raises:
        ValueError: an unknown name.
    """
    if spec is None or spec == "bytes":
        return None
    if callable(spec):
        return spec
    if spec == "str":
        return lambda v: v.encode()
    if spec == "json":
        return msgspec.json.encode
    if spec == "msgpack":
        return msgspec.msgpack.encode
    raise ValueError(f"unknown serializer {spec!r}: use 'bytes', 'str', 'json', 'msgpack' or a callable")


def as_bytes(v: Any) -> bytes | bytearray | memoryview | None:
    """``v`` without a serializer: bytes-like and None as they are, str as UTF-8.

    Raises:
        TypeError: anything else (the message says how to send it).
    """
    if v is None or isinstance(v, (bytes, bytearray, memoryview)):
        return v
    if isinstance(v, str):
        return v.encode()
    raise TypeError(
        f"cannot send {type(v).__name__} as bytes: pass bytes or str, or give the Producer a "
        "serializer ('json', 'msgpack' or a callable)"
    )


def bytes_list(items: list[Any], ser: Serializer | None) -> list[Any]:
    """``items`` serialized (bytes-like or None each); the list itself when nothing to do."""
    if ser is None:
        if set(map(type, items)) <= _BYTES_LIKE:
            return items
        return [as_bytes(x) for x in items]
    return [None if x is None else ser(x) for x in items]
