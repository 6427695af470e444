"""Reserved keys and record formats, byte-compatible with the seed's key-value layout.

They let a catalog be exported to, or imported from, that layout. Every integer is big-endian.

A route record: codec version ``1``, route_id u64, group_id u64, state u8, parent_route_id u64,
start length u64 + bytes, then ``0`` (unbounded end) or ``1`` + end length u64 + bytes.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable

from distribution.errors import (
    CatalogInvalidNextRouteIDError,
    CatalogInvalidRouteKeyError,
    CatalogInvalidRouteRecordError,
    CatalogInvalidVersionRecordError,
    CatalogRouteIDOverflowError,
    CatalogRouteKeyIDMismatchError,
)
from distribution.types import (
    UINT64_MAX,
    RouteDescriptor,
    check_key,
    check_u64,
    validate_route_descriptor,
)

__all__ = [
    "catalog_next_route_id_key",
    "catalog_route_id_from_key",
    "catalog_route_key",
    "catalog_version_key",
    "decode_catalog_next_route_id",
    "decode_catalog_route_entry",
    "decode_catalog_version",
    "decode_route_descriptor",
    "encode_catalog_next_route_id",
    "encode_catalog_version",
    "encode_route_descriptor",
    "is_catalog_route_key",
    "next_route_id_floor",
    "route_hash",
    "routes_digest",
]

_CODEC_VERSION = 1
_VERSION_KEY = b"!dist|meta|version"
_NEXT_ROUTE_ID_KEY = b"!dist|meta|next_route_id"
_ROUTE_PREFIX = b"!dist|route|"

_U64 = struct.Struct(">Q")
_COUNTER = struct.Struct(">BQ")
# codec version, route_id, group_id, state, parent_route_id, start length
_ROUTE_HEADER = struct.Struct(">BQQBQQ")
_END_UNBOUNDED = 0
_END_BOUNDED = 1


def catalog_version_key() -> bytes:
    """Return the reserved key of the catalog version record.

    >>> catalog_version_key()
    b'!dist|meta|version'
    """
    return _VERSION_KEY


def catalog_next_route_id_key() -> bytes:
    """Return the reserved key of the next-route-id record.

    >>> catalog_next_route_id_key()
    b'!dist|meta|next_route_id'
    """
    return _NEXT_ROUTE_ID_KEY


def catalog_route_key(route_id: int) -> bytes:
    """Return the reserved key of a route record: the prefix and the 8-byte big-endian id.

    >>> catalog_route_key(11)
    b'!dist|route|\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x0b'
    """
    return _ROUTE_PREFIX + _U64.pack(check_u64("route_id", route_id))


def is_catalog_route_key(key: bytes) -> bool:
    """Tell whether ``key`` lies in the route catalog keyspace (a prefix test).

    >>> is_catalog_route_key(b"!dist|route|"), is_catalog_route_key(b"!dist|meta|version")
    (True, False)
    """
    return check_key("key", key).startswith(_ROUTE_PREFIX)


def catalog_route_id_from_key(key: bytes) -> int | None:
    """Parse the route id of a route key; ``None`` unless it is the prefix plus exactly 8 bytes.

    >>> catalog_route_id_from_key(catalog_route_key(0)), catalog_route_id_from_key(b"x")
    (0, None)
    """
    if not is_catalog_route_key(key) or len(key) != len(_ROUTE_PREFIX) + _U64.size:
        return None
    value: int = _U64.unpack_from(key, len(_ROUTE_PREFIX))[0]
    return value


def encode_catalog_version(version: int) -> bytes:
    """Serialize a catalog version record: codec version ``1`` and the 8-byte value.

    >>> encode_catalog_version(42).hex()
    '01000000000000002a'
    """
    return _COUNTER.pack(_CODEC_VERSION, check_u64("version", version))


def decode_catalog_version(raw: bytes) -> int:
    """Deserialize a catalog version record.

    Raises :class:`~distribution.CatalogInvalidVersionRecordError` for any malformed record.

    >>> decode_catalog_version(bytes.fromhex("01000000000000002a"))
    42
    """
    check_key("raw", raw)
    if len(raw) != _COUNTER.size or raw[0] != _CODEC_VERSION:
        raise CatalogInvalidVersionRecordError(
            f"catalog version record is invalid: {raw.hex() or 'empty'}"
        )
    value: int = _COUNTER.unpack(raw)[1]
    return value


def encode_catalog_next_route_id(next_route_id: int) -> bytes:
    """Serialize a next-route-id record; any u64 is accepted, as the seed does.

    >>> encode_catalog_next_route_id(7).hex()
    '010000000000000007'
    """
    return _COUNTER.pack(_CODEC_VERSION, check_u64("next_route_id", next_route_id))


def decode_catalog_next_route_id(raw: bytes) -> int:
    """Deserialize a next-route-id record; a malformed record or zero is refused.

    >>> decode_catalog_next_route_id(bytes.fromhex("010000000000000000"))
    Traceback (most recent call last):
    ...
    distribution.errors.CatalogInvalidNextRouteIDError: catalog next route id record is invalid: zero
    """
    try:
        value = decode_catalog_version(raw)
    except CatalogInvalidVersionRecordError as exc:
        raise CatalogInvalidNextRouteIDError(
            f"catalog next route id record is invalid: {raw.hex() or 'empty'}"
        ) from exc
    if value == 0:
        raise CatalogInvalidNextRouteIDError("catalog next route id record is invalid: zero")
    return value


def encode_route_descriptor(route: RouteDescriptor) -> bytes:
    """Serialize a route record after validating the route.

    >>> encode_route_descriptor(RouteDescriptor(route_id=1, start=b"", end=None, group_id=1)).hex()
    '0100000000000000010000000000000001000000000000000000000000000000000000'
    """
    route = validate_route_descriptor(route)
    parts = [
        _ROUTE_HEADER.pack(
            _CODEC_VERSION,
            route.route_id,
            route.group_id,
            route.state,
            route.parent_route_id,
            len(route.start),
        ),
        route.start,
    ]
    if route.end is None:
        parts.append(bytes((_END_UNBOUNDED,)))
    else:
        parts += [bytes((_END_BOUNDED,)), _U64.pack(len(route.end)), route.end]
    return b"".join(parts)


def route_hash(route: RouteDescriptor) -> int:
    """The route's 64-bit hash in the catalog digest: the first 8 bytes of the MD5 of its route
    record, as a signed 64-bit integer (PostgreSQL's ``bigint``, as ``distribution_route_hash``
    computes it in the database); O(len(start) + len(end)).

    >>> route_hash(RouteDescriptor(route_id=1, start=b"", end=None, group_id=1))
    -9181016149331000729
    """
    head = hashlib.md5(encode_route_descriptor(route), usedforsecurity=False).digest()[:8]
    return int.from_bytes(head, "big", signed=True)


def routes_digest(routes: Iterable[RouteDescriptor]) -> int:
    """The catalog digest of ``routes``: the XOR of their :func:`route_hash` values (0 for none),
    as ``distribution_meta.digest`` holds it for the live routes; O(total size of the routes).

    Two sets of routes with equal digests are equal up to a 2**-64 chance, and a change moves the
    digest by XORing out the hashes of the routes it removes and in those of the routes it adds.

    >>> one = RouteDescriptor(route_id=1, start=b"", end=None, group_id=1)
    >>> routes_digest([one]) == route_hash(one), routes_digest([one, one]), routes_digest([])
    (True, 0, 0)
    """
    digest = 0
    for route in routes:
        digest ^= route_hash(route)
    return digest


def _invalid_record(reason: str) -> CatalogInvalidRouteRecordError:
    return CatalogInvalidRouteRecordError(f"catalog route record is invalid: {reason}")


def _take(raw: bytes, offset: int, length: int, what: str) -> bytes:
    if length > len(raw) - offset:
        raise _invalid_record(f"{what} runs past the end of the record")
    return raw[offset : offset + length]


def decode_route_descriptor(raw: bytes) -> RouteDescriptor:
    """Deserialize and validate a route record.

    Truncation, trailing bytes, a bad codec version or end flag, and lengths past the buffer raise
    :class:`~distribution.CatalogInvalidRouteRecordError`; an invalid route raises its own error.

    >>> raw = bytes.fromhex("0100000000000000010000000000000001000000000000000000000000000000000000")
    >>> decode_route_descriptor(raw)
    RouteDescriptor(route_id=1, start=b'', end=None, group_id=1, state=<RouteState.ACTIVE: 0>, parent_route_id=0)
    """
    check_key("raw", raw)
    if len(raw) < _ROUTE_HEADER.size:
        raise _invalid_record(f"{len(raw)} bytes is shorter than the header")
    codec, route_id, group_id, state, parent_route_id, start_len = _ROUTE_HEADER.unpack_from(raw)
    if codec != _CODEC_VERSION:
        raise _invalid_record(f"unknown codec version {codec}")
    offset = _ROUTE_HEADER.size
    start = _take(raw, offset, start_len, "start")
    offset += start_len
    flag = _take(raw, offset, 1, "end flag")[0]
    offset += 1
    end: bytes | None = None
    if flag == _END_BOUNDED:
        end_len: int = _U64.unpack(_take(raw, offset, _U64.size, "end length"))[0]
        offset += _U64.size
        end = _take(raw, offset, end_len, "end")
        offset += end_len
    elif flag != _END_UNBOUNDED:
        raise _invalid_record(f"unknown end flag {flag}")
    if offset != len(raw):
        raise _invalid_record(f"{len(raw) - offset} trailing bytes")
    return validate_route_descriptor(
        RouteDescriptor(
            route_id=route_id,
            start=start,
            end=end,
            group_id=group_id,
            state=state,
            parent_route_id=parent_route_id,
        )
    )


def decode_catalog_route_entry(key: bytes, raw: bytes) -> RouteDescriptor:
    """Decode a route record stored under ``key`` in the seed's layout, checking the two agree.

    Raises :class:`~distribution.CatalogInvalidRouteKeyError` for a malformed key and
    :class:`~distribution.CatalogRouteKeyIDMismatchError` when the key names another route.

    >>> raw = bytes.fromhex("0100000000000000010000000000000001000000000000000000000000000000000000")
    >>> decode_catalog_route_entry(catalog_route_key(2), raw)
    Traceback (most recent call last):
    ...
    distribution.errors.CatalogRouteKeyIDMismatchError: catalog route key and record route id mismatch: key 2, record 1
    """
    key_id = catalog_route_id_from_key(key)
    if key_id is None:
        raise CatalogInvalidRouteKeyError(f"catalog route key is invalid: {key.hex()}")
    route = decode_route_descriptor(raw)
    if route.route_id != key_id:
        raise CatalogRouteKeyIDMismatchError(
            f"catalog route key and record route id mismatch: key {key_id}, "
            f"record {route.route_id}"
        )
    return route


def next_route_id_floor(routes: Iterable[RouteDescriptor]) -> int:
    """Return the smallest next route id that reuses none of ``routes``' ids: max id + 1.

    An empty collection gives 1. Raises :class:`~distribution.CatalogRouteIDOverflowError` when the
    largest id is ``2**64 - 1``.

    >>> next_route_id_floor([RouteDescriptor(route_id=7, start=b"", end=None, group_id=1)])
    8
    """
    highest = max((check_u64("route_id", r.route_id) for r in routes), default=0)
    if highest == UINT64_MAX:
        raise CatalogRouteIDOverflowError("catalog route id overflow")
    return highest + 1
