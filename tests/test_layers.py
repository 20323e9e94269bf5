"""Import boundaries, checked: the layers of ../shared/DESIGN.md import only downwards, and ``math``, ``types``
and ``formats`` (with the ``nn`` modules the codec rebuilds) work in a process where transformers cannot be
imported at all."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "slimquant"

# Top to bottom; a package may import only packages below it. Where this differs from DESIGN.md: ``models``
# sits above ``formats`` (loading a checkpoint is one of the ways to load a model, so models reads the codec),
# and ``data`` (calibration text) sits just below the API.
ORDER = ["cli", "api", "search", "pipeline", "data", "models", "formats", "eval", "surgery", "nn", "algorithms",
         "observers", "kernels", "adapters", "math", "types", "errors"]  # fmt: skip


def _imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names]
    return out


def _package(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "slimquant" and len(parts) > 1 else None


def test_every_package_is_placed_in_the_order():
    packages = {p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    modules = {p.stem for p in SRC.glob("*.py")} - {"__init__", "__main__"}
    assert packages | modules == set(ORDER)


def test_imports_point_down_the_layers():
    upward = []
    for f in SRC.rglob("*.py"):
        rel = f.relative_to(SRC)
        me = rel.parts[0].removesuffix(".py")
        if me in ("__init__", "__main__"):
            continue
        for name in _imports(f):
            other = _package(name)
            if other is None or other == me:
                continue
            if ORDER.index(other) < ORDER.index(me):
                upward.append(f"{rel} imports {name}")
    assert upward == []


WITHOUT_TRANSFORMERS = r"""
import sys

class _Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("transformers", "accelerate"):
            raise ImportError(f"{name} is blocked in this test")
        return None

sys.meta_path.insert(0, _Refuse())
import torch
from torch import nn
import slimquant
from slimquant import Recipe, QuantSpec
from slimquant.formats import msmodelslim
from slimquant.math import quant  # noqa: F401
from slimquant.types import Granularity  # noqa: F401

torch.manual_seed(0)
def net():
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
m = net()
x = torch.randn(3, 32)
result = slimquant.quantize(m, Recipe(weight=QuantSpec("int4", "per_group", 32, symmetric=False)), show_progress=False)
slimquant.save(result, sys.argv[1])
back = slimquant.load(sys.argv[1], model=net()).model
assert torch.equal(back(x), m(x))
print(slimquant.formats.msmodelslim.describe_checkpoint(sys.argv[1])["quant_type"])
assert not any(k.split(".")[0] == "transformers" for k in sys.modules)
"""


def test_quantize_save_load_of_a_plain_module_without_transformers(tmp_path):
    p = subprocess.run([sys.executable, "-c", WITHOUT_TRANSFORMERS, str(tmp_path / "q")], capture_output=True,
                       text=True, timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip().splitlines()[-1] == "w4a16"
