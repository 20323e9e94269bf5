"""Import boundaries, checked rather than stated: each package imports only the layers below it (docs/architecture.md),
and the pure layers and the checkpoint formats import without transformers."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "slimquant"

# package -> the slimquant packages it may import (besides itself and slimquant.errors)
ALLOWED: dict[str, set[str]] = {
    "types": set(),
    "math": {"types"},
    "kernels": {"types", "math"},
    "observers": {"types", "math"},
    "adapters": set(),
    "data": set(),
    "nn": {"types", "math", "kernels"},
    "surgery": {"nn", "adapters"},
    "formats": {"types", "math", "kernels", "nn", "surgery", "adapters"},
    "algorithms": {"types", "math", "kernels", "observers", "adapters", "nn"},
    "eval": {"types", "math", "kernels", "nn"},
    "pipeline": {"types", "math", "kernels", "observers", "adapters", "nn", "surgery", "formats", "algorithms", "data"},
    "models": {"types", "nn", "surgery", "adapters", "formats"},
    "search": {"types", "math", "kernels", "observers", "adapters", "nn", "surgery", "formats", "algorithms", "data",
               "pipeline", "eval", "models"},
}
# packages that must import with transformers (and accelerate) absent
NO_TRANSFORMERS = ["slimquant.types", "slimquant.math", "slimquant.kernels", "slimquant.nn", "slimquant.formats",
                   "slimquant.formats.msmodelslim", "slimquant.observers"]  # fmt: skip


def slimquant_imports(path: Path) -> set[str]:
    """The slimquant packages a file imports (``slimquant.<package>``), wherever in the file."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                raise AssertionError(f"{path}: relative import; use absolute slimquant imports")
            names = [node.module or ""]
            if node.module == "slimquant":
                names = [f"slimquant.{a.name}" for a in node.names]
        for n in names:
            parts = n.split(".")
            if parts[0] == "slimquant" and len(parts) > 1:
                out.add(parts[1])
    return out


def violations(root: Path, allowed: dict[str, set[str]]) -> list[str]:
    bad = []
    for package, ok in allowed.items():
        for path in sorted((root / package).rglob("*.py")):
            for used in slimquant_imports(path) - ok - {package, "errors"}:
                bad.append(f"{path.relative_to(root)} imports slimquant.{used}")
    return bad


def test_every_package_imports_only_the_layers_below_it():
    assert violations(SRC, ALLOWED) == []


def test_the_check_catches_an_upward_import(tmp_path):
    (tmp_path / "math").mkdir()
    (tmp_path / "math" / "ok.py").write_text("from slimquant.types.spec import QuantSpec\nimport torch\n")
    (tmp_path / "math" / "bad.py").write_text("def f():\n    from slimquant.pipeline import convert\n")
    (tmp_path / "math" / "worse.py").write_text("from slimquant import api\n")
    assert violations(tmp_path, {"math": {"types"}}) == ["math/bad.py imports slimquant.pipeline",
                                                         "math/worse.py imports slimquant.api"]  # fmt: skip


BLOCK = """
import sys
class _Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("transformers", "accelerate"):
            raise ImportError(f"{name} is blocked in this test")
        return None
sys.meta_path.insert(0, _Refuse())
import importlib
importlib.import_module(sys.argv[1])
loaded = sorted(k for k in sys.modules if k.split(".")[0] in ("transformers", "accelerate"))
assert not loaded, loaded
"""


@pytest.mark.parametrize("module", NO_TRANSFORMERS)
def test_imports_without_transformers(module):
    p = subprocess.run([sys.executable, "-c", BLOCK, module], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]


def test_the_transformers_check_can_fail():
    p = subprocess.run([sys.executable, "-c", BLOCK, "slimquant.nn.kv_cache_layers"], capture_output=True, text=True,
                       timeout=120)  # fmt: skip
    assert p.returncode != 0 and "transformers" in p.stderr
