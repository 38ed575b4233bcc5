"""Alembic history of the directory schema; ``store.migrate`` runs it."""
