"""Tests of the error hierarchy (``distribution.errors``) and of the package's exports."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from types import ModuleType

import pytest

import distribution
from distribution import codec, errors, types

#: Errors about invalid data (routes, snapshots, records, keys, split keys), also ValueErrors; and
#: the others (version conflicts, staleness, overflows, missing components), which are not.
DATA, OTHER = "data", "other"

#: Every error named in SPEC.md (one per seed error, then the ones "beyond the seed"), by kind.
SPEC_ERRORS = {
    "CatalogStoreRequiredError": OTHER,
    "CatalogVersionMismatchError": OTHER,
    "CatalogVersionOverflowError": OTHER,
    "CatalogRouteIDOverflowError": OTHER,
    "CatalogRouteIDRequiredError": DATA,
    "CatalogGroupIDRequiredError": DATA,
    "CatalogDuplicateRouteIDError": DATA,
    "CatalogInvalidRouteRangeError": DATA,
    "CatalogInvalidVersionRecordError": DATA,
    "CatalogInvalidNextRouteIDError": DATA,
    "CatalogInvalidRouteRecordError": DATA,
    "CatalogInvalidRouteStateError": DATA,
    "CatalogInvalidRouteKeyError": DATA,
    "CatalogRouteKeyIDMismatchError": DATA,
    "EngineSnapshotVersionStaleError": OTHER,
    "EngineSnapshotDuplicateIDError": DATA,
    "EngineSnapshotRouteOverlapError": DATA,
    "EngineSnapshotRouteOrderError": DATA,
    "EngineRequiredError": OTHER,
    "CatalogRouteOverlapError": DATA,
    "CatalogSnapshotTooOldError": OTHER,
    "CatalogVersionAheadError": OTHER,
    "CatalogRouteNotFoundError": OTHER,
    "CatalogSplitKeyAtBoundaryError": DATA,
    "CatalogInvalidSplitKeyError": DATA,
}

#: The library's errors that SPEC.md leaves to it, by kind.
OTHER_ERRORS = {
    "CatalogPermissionError": OTHER,
    "CatalogUnavailableError": OTHER,
    "CatalogNotMigratedError": OTHER,
    "RouteKeyTooLongError": DATA,
    "CatalogInvalidActorError": DATA,
    "CatalogDataError": DATA,
    "CatalogPreparedStatementError": OTHER,
}

DATA_ERRORS = [name for name, kind in {**SPEC_ERRORS, **OTHER_ERRORS}.items() if kind == DATA]
NON_DATA_ERRORS = [name for name, kind in {**SPEC_ERRORS, **OTHER_ERRORS}.items() if kind == OTHER]


def error(name: str) -> type[Exception]:
    cls = getattr(distribution, name, None)
    assert isinstance(cls, type), f"distribution.{name} does not exist"
    assert issubclass(cls, Exception)
    return cls


def test_spec_lists_each_error_once() -> None:
    assert len(SPEC_ERRORS) == 25
    assert not set(SPEC_ERRORS) & set(OTHER_ERRORS)


@pytest.mark.parametrize("name", list(SPEC_ERRORS))
def test_spec_error_exists_and_is_a_distribution_error(name: str) -> None:
    cls = error(name)
    assert issubclass(cls, distribution.DistributionError)
    assert cls is getattr(errors, name)
    assert name in errors.__all__


@pytest.mark.parametrize("name", sorted(set(errors.__all__) - {"DistributionError"}))
def test_every_error_derives_from_distribution_error(name: str) -> None:
    cls = error(name)
    assert issubclass(cls, distribution.DistributionError)
    # Raisable with a message, like any exception.
    with pytest.raises(distribution.DistributionError, match="boom"):
        raise cls("boom")


def test_distribution_error_is_an_exception() -> None:
    assert issubclass(distribution.DistributionError, Exception)
    assert not issubclass(distribution.DistributionError, ValueError)


@pytest.mark.parametrize("name", DATA_ERRORS)
def test_data_errors_are_value_errors(name: str) -> None:
    assert issubclass(error(name), ValueError)


@pytest.mark.parametrize("name", NON_DATA_ERRORS)
def test_other_errors_are_not_value_errors(name: str) -> None:
    assert not issubclass(error(name), ValueError)


def test_route_not_found_is_a_lookup_error() -> None:
    assert issubclass(distribution.CatalogRouteNotFoundError, LookupError)
    assert issubclass(distribution.CatalogRouteNotFoundError, distribution.DistributionError)


def test_operational_errors_match_their_builtins() -> None:
    assert issubclass(distribution.CatalogPermissionError, PermissionError)
    assert issubclass(distribution.CatalogUnavailableError, ConnectionError)


def test_every_error_class_of_the_module_is_exported() -> None:
    defined = {
        name
        for name, obj in vars(errors).items()
        if isinstance(obj, type)
        and issubclass(obj, BaseException)
        and obj.__module__ == errors.__name__
        and not name.startswith("_")
    }
    assert defined == set(errors.__all__)


# --------------------------------------------------------------------------------------------
# The hierarchy drawing in the module docstring
# --------------------------------------------------------------------------------------------

_BRANCH = re.compile(r"^\s*[├└]── (\w+)\s*(.*)$")


def drawing() -> list[tuple[str, str]]:
    """(class name, annotation) for every branch of the drawing, top to bottom."""
    doc = errors.__doc__ or ""
    branches = []
    for line in doc.splitlines():
        match = _BRANCH.match(line)
        if match:
            branches.append((match.group(1), match.group(2).strip()))
    return branches


def test_drawing_shows_every_error_once() -> None:
    doc = errors.__doc__ or ""
    assert re.search(r"^\s*DistributionError\s*$", doc, re.MULTILINE), "no root in the drawing"
    names = [name for name, _ in drawing()]
    assert len(names) == len(set(names)), "a class is drawn twice"
    assert set(names) | {"DistributionError"} == set(errors.__all__)


@pytest.mark.parametrize("name", sorted(errors.__all__))
def test_error_appears_in_the_drawing(name: str) -> None:
    doc = errors.__doc__ or ""
    assert re.search(rf"\b{name}\b", doc), f"{name} is missing from the errors docstring"


def test_drawing_matches_the_classes() -> None:
    """Every drawn class is a direct child of DistributionError with the bases it is annotated with.

    The drawing says ``(+ ValueError, and every class below)`` on the first data error.
    """
    in_value_errors = False
    for name, note in drawing():
        cls = error(name)
        assert distribution.DistributionError in cls.__bases__, name
        if "ValueError" in note:
            in_value_errors = True
        assert issubclass(cls, ValueError) is in_value_errors, name
        for builtin in (LookupError, PermissionError, ConnectionError):
            if builtin.__name__ in note:
                assert issubclass(cls, builtin), name


# --------------------------------------------------------------------------------------------
# The package's exports
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", [errors, types, codec], ids=lambda m: m.__name__)
def test_package_exports_every_public_name(module: ModuleType) -> None:
    missing = sorted(set(module.__all__) - set(distribution.__all__))
    assert not missing, f"distribution.__all__ lacks {missing} from {module.__name__}"
    for name in module.__all__:
        assert getattr(distribution, name) is getattr(module, name), name


@pytest.mark.parametrize("module", [errors, types, codec], ids=lambda m: m.__name__)
def test_module_all_lists_its_public_classes_and_codec_functions(module: ModuleType) -> None:
    """Every public class (and every public codec function) defined in the module is in __all__."""
    for name, obj in vars(module).items():
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj) or (module is codec and inspect.isfunction(obj)):
            assert name in module.__all__, f"{module.__name__}.{name} is not in __all__"


def test_module_all_names_exist() -> None:
    for module in (errors, types, codec):
        assert len(module.__all__) == len(set(module.__all__)), module.__name__
        for name in module.__all__:
            assert hasattr(module, name), f"{module.__name__}.__all__ names missing {name}"


def test_package_all_is_importable() -> None:
    assert len(distribution.__all__) == len(set(distribution.__all__))
    for name in distribution.__all__:
        assert hasattr(distribution, name), f"distribution.__all__ names missing {name}"


def test_the_pure_core_imports_no_sql_library() -> None:
    """A service that only routes keys loads no SQL library; the catalog's names load on use."""
    probe = (
        "import sys\n"
        "import distribution\n"
        "from distribution import Engine, RouteDescriptor, encode_route_descriptor\n"
        "sql = {'sqlalchemy', 'psycopg', 'alembic'}\n"
        "print(sorted(sql & sys.modules.keys()))\n"
        "from distribution import CatalogStore, CatalogWatcher, migrate\n"
        "print(sorted(sql & sys.modules.keys()))\n"
    )
    shown = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    ).stdout.splitlines()
    assert shown == ["[]", "['alembic', 'psycopg', 'sqlalchemy']"]


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'CatalogStor'"):
        distribution.CatalogStor  # noqa: B018
    assert "CatalogStore" in dir(distribution)


# --------------------------------------------------------------------------------------------
# SQLSTATEs: carried by the classes, raised by the server functions of migrations/sql/
# --------------------------------------------------------------------------------------------

_RAISED_SQLSTATE = re.compile(r"ERRCODE\s*=\s*'(UD\w{3})'")
#: The SQLSTATEs of PostgreSQL's own that have a class: psycopg's PREPARE through a pooler.
SERVER_SQLSTATES = {"42P05": errors.CatalogPreparedStatementError}


def sqlstate_classes() -> dict[str, type[errors.DistributionError]]:
    classes: dict[str, type[errors.DistributionError]] = {}
    for name in errors.__all__:
        cls = getattr(errors, name)
        if cls.sqlstate is not None:
            assert cls.sqlstate not in classes, f"{name} and {classes[cls.sqlstate]} share it"
            classes[cls.sqlstate] = cls
    return classes


def test_every_sqlstate_the_server_raises_has_its_class_and_back() -> None:
    from distribution.migrations.replaceable import SQL_FOLDER

    raised = {
        code
        for path in SQL_FOLDER.glob("*/*.sql")
        for code in _RAISED_SQLSTATE.findall(path.read_text())
    }
    assert raised, "no SQLSTATE found in the server functions"
    assert set(sqlstate_classes()) == raised | set(SERVER_SQLSTATES)


def test_sqlstates_are_of_the_class_postgresql_leaves_to_users() -> None:
    for code, cls in sqlstate_classes().items():
        assert re.fullmatch(r"UD\d{3}", code) or SERVER_SQLSTATES.get(code) is cls, code
    # Only the classes the server raises carry one; the others inherit the base's None.
    assert errors.DistributionError.sqlstate is None
    assert errors.CatalogSnapshotTooOldError.sqlstate is None


def test_a_data_error_carries_the_database_s_sqlstate_on_the_instance_only() -> None:
    error = errors.CatalogDataError("index row size 2712 exceeds maximum 2704", sqlstate="54000")
    assert error.sqlstate == "54000"
    assert errors.CatalogDataError.sqlstate is None  # no server function raises it on purpose
    assert errors.CatalogDataError("boom").sqlstate is None


def test_a_database_error_comes_back_as_the_class_of_its_sqlstate(database_url: str) -> None:
    import psycopg

    from distribution.database import translate_error

    with psycopg.connect(database_url, autocommit=True) as connection:
        for code, cls in sqlstate_classes().items():
            with pytest.raises(psycopg.Error) as raised:
                connection.execute(
                    f"DO $$ BEGIN RAISE EXCEPTION 'boom %', 1 USING ERRCODE = '{code}'; END $$"
                )
            translated = translate_error(raised.value)
            assert type(translated) is cls
            if code in SERVER_SQLSTATES:  # what to do about it follows the server's message
                assert "(boom 1)" in str(translated)
            else:
                assert str(translated) == "boom 1"
