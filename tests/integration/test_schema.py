"""The migrations build exactly the schema the models describe."""

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from shared.core.models import Base
from tests.support.components import components


def test_migrated_database_matches_the_models():
    with components().engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
