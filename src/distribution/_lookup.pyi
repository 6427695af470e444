"""The Engine's searches over its routing table, in C (see ``_lookup.c`` and ``engine.py``)."""

from typing import TypeAlias

from distribution.types import Route

IMPLEMENTATION: str

_Table: TypeAlias = tuple[list[bytes], list[tuple[list[bytes], list[Route | None]]]]

def find(table: _Table, key: bytes, /) -> Route | None: ...
def group(table: _Table, keys: list[bytes], /) -> list[tuple[Route, list[bytes]]]: ...
