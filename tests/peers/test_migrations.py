"""The alembic history creates exactly the schema the models describe, on both backends."""

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from store.db import make_engine
from store.migrate import current_revision, upgrade_to_head
from store.models import Base


def test_upgrade_empty_database_matches_models(database_url):
    upgrade_to_head(database_url)
    upgrade_to_head(database_url)  # idempotent
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
            tables = set(inspect(conn).get_table_names())
    finally:
        engine.dispose()
    assert diff == []
    assert {"domains", "users", "aliases", "alembic_version"} <= tables
    assert current_revision(database_url) is not None
