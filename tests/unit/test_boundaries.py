"""The package boundaries: no service imports another service, and `shared/` never imports `services/`."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.support.processes import REPO

SERVICES = sorted(p.name for p in (REPO / "services").iterdir() if (p / "__init__.py").exists())


def imported_modules(root: Path, path: Path) -> set[str]:
    """Every module a file imports, at any depth (functions included), relative imports resolved."""
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def violations(owner: str, forbidden: list[str], root: Path = REPO) -> list[str]:
    return [
        f"{path.relative_to(root)} imports {module}"
        for path in sorted((root / owner).rglob("*.py"))
        for module in sorted(imported_modules(root, path))
        if any(module == name or module.startswith(name + ".") for name in forbidden)
    ]


def test_shared_never_imports_a_service():
    assert violations("shared", ["services"]) == []


@pytest.mark.parametrize("service", SERVICES)
def test_a_service_never_imports_another_service(service):
    others = [f"services.{name}" for name in SERVICES if name != service]
    assert violations(f"services/{service}", others) == []


def test_the_check_sees_imports_at_any_depth_and_relative_ones(tmp_path):
    (tmp_path / "services" / "call_initiator").mkdir(parents=True)
    module = tmp_path / "services" / "call_initiator" / "_boundary_probe.py"
    module.write_text("def f():\n    from ..queue_processor import jobs\n    import services.webhook_receiver.app\n")
    forbidden = ["services.queue_processor", "services.webhook_receiver"]
    assert violations("services/call_initiator", forbidden, root=tmp_path) == [
        "services/call_initiator/_boundary_probe.py imports services.queue_processor",
        "services/call_initiator/_boundary_probe.py imports services.queue_processor.jobs",
        "services/call_initiator/_boundary_probe.py imports services.webhook_receiver.app",
    ]
