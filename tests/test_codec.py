"""Tests of the seed-compatible record formats and reserved keys (``distribution.codec``).

Two halves:

* the reference vectors in ``tests/data/seed_codec_vectors.json``, produced by the original Go
  code: every vector of every section is its own parametrized test, checked byte for byte;
* Hypothesis properties: round trips, canonical encodings, and that decoding any bytes at all
  raises nothing but the library's own errors.

The vectors file is part of the repository (``tests/data/``), so a clone with nothing beside it runs
them. A missing or unreadable file FAILS the vector tests, it never skips them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import distribution
from distribution import (
    UINT64_MAX,
    CatalogInvalidNextRouteIDError,
    CatalogInvalidRouteKeyError,
    CatalogInvalidRouteRecordError,
    CatalogInvalidRouteStateError,
    CatalogInvalidVersionRecordError,
    CatalogRouteIDOverflowError,
    CatalogRouteKeyIDMismatchError,
    DistributionError,
    RouteDescriptor,
    RouteState,
    catalog_next_route_id_key,
    catalog_route_id_from_key,
    catalog_route_key,
    catalog_version_key,
    decode_catalog_next_route_id,
    decode_catalog_route_entry,
    decode_catalog_version,
    decode_route_descriptor,
    encode_catalog_next_route_id,
    encode_catalog_version,
    encode_route_descriptor,
    is_catalog_route_key,
    next_route_id_floor,
    route_hash,
    routes_digest,
)

# --------------------------------------------------------------------------------------------
# Locating and loading the reference vectors
# --------------------------------------------------------------------------------------------

VECTORS_FILE = "seed_codec_vectors.json"
#: The reference vectors, a copy of the seed's ``shared/vectors/seed_codec_vectors.json``.
VECTORS_PATH = Path(__file__).resolve().parent / "data" / VECTORS_FILE

#: Every section of the vectors file; a section added to the file must be tested here too.
LIST_SECTIONS = frozenset(
    {
        "catalog_versions",
        "invalid_route_descriptors",
        "route_descriptor_decode_errors",
        "route_descriptors",
        "route_key_parsing",
        "route_keys",
        "version_decode_errors",
    }
)
SCALAR_SECTIONS = frozenset({"about", "catalog_next_route_id_key_hex", "catalog_version_key_hex"})


def load_vectors(path: Path) -> tuple[dict[str, Any], str | None]:
    """Return the vectors at ``path``, or no vectors and why they could not be loaded."""
    try:
        with path.open(encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
        return {}, f"cannot load the seed codec vectors: {exc}"
    if not isinstance(data, dict):
        return {}, f"seed codec vectors at {path} are not a JSON object"
    return data, None


VECTORS, VECTORS_PROBLEM = load_vectors(VECTORS_PATH)


class _Missing:
    """Stands in for the vectors of a section that could not be loaded, so the test FAILS."""

    def __init__(self, section: str) -> None:
        self.section = section


def need(vector: Any) -> dict[str, Any]:
    """Return the vector, or fail the test (never skip it) when the vectors are missing."""
    if isinstance(vector, _Missing):
        pytest.fail(
            VECTORS_PROBLEM or f"section {vector.section!r} is missing or empty in the seed vectors"
        )
    assert isinstance(vector, dict)
    return vector


def cases(section: str, make_id: Callable[[dict[str, Any]], str]) -> list[Any]:
    """One pytest param per vector of ``section``, or a single failing param when missing."""
    vectors = VECTORS.get(section)
    if VECTORS_PROBLEM is not None or not isinstance(vectors, list) or not vectors:
        return [pytest.param(_Missing(section), id=f"{section}-MISSING")]
    return [pytest.param(v, id=make_id(v)) for v in vectors]


def _hex_id(value: str | None) -> str:
    if value is None:
        return "none"
    return value or "empty"


def _route_id(route: dict[str, Any]) -> str:
    return (
        f"r{route['route_id']}-g{route['group_id']}-s{route['state']}-p{route['parent_route_id']}"
        f"-{_hex_id(route['start_hex'])}-{_hex_id(route['end_hex'])}"
    )


def to_descriptor(route: dict[str, Any]) -> RouteDescriptor:
    end_hex = route["end_hex"]
    return RouteDescriptor(
        route_id=route["route_id"],
        start=bytes.fromhex(route["start_hex"]),
        end=None if end_hex is None else bytes.fromhex(end_hex),
        group_id=route["group_id"],
        state=route["state"],
        parent_route_id=route["parent_route_id"],
    )


def error_class(seed_name: str) -> type[DistributionError]:
    """The Python exception of a seed error name: ``distribution.<name>Error``."""
    cls = getattr(distribution, seed_name + "Error", None)
    assert isinstance(cls, type), f"distribution.{seed_name}Error does not exist"
    assert issubclass(cls, DistributionError), f"{cls.__name__} is not a DistributionError"
    return cls


_SIMPLE_ROUTE = RouteDescriptor(route_id=1, start=b"a", end=b"m", group_id=2)


def loose(value: object) -> Any:
    """Pass a deliberately wrong value past the type checker."""
    return value


def reference_encode(route: RouteDescriptor) -> bytes:
    """An independent encoder of the route record layout, checked against the Go vectors below."""
    out = bytearray([1])
    out += route.route_id.to_bytes(8, "big")
    out += route.group_id.to_bytes(8, "big")
    out.append(int(route.state))
    out += route.parent_route_id.to_bytes(8, "big")
    out += len(route.start).to_bytes(8, "big") + route.start
    if route.end is None:
        out.append(0)
    else:
        out.append(1)
        out += len(route.end).to_bytes(8, "big") + route.end
    return bytes(out)


def test_seed_vectors_are_found_and_complete() -> None:
    if VECTORS_PROBLEM is not None:
        pytest.fail(VECTORS_PROBLEM)
    assert set(VECTORS) == LIST_SECTIONS | SCALAR_SECTIONS, (
        "the vectors file has sections this test does not know (or lacks some): "
        f"{sorted(set(VECTORS) ^ (LIST_SECTIONS | SCALAR_SECTIONS))}"
    )
    for section in LIST_SECTIONS:
        assert isinstance(VECTORS[section], list), section
        assert VECTORS[section], f"section {section} is empty"


class TestLoadVectors:
    def test_the_vectors_ship_with_the_repository(self) -> None:
        assert VECTORS_PROBLEM is None, VECTORS_PROBLEM
        assert VECTORS_PATH.is_relative_to(Path(__file__).resolve().parent)

    def test_a_missing_file_is_reported(self, tmp_path: Path) -> None:
        data, problem = load_vectors(tmp_path / VECTORS_FILE)
        assert data == {}
        assert problem is not None and VECTORS_FILE in problem

    def test_missing_vectors_fail_rather_than_skip(self) -> None:
        with pytest.raises(pytest.fail.Exception):
            need(_Missing("route_keys"))


# --------------------------------------------------------------------------------------------
# The reference vectors, one test per vector
# --------------------------------------------------------------------------------------------


def test_reserved_meta_keys() -> None:
    if VECTORS_PROBLEM is not None:
        pytest.fail(VECTORS_PROBLEM)
    assert catalog_version_key() == bytes.fromhex(VECTORS["catalog_version_key_hex"])
    assert catalog_next_route_id_key() == bytes.fromhex(VECTORS["catalog_next_route_id_key_hex"])
    assert catalog_version_key() == b"!dist|meta|version"
    assert catalog_next_route_id_key() == b"!dist|meta|next_route_id"
    assert type(catalog_version_key()) is bytes
    assert type(catalog_next_route_id_key()) is bytes
    assert not is_catalog_route_key(catalog_version_key())
    assert not is_catalog_route_key(catalog_next_route_id_key())


@pytest.mark.parametrize("vector", cases("catalog_versions", lambda v: f"v{v['value']}"))
def test_catalog_version_vector(vector: Any) -> None:
    v = need(vector)
    value, raw = v["value"], bytes.fromhex(v["encoded_hex"])
    assert encode_catalog_version(value) == raw
    assert decode_catalog_version(raw) == value
    # The next-route-id record has the same layout; encoding accepts any u64, as the seed does.
    assert encode_catalog_next_route_id(value) == raw
    if value == 0:
        with pytest.raises(CatalogInvalidNextRouteIDError):
            decode_catalog_next_route_id(raw)
    else:
        assert decode_catalog_next_route_id(raw) == value


@pytest.mark.parametrize("vector", cases("route_descriptors", lambda v: _route_id(v["route"])))
def test_route_descriptor_vector(vector: Any) -> None:
    v = need(vector)
    route, raw = to_descriptor(v["route"]), bytes.fromhex(v["encoded_hex"])
    assert encode_route_descriptor(route) == raw
    assert reference_encode(route) == raw  # the oracle of the property tests agrees with Go
    decoded = decode_route_descriptor(raw)
    assert decoded == route
    assert type(decoded) is RouteDescriptor
    assert type(decoded.state) is RouteState
    assert decoded.state == RouteState(v["route"]["state"])
    assert decoded.end is None if v["route"]["end_hex"] is None else decoded.end is not None
    assert decode_catalog_route_entry(catalog_route_key(route.route_id), raw) == route


@pytest.mark.parametrize(
    "vector", cases("invalid_route_descriptors", lambda v: f"{v['error']}-{_route_id(v['route'])}")
)
def test_invalid_route_descriptor_vector(vector: Any) -> None:
    v = need(vector)
    cls = error_class(v["error"])
    with pytest.raises(cls) as excinfo:
        encode_route_descriptor(to_descriptor(v["route"]))
    assert type(excinfo.value) is cls


@pytest.mark.parametrize("vector", cases("route_descriptor_decode_errors", lambda v: v["name"]))
def test_route_descriptor_decode_error_vector(vector: Any) -> None:
    v = need(vector)
    cls = error_class(v["error"])
    raw = bytes.fromhex(v["raw_hex"])
    with pytest.raises(cls) as excinfo:
        decode_route_descriptor(raw)
    assert type(excinfo.value) is cls
    # The same record under a well-formed key fails the same way.
    with pytest.raises(cls) as excinfo:
        decode_catalog_route_entry(catalog_route_key(1), raw)
    assert type(excinfo.value) is cls


@pytest.mark.parametrize("vector", cases("route_key_parsing", lambda v: f"key-{v['key_hex']}"))
def test_route_key_parsing_vector(vector: Any) -> None:
    v = need(vector)
    key = bytes.fromhex(v["key_hex"])
    assert is_catalog_route_key(key) is v["is_route_key"]
    parsed = catalog_route_id_from_key(key)
    if v["ok"]:
        assert parsed == v["route_id"]
        assert catalog_route_key(v["route_id"]) == key
    else:
        assert parsed is None
        with pytest.raises(CatalogInvalidRouteKeyError):
            decode_catalog_route_entry(key, encode_route_descriptor(_SIMPLE_ROUTE))


@pytest.mark.parametrize("vector", cases("route_keys", lambda v: f"id{v['route_id']}"))
def test_route_key_vector(vector: Any) -> None:
    v = need(vector)
    key = bytes.fromhex(v["key_hex"])
    assert catalog_route_key(v["route_id"]) == key
    assert is_catalog_route_key(key)
    assert catalog_route_id_from_key(key) == v["route_id"]


@pytest.mark.parametrize("vector", cases("version_decode_errors", lambda v: v["name"]))
def test_version_decode_error_vector(vector: Any) -> None:
    v = need(vector)
    raw = bytes.fromhex(v["raw_hex"])
    if v["version_error"]:
        version_cls = error_class(v["version_error"])
        with pytest.raises(version_cls) as excinfo:
            decode_catalog_version(raw)
        assert type(excinfo.value) is version_cls
    else:
        assert encode_catalog_version(decode_catalog_version(raw)) == raw
    if v["next_route_id_error"]:
        next_cls = error_class(v["next_route_id_error"])
        with pytest.raises(next_cls) as excinfo:
            decode_catalog_next_route_id(raw)
        assert type(excinfo.value) is next_cls
        if v["version_error"]:
            # A record that is not even a well-formed counter keeps the version error as its cause.
            assert type(excinfo.value.__cause__) is error_class(v["version_error"])
    else:
        assert encode_catalog_next_route_id(decode_catalog_next_route_id(raw)) == raw


# --------------------------------------------------------------------------------------------
# Behaviour the vectors do not cover
# --------------------------------------------------------------------------------------------


def _route(route_id: int) -> RouteDescriptor:
    return RouteDescriptor(route_id=route_id, start=b"", end=None, group_id=1)


@pytest.mark.parametrize("raw", [b"", b"\x01", b"\x02" + bytes(8), bytes(10)], ids=repr)
def test_next_route_id_error_wraps_the_version_error(raw: bytes) -> None:
    with pytest.raises(CatalogInvalidNextRouteIDError) as excinfo:
        decode_catalog_next_route_id(raw)
    assert isinstance(excinfo.value.__cause__, CatalogInvalidVersionRecordError)
    assert not isinstance(excinfo.value, CatalogInvalidVersionRecordError)


def test_next_route_id_zero_is_refused_without_a_cause() -> None:
    with pytest.raises(CatalogInvalidNextRouteIDError) as excinfo:
        decode_catalog_next_route_id(encode_catalog_next_route_id(0))
    assert excinfo.value.__cause__ is None


class TestNextRouteIDFloor:
    def test_empty_is_one(self) -> None:
        assert next_route_id_floor([]) == 1
        assert next_route_id_floor(iter(())) == 1

    def test_max_plus_one(self) -> None:
        assert next_route_id_floor([_route(7)]) == 8
        assert next_route_id_floor([_route(3), _route(41), _route(9)]) == 42
        assert next_route_id_floor(r for r in (_route(5), _route(2))) == 6

    def test_just_below_overflow(self) -> None:
        assert next_route_id_floor([_route(UINT64_MAX - 1)]) == UINT64_MAX

    def test_overflow(self) -> None:
        with pytest.raises(CatalogRouteIDOverflowError):
            next_route_id_floor([_route(UINT64_MAX)])
        with pytest.raises(CatalogRouteIDOverflowError):
            next_route_id_floor([_route(1), _route(UINT64_MAX), _route(2)])

    def test_out_of_range_id_is_a_value_error(self) -> None:
        with pytest.raises(ValueError) as excinfo:
            next_route_id_floor([_route(2**64)])
        assert not isinstance(excinfo.value, DistributionError)


class TestDecodeCatalogRouteEntry:
    def test_ok(self) -> None:
        raw = encode_route_descriptor(_SIMPLE_ROUTE)
        assert decode_catalog_route_entry(catalog_route_key(1), raw) == _SIMPLE_ROUTE

    @pytest.mark.parametrize(
        "key",
        [
            b"",
            b"!dist|route|",
            b"!dist|route|" + bytes(7),
            b"!dist|route|" + bytes(7) + b"\x01\x00",
            b"!dist|meta|version",
            b"!dist|rout|" + bytes(8),
            bytes(8),
        ],
        ids=repr,
    )
    def test_invalid_key(self, key: bytes) -> None:
        with pytest.raises(CatalogInvalidRouteKeyError):
            decode_catalog_route_entry(key, encode_route_descriptor(_SIMPLE_ROUTE))

    @pytest.mark.parametrize("key_id", [0, 2, UINT64_MAX])
    def test_mismatch(self, key_id: int) -> None:
        # The key of id 0 is well formed (it parses to 0, not None), so it is a mismatch too.
        with pytest.raises(CatalogRouteKeyIDMismatchError):
            decode_catalog_route_entry(
                catalog_route_key(key_id), encode_route_descriptor(_SIMPLE_ROUTE)
            )

    def test_invalid_record_under_a_good_key(self) -> None:
        raw = encode_route_descriptor(_SIMPLE_ROUTE)
        with pytest.raises(CatalogInvalidRouteRecordError):
            decode_catalog_route_entry(catalog_route_key(1), raw[:-1])


_RAW_ROUTE = encode_route_descriptor(_SIMPLE_ROUTE)
_NOT_BYTES = ["", "!dist|route|", bytearray(b"x"), memoryview(b"x"), None, 0]


class TestTypes:
    @pytest.mark.parametrize(
        "call",
        [
            lambda: is_catalog_route_key(loose("!dist|route|\x00\x00\x00\x00\x00\x00\x00\x01")),
            lambda: catalog_route_id_from_key(
                loose("!dist|route|\x00\x00\x00\x00\x00\x00\x00\x01")
            ),
            lambda: decode_catalog_route_entry(loose("!dist|route|"), _RAW_ROUTE),
            lambda: decode_catalog_route_entry(catalog_route_key(1), loose(_RAW_ROUTE.hex())),
            lambda: decode_route_descriptor(loose(_RAW_ROUTE.hex())),
            lambda: decode_catalog_version(loose("01000000000000002a")),
            lambda: decode_catalog_next_route_id(loose("01000000000000002a")),
            lambda: encode_route_descriptor(_SIMPLE_ROUTE._replace(start=loose("a"))),
            lambda: encode_route_descriptor(_SIMPLE_ROUTE._replace(end=loose("z"))),
        ],
        ids=[
            "is_catalog_route_key",
            "catalog_route_id_from_key",
            "route_entry_key",
            "route_entry_raw",
            "decode_route_descriptor",
            "decode_catalog_version",
            "decode_catalog_next_route_id",
            "encode_start",
            "encode_end",
        ],
    )
    def test_str_is_a_type_error(self, call: Callable[[], object]) -> None:
        with pytest.raises(TypeError):
            call()

    @pytest.mark.parametrize("value", _NOT_BYTES, ids=lambda v: type(v).__name__)
    def test_only_bytes_are_accepted(self, value: object) -> None:
        for fn in (
            is_catalog_route_key,
            catalog_route_id_from_key,
            decode_route_descriptor,
            decode_catalog_version,
            decode_catalog_next_route_id,
        ):
            with pytest.raises(TypeError):
                fn(loose(value))

    @pytest.mark.parametrize("value", [True, False, 1.0, "1", None], ids=repr)
    def test_non_int_ids_are_type_errors(self, value: object) -> None:
        for fn in (catalog_route_key, encode_catalog_version, encode_catalog_next_route_id):
            with pytest.raises(TypeError):
                fn(loose(value))
        with pytest.raises(TypeError):
            encode_route_descriptor(_SIMPLE_ROUTE._replace(route_id=loose(value)))

    @pytest.mark.parametrize("value", [-1, 2**64, -(2**64), 2**100], ids=str)
    def test_out_of_range_ints_are_value_errors(self, value: int) -> None:
        calls: list[Callable[[], object]] = [
            lambda: catalog_route_key(value),
            lambda: encode_catalog_version(value),
            lambda: encode_catalog_next_route_id(value),
            lambda: encode_route_descriptor(_SIMPLE_ROUTE._replace(route_id=value)),
            lambda: encode_route_descriptor(_SIMPLE_ROUTE._replace(group_id=value)),
            lambda: encode_route_descriptor(_SIMPLE_ROUTE._replace(parent_route_id=value)),
        ]
        for call in calls:
            with pytest.raises(ValueError) as excinfo:
                call()
            # The built-in ValueError, not a data error of the library (e.g. route id required).
            assert not isinstance(excinfo.value, DistributionError)


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------

settings.register_profile(
    "distribution-codec",
    derandomize=True,  # the same examples on every run and every machine
    max_examples=300,
    deadline=None,
    database=None,
    print_blob=False,
    suppress_health_check=[HealthCheck.too_slow],
)
CODEC_SETTINGS = settings.get_profile("distribution-codec")

U64_EDGES = [0, 1, 2, 255, 256, 2**32 - 1, 2**32, 2**63 - 1, 2**63, UINT64_MAX - 1, UINT64_MAX]
u64s = st.one_of(st.sampled_from(U64_EDGES), st.integers(0, UINT64_MAX))
nonzero_u64s = st.one_of(st.sampled_from(U64_EDGES[1:]), st.integers(1, UINT64_MAX))
keys = st.one_of(
    st.just(b""),
    st.binary(max_size=48),
    st.integers(1, 40).map(lambda n: b"\x00" * n),
    st.integers(1, 40).map(lambda n: b"\xff" * n),
    st.lists(st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0xFE, 0xFF]), max_size=24).map(bytes),
)
# Plain ints as well as members: the encoder must accept both.
states = st.sampled_from([*RouteState, *(int(s) for s in RouteState)])


@st.composite
def descriptors(draw: st.DrawFn) -> RouteDescriptor:
    """Any valid route descriptor: unbounded, or bounded with start < end."""
    start = draw(keys)
    end: bytes | None = None
    if draw(st.booleans()):
        other = draw(keys)
        if other > start:
            end = other
        elif other < start:
            start, end = other, start
        else:
            end = start + b"\x00"  # the smallest key after start: the narrowest range
    return RouteDescriptor(
        route_id=draw(nonzero_u64s),
        start=start,
        end=end,
        group_id=draw(nonzero_u64s),
        state=draw(states),
        parent_route_id=draw(u64s),
    )


EDGE_DESCRIPTORS = [
    RouteDescriptor(route_id=1, start=b"", end=None, group_id=1),
    RouteDescriptor(route_id=1, start=b"", end=b"\x00", group_id=1),
    RouteDescriptor(
        route_id=UINT64_MAX,
        start=b"\x00" * 16,
        end=b"\xff" * 16,
        group_id=UINT64_MAX,
        state=RouteState.MIGRATING_TARGET,
        parent_route_id=UINT64_MAX,
    ),
    RouteDescriptor(
        route_id=UINT64_MAX,
        start=b"\xff" * 33,
        end=None,
        group_id=1,
        state=RouteState.MIGRATING_SOURCE,
    ),
    RouteDescriptor(
        route_id=2, start=b"\x00" * 5, end=b"\x00" * 6, group_id=3, state=RouteState.WRITE_FENCED
    ),
    RouteDescriptor(route_id=2**63, start=b"\xff", end=b"\xff\x00", group_id=2**63),
]


def with_edges(test: Callable[..., None]) -> Callable[..., None]:
    """Always run the property on the edge descriptors too, whatever Hypothesis draws."""
    for route in reversed(EDGE_DESCRIPTORS):
        test = example(route)(test)
    return test


def test_strategy_covers_the_edges() -> None:
    routes = EDGE_DESCRIPTORS
    assert {r.route_id for r in routes} >= {1, UINT64_MAX}
    assert any(r.start == b"" for r in routes)
    assert any(r.start and set(r.start) == {0} for r in routes)
    assert any(r.start and set(r.start) == {0xFF} for r in routes)
    assert any(r.end is None for r in routes)
    assert any(r.end is not None for r in routes)
    for route in routes:
        distribution.validate_route_descriptor(route)


@CODEC_SETTINGS
@given(descriptors())
@with_edges
def test_route_descriptor_round_trip(route: RouteDescriptor) -> None:
    raw = encode_route_descriptor(route)
    assert raw == reference_encode(route)
    decoded = decode_route_descriptor(raw)
    assert decoded == route
    assert type(decoded.state) is RouteState
    assert type(decoded.start) is bytes
    assert decoded.end is None or type(decoded.end) is bytes
    assert decode_catalog_route_entry(catalog_route_key(route.route_id), raw) == route


@CODEC_SETTINGS
@given(descriptors())
@with_edges
def test_every_truncation_is_an_invalid_route_record(route: RouteDescriptor) -> None:
    raw = encode_route_descriptor(route)
    for length in range(len(raw)):
        with pytest.raises(CatalogInvalidRouteRecordError) as excinfo:
            decode_route_descriptor(raw[:length])
        assert type(excinfo.value) is CatalogInvalidRouteRecordError


@CODEC_SETTINGS
@given(descriptors(), st.binary(min_size=1, max_size=24))
def test_trailing_bytes_are_an_invalid_route_record(route: RouteDescriptor, tail: bytes) -> None:
    with pytest.raises(CatalogInvalidRouteRecordError):
        decode_route_descriptor(encode_route_descriptor(route) + tail)


@CODEC_SETTINGS
@given(descriptors(), st.integers(4, 255))
def test_unknown_state_byte_is_an_invalid_state(route: RouteDescriptor, state: int) -> None:
    raw = bytearray(encode_route_descriptor(route))
    raw[17] = state  # codec (1) + route_id (8) + group_id (8)
    with pytest.raises(CatalogInvalidRouteStateError):
        decode_route_descriptor(bytes(raw))


def _check_decodes_canonically_or_refuses(raw: bytes) -> None:
    """Decoding ``raw`` either raises a DistributionError or yields what encodes back to ``raw``.

    Any other exception (IndexError, struct.error, OverflowError, ...) fails the test.
    """
    try:
        route = decode_route_descriptor(raw)
    except DistributionError:
        pass
    else:
        assert encode_route_descriptor(route) == raw
    try:
        route = decode_catalog_route_entry(catalog_route_key(1), raw)
    except DistributionError:
        pass
    else:
        assert route.route_id == 1
    for decode, encode in (
        (decode_catalog_version, encode_catalog_version),
        (decode_catalog_next_route_id, encode_catalog_next_route_id),
    ):
        try:
            value = decode(raw)
        except DistributionError:
            pass
        else:
            assert encode(value) == raw


@CODEC_SETTINGS
@given(st.one_of(st.binary(max_size=256), st.binary(max_size=128).map(lambda b: b"\x01" + b)))
def test_decoding_arbitrary_bytes_raises_only_library_errors(raw: bytes) -> None:
    _check_decodes_canonically_or_refuses(raw)


_MUTATIONS = ("set", "insert", "delete", "truncate", "append", "u64")


@st.composite
def mutated_records(draw: st.DrawFn) -> bytes:
    """A valid route record with one to four random edits: the bytes a decoder must survive."""
    raw = bytearray(encode_route_descriptor(draw(descriptors())))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(_MUTATIONS))
        if op == "set" and raw:
            raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
        elif op == "insert":
            raw.insert(draw(st.integers(0, len(raw))), draw(st.integers(0, 255)))
        elif op == "delete" and raw:
            del raw[draw(st.integers(0, len(raw) - 1))]
        elif op == "truncate":
            del raw[draw(st.integers(0, len(raw))) :]
        elif op == "append":
            raw += draw(st.binary(min_size=1, max_size=16))
        elif op == "u64" and len(raw) >= 8:
            # Overwrite an 8-byte field (often a length) with a small, edge or random value.
            at = draw(st.sampled_from([1, 9, 18, 26, *range(len(raw) - 7)]))
            if at <= len(raw) - 8:
                value = draw(st.one_of(st.integers(0, len(raw) + 2), u64s))
                raw[at : at + 8] = value.to_bytes(8, "big")
    return bytes(raw)


@CODEC_SETTINGS
@given(mutated_records())
def test_decoding_mutated_records_raises_only_library_errors(raw: bytes) -> None:
    _check_decodes_canonically_or_refuses(raw)


@CODEC_SETTINGS
@given(u64s)
def test_version_records_round_trip(value: int) -> None:
    raw = encode_catalog_version(value)
    assert raw == b"\x01" + value.to_bytes(8, "big")
    assert decode_catalog_version(raw) == value
    assert encode_catalog_next_route_id(value) == raw
    if value == 0:
        with pytest.raises(CatalogInvalidNextRouteIDError):
            decode_catalog_next_route_id(raw)
    else:
        assert decode_catalog_next_route_id(raw) == value


@CODEC_SETTINGS
@given(u64s)
def test_route_keys_round_trip(route_id: int) -> None:
    key = catalog_route_key(route_id)
    assert key == b"!dist|route|" + route_id.to_bytes(8, "big")
    assert is_catalog_route_key(key)
    assert catalog_route_id_from_key(key) == route_id


@CODEC_SETTINGS
@given(st.one_of(st.binary(max_size=32), st.binary(max_size=16).map(b"!dist|route|".__add__)))
def test_route_key_parsing_is_exact(key: bytes) -> None:
    assert is_catalog_route_key(key) is key.startswith(b"!dist|route|")
    parsed = catalog_route_id_from_key(key)
    if parsed is None:
        assert not is_catalog_route_key(key) or len(key) != 20
    else:
        assert catalog_route_key(parsed) == key


@CODEC_SETTINGS
@given(st.lists(descriptors(), max_size=8))
def test_next_route_id_floor_is_max_plus_one(routes: list[RouteDescriptor]) -> None:
    highest = max((r.route_id for r in routes), default=0)
    if highest == UINT64_MAX:
        with pytest.raises(CatalogRouteIDOverflowError):
            next_route_id_floor(routes)
    else:
        assert next_route_id_floor(routes) == highest + 1


def test_route_hash_follows_the_route_record() -> None:
    base = RouteDescriptor(route_id=7, start=b"a", end=b"b", group_id=3)
    variants = [
        base,
        base._replace(route_id=8),
        base._replace(start=b""),
        base._replace(end=None),
        base._replace(end=b"bb"),
        base._replace(group_id=4),
        base._replace(state=RouteState.WRITE_FENCED),
        base._replace(parent_route_id=1),
    ]
    hashes = [route_hash(route) for route in variants]
    assert len(set(hashes)) == len(variants)
    assert all(-(2**63) <= h < 2**63 for h in hashes)
    assert routes_digest(variants) == routes_digest(reversed(variants))
    assert routes_digest(variants[1:]) == routes_digest(variants) ^ hashes[0]
