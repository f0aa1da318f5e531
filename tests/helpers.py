"""What several test files share: the repository root, loading a tool script, and the
published facts of the five RedNets (docs/reference.md), each written once."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
# The bundled configs (package data; `--config NAME` finds them from any directory).
CONFIGS = ROOT / "rednet" / "configs"

# Blocks per stage of each released variant.
DEPTHS = {
    "rednet26": (1, 2, 4, 1),
    "rednet38": (2, 3, 5, 2),
    "rednet50": (3, 4, 6, 3),
    "rednet101": (3, 4, 23, 3),
    "rednet152": (3, 8, 36, 3),
}
# Exact parameter counts of the released architecture (1000 classes) and the paper's
# GFLOPs column (multiply-accumulates at 224x224).
PARAMS = {"rednet26": 9_233_166, "rednet38": 12_386_986, "rednet50": 15_540_806, "rednet101": 25_652_950,
          "rednet152": 33_984_582}
PAPER_GMACS = {"rednet26": 1.73, "rednet38": 2.22, "rednet50": 2.71, "rednet101": 4.74, "rednet152": 6.79}


def load_tool(name: str) -> ModuleType:
    """Import ``tools/<name>.py`` (the tools are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
