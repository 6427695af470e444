r"""Keys on the command line and in the CLI's output.

Input: a key argument is UTF-8 text, or hex when it starts with ``0x`` (``0x`` alone is the empty
key) or when ``--hex`` is given (then the ``0x`` prefix is optional). ``--text`` takes the argument
as text even when it starts with ``0x``.

Output: a key is shown in double quotes, Python bytes-literal style without the ``b``: printable
ASCII as itself, ``\`` and ``"`` escaped with a backslash, every other byte as ``\xNN``. The empty
key is ``""`` and an unbounded end is ``+∞`` (never quoted), so no key can be mistaken for it.
Machine-readable output (``--json``, ``export``) carries keys as plain lowercase hex instead.

>>> format_key(b'user/42')
'"user/42"'
>>> print(format_key(b'a"b\\c\x00\xff'))
"a\"b\\c\x00\xff"
>>> format_end(None), format_end(b"")
('+∞', '""')
>>> parse_key("0x00ff"), parse_key("abc"), parse_key("ff", hex_key=True), parse_key("0x")
(b'\x00\xff', b'abc', b'\xff', b'')
"""

from __future__ import annotations

from distribution.cli.errors import UsageError
from distribution.types import MAX_ROUTE_KEY_BYTES

__all__ = [
    "UNBOUNDED",
    "format_end",
    "format_key",
    "format_range",
    "parse_hex",
    "parse_key",
]

#: How an unbounded end is shown.
UNBOUNDED = "+∞"

_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")

# Every byte's escaped form, built once: formatting a key is then one join.
_ESCAPES: tuple[str, ...] = tuple(
    "\\\\"
    if byte == 0x5C
    else '\\"'
    if byte == 0x22
    else chr(byte)
    if 0x20 <= byte < 0x7F
    else f"\\x{byte:02x}"
    for byte in range(256)
)


def format_key(key: bytes) -> str:
    """Return ``key`` quoted and escaped for a human (see the module docstring)."""
    return '"' + "".join(map(_ESCAPES.__getitem__, key)) + '"'


def format_end(end: bytes | None) -> str:
    """Return a route's end for a human: ``+∞`` when unbounded, else the quoted key."""
    return UNBOUNDED if end is None else format_key(end)


def format_range(start: bytes, end: bytes | None) -> str:
    """Return ``[start, end)`` for a human.

    >>> format_range(b"", None)
    '["", +∞)'
    """
    return f"[{format_key(start)}, {format_end(end)})"


def parse_hex(text: str, what: str = "key") -> bytes:
    """Decode hex, with or without a ``0x`` prefix; raise :class:`UsageError` when it is not hex.

    >>> parse_hex("0xZZ")
    Traceback (most recent call last):
    ...
    distribution.cli.errors.UsageError: invalid hex key '0xZZ': 'Z' is not a hex digit
    >>> parse_hex("0x4")
    Traceback (most recent call last):
    ...
    distribution.cli.errors.UsageError: invalid hex key '0x4': an odd number of hex digits (1)
    """
    digits = text[2:] if text[:2].lower() == "0x" else text
    for digit in digits:
        if digit not in _HEX_DIGITS:
            raise UsageError(f"invalid hex {what} {text!r}: {digit!r} is not a hex digit")
    if len(digits) % 2:
        raise UsageError(f"invalid hex {what} {text!r}: an odd number of hex digits ({len(digits)})")
    return bytes.fromhex(digits)


def parse_key(text: str, *, hex_key: bool = False, text_key: bool = False) -> bytes:
    """Turn a command-line key into bytes (see the module docstring).

    Text is encoded as UTF-8; bytes that were not valid UTF-8 in the argument itself are kept
    as they were (Python decodes them with ``surrogateescape``). A key is at most
    :data:`~distribution.MAX_ROUTE_KEY_BYTES` long, the limit of route bounds.
    """
    if hex_key and text_key:
        raise UsageError("--hex and --text cannot be used together")
    if hex_key or (not text_key and text[:2].lower() == "0x"):
        key = parse_hex(text)
    else:
        try:
            key = text.encode("utf-8", errors="surrogateescape")
        except UnicodeEncodeError as exc:
            raise UsageError(f"invalid key {text!r}: {exc.reason}") from None
    # Every key the command takes is, or is looked up among, route bounds: a longer argument is
    # a mistake (a file pasted, say).
    if len(key) > MAX_ROUTE_KEY_BYTES:
        raise UsageError(
            f"a key of {len(key):,} bytes: keys are at most {MAX_ROUTE_KEY_BYTES:,} bytes"
        )
    return key
