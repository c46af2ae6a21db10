"""The docs stay true to the code: every error type and setting is documented as it is."""

import re

from shared.core.config import Settings
from shared.core.errors import ERROR_TABLE
from tests.support.processes import REPO


def test_observability_doc_lists_every_error_type_as_the_table_says():
    doc = (REPO / "docs" / "observability.md").read_text()
    for error_type, spec in ERROR_TABLE.items():
        row = re.search(rf"^\| `{error_type}` \| (\w+) \| (\w+) \| ([^|]+) \| (\w+) \| (\w+) \|", doc, re.MULTILINE)
        assert row, f"{error_type} is missing from docs/observability.md"
        http = str(spec.http_status) if spec.http_status else "—"
        assert row.groups()[:2] == (spec.severity, spec.level), error_type
        assert row.group(3).strip() == http, error_type
        assert row.group(4) == spec.capture, error_type


def test_readme_documents_every_setting():
    readme = (REPO / "README.md").read_text()
    example = (REPO / ".env.example").read_text()
    for name in Settings.model_fields:
        assert f"`{name.upper()}`" in readme, f"{name.upper()} is not in README"
        assert f"{name.upper()}=" in example or name in ("port",), f"{name.upper()} is not in .env.example"
