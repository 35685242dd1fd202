"""The package's structure rules (developers' guide, Standards): each layer imports only downward
(kernels -> ops -> autograd -> modules -> integrations -> tools), and importing any module queries
no device (a CUDA query at import would initialise CUDA in every process that imports us, and fail
or pick the wrong device before the user sets one)."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lora_kernels"
LAYERS = ("kernels", "ops", "autograd", "modules", "integrations", "tools")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str):
    """The layer of a module of the package (its first subpackage; the compiled extension of csrc/,
    lora_kernels._C, is a kernel), or None for the top level."""
    parts = module.split(".")
    if parts[:2] == ["lora_kernels", "_C"]:
        return "kernels"
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def _imported_modules(tree: ast.AST):
    """(line, module) of every import of the package in a module, function bodies included."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            if name == "lora_kernels" or name.startswith("lora_kernels."):
                yield node.lineno, name


def _upward_imports(source: str, module: str) -> list:
    """Imports in ``source`` (of ``module``) of a higher layer, or of the top-level package from a layer
    below tools."""
    own = _layer(module)
    if own is None:
        return []
    found = []
    for line, name in _imported_modules(ast.parse(source)):
        target = _layer(name)
        # the top-level package sits just below tools: it imports the layers up to the integrations
        rank = LAYERS.index(target) if target is not None else LAYERS.index("tools") - 0.5
        if rank > LAYERS.index(own):
            found.append(f"{module}:{line} imports {name}")
    return found


def test_each_layer_imports_only_downward():
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 30 and {_layer(_module_name(p)) for p in modules} >= set(LAYERS)
    found = [hit for path in modules for hit in _upward_imports(path.read_text(), _module_name(path))]
    assert not found, "imports against the layer order:\n" + "\n".join(found)


@pytest.mark.parametrize("module, source, expected", [
    ("lora_kernels.ops.checks", "def f():\n    from lora_kernels.autograd import lora_linear\n", 1),
    ("lora_kernels.kernels.configs", "import lora_kernels.ops.launch\n", 1),
    ("lora_kernels.modules.lora_linear", "from lora_kernels import NF4Weight\n", 1),
    ("lora_kernels.integrations.peft", "from lora_kernels.modules.lora_linear import LoRALinear\n", 0),
    ("lora_kernels.ops.triton_launch", "from lora_kernels.ops import nf4_gemv\n", 0),
    ("lora_kernels.tools.bench", "from lora_kernels import lora_linear\n", 0),
    ("lora_kernels.ops.nf4_gemv", "def load():\n    import lora_kernels._C\n", 0),
    ("lora_kernels.integrations.peft", "import lora_kernels\n", 1),
])
def test_the_layer_check_finds_upward_imports(module, source, expected):
    assert len(_upward_imports(source, module)) == expected


# Run in a fresh interpreter: torch.cuda's queries are wrapped to record calls made from the package's
# own files, then every module of the package is imported.
_IMPORT_ALL = r"""
import importlib, json, pkgutil, sys, traceback
from pathlib import Path
import torch
package_dir = str(Path(sys.argv[1]).resolve())
calls = []
def recording(name, fn):
    def wrapper(*args, **kwargs):
        frame = sys._getframe(1)
        while frame is not None:
            if str(Path(frame.f_code.co_filename).resolve()).startswith(package_dir):
                calls.append(f"{name} from {frame.f_code.co_filename}:{frame.f_lineno}")
                break
            frame = frame.f_back
        return fn(*args, **kwargs)
    return wrapper
for name in ("is_available", "device_count", "current_device", "get_device_capability", "get_device_properties",
             "get_device_name", "init", "mem_get_info"):
    setattr(torch.cuda, name, recording(f"torch.cuda.{name}", getattr(torch.cuda, name)))
import lora_kernels
names = ["lora_kernels"] + [info.name for info in pkgutil.walk_packages(lora_kernels.__path__, "lora_kernels.")]
failed = []
for name in names:
    if name == "lora_kernels.__main__":
        continue
    try:
        importlib.import_module(name)
    except Exception:
        failed.append(name + ": " + traceback.format_exc(limit=3))
print(json.dumps({"modules": len(names), "calls": calls, "failed": failed}))
"""


def test_importing_any_module_queries_no_device():
    run = subprocess.run([sys.executable, "-c", _IMPORT_ALL, str(PACKAGE)], capture_output=True, text=True,
                         timeout=600, cwd=PACKAGE.parent)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["modules"] > 30
    assert not result["failed"], "\n".join(result["failed"])
    assert not result["calls"], "device queries at import:\n" + "\n".join(result["calls"])
