"""Alembic migrations of the catalog schema, shipped inside the package as distribution.migrations."""
