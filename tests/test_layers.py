"""The layering of DESIGN.md holds: no module imports from a higher layer."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "purestore"
LAYER = {"formats": 1, "store": 2, "cache": 3, "expr": 4, "build": 5, "env": 6, "cli": 7}


def layer_of(parts: list[str]) -> int:
    # parts like ["purestore", "store", "local"]; top-level modules (errors, __init__) are layer 0
    if len(parts) >= 2 and parts[1] in LAYER:
        return LAYER[parts[1]]
    return 0


def imports(path: Path):
    mod_parts = ["purestore", *path.relative_to(PKG).with_suffix("").parts]
    if mod_parts[-1] == "__init__":
        mod_parts = mod_parts[:-1]
        pkg_parts = mod_parts
    else:
        pkg_parts = mod_parts[:-1]
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("purestore"):
                    yield node.lineno, a.name.split(".")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg_parts[: len(pkg_parts) - node.level + 1]
                target = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.startswith("purestore"):
                target = node.module.split(".")
            else:
                continue
            if len(target) == 1:  # from purestore import x
                for a in node.names:
                    yield node.lineno, target + [a.name]
            else:
                yield node.lineno, target


def test_no_module_imports_a_higher_layer():
    bad = []
    for path in PKG.rglob("*.py"):
        own = layer_of(["purestore", *path.relative_to(PKG).parts])
        for lineno, target in imports(path):
            if layer_of(target) > own:
                bad.append(f"{path.relative_to(PKG)}:{lineno} imports {'.'.join(target)}")
    assert not bad, "layering violated:\n" + "\n".join(bad)


def test_formats_layer_does_not_use_trio_or_the_file_system():
    for path in (PKG / "formats").rglob("*.py"):
        text = path.read_text()
        assert "import trio" not in text, path
        assert "import os\n" not in text and "from os " not in text, f"{path} walks the file system"
