"""The import rules of ARCHITECTURE.md, read from the source (every import statement, at module level or inside a
function) and checked against what really loads.

- client (spinquant_client) and quant_core import nothing else of the project;
- service imports quant_core's torch-free modules only, and no web framework, task code or torch;
- api imports service and quant_core's torch-free modules, never worker or the client;
- worker imports service, and quant_core only inside functions (torch and CUDA load in the forked child).
"""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from quant_core import TORCH_FREE
from tests.conftest import ROOT

PROJECT = {"quant_core", "service", "api", "worker", "spinquant_client", "scripts", "tests", "bench"}
PACKAGES = {"quant_core": ROOT / "quant_core", "service": ROOT / "service", "api": ROOT / "api",
            "worker": ROOT / "worker", "spinquant_client": ROOT / "client" / "spinquant_client"}


def imports(package: str) -> list[tuple[str, str, bool]]:
    """(file, imported module, at module level) for every import in a package, relative ones made absolute."""
    out = []
    root = PACKAGES[package]
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).with_suffix("")
        here = [package, *rel.parts[:-1]]  # the package a module (or __init__) belongs to
        tree = ast.parse(path.read_text())
        top_level = {id(n) for n in tree.body} | {id(n) for s in tree.body if isinstance(s, ast.If) for n in s.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # from . import x / from ..db import y
                    anchor = here[: len(here) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                names = [base] if node.module or not node.level else [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            out += [(str(path.relative_to(ROOT)), n, id(node) in top_level) for n in names]
    return out


def project_imports(package: str) -> set[str]:
    return {m for _, m, _ in imports(package) if m.split(".")[0] in PROJECT and m.split(".")[0] != package}


def test_the_scanner_sees_relative_and_lazy_imports() -> None:
    # a check on the checker: api/crud.py's relative import and worker/tasks.py's function-level imports
    found = imports("api") + imports("worker")
    assert ("api/crud.py", "api.schemas", True) in found
    assert ("worker/tasks.py", "quant_core.pipeline", False) in found


@pytest.mark.parametrize("package", ["spinquant_client", "quant_core"])
def test_client_and_core_import_nothing_else_of_the_project(package: str) -> None:
    assert project_imports(package) == set()


@pytest.mark.parametrize("package", ["service", "api"])
def test_service_and_api_use_only_the_torch_free_core(package: str) -> None:
    allowed = {f"quant_core.{m}" for m in TORCH_FREE}
    core = {m for m in project_imports(package) if m.startswith("quant_core")}
    assert core <= allowed, core - allowed
    others = {m.split(".")[0] for m in project_imports(package)} - {"quant_core", "service"}
    assert others == set(), others
    heavy = {m for _, m, _ in imports(package) if m.split(".")[0] in {"torch", "transformers", "datasets"}}
    assert heavy == set()
    if package == "service":
        assert {m for _, m, _ in imports(package) if m.split(".")[0] in {"fastapi", "starlette", "uvicorn"}} == set()


def test_worker_imports_service_and_the_core_only_lazily() -> None:
    found = imports("worker")
    assert {m.split(".")[0] for _, m, _ in found if m.split(".")[0] in PROJECT} == {"service", "quant_core", "worker"}
    eager_core = sorted((f, m) for f, m, top in found if m.startswith("quant_core") and top)
    assert eager_core == []


def test_torch_free_core_modules_load_without_torch() -> None:
    mods = ", ".join(f"quant_core.{m}" for m in TORCH_FREE)
    code = (f"import sys, {mods}, service.settings, service.db, service.queue, service.live, service.sources, "
            "service.storage, service.storage.s3; "
            "print(sorted(m for m in ('torch', 'transformers', 'fastapi', 'celery.app.task') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


def test_scripts_are_not_packaged() -> None:
    import tomllib

    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    assert not any(p.startswith(("scripts", "tests", "bench", "client")) for p in include)
