"""The nouns every layer shares are a leaf: engine_core/messages imports nothing else of
ours, and the layers below the engine (models/, kv_transfer/) reach engine_core only
through it, so no import cycle runs through them."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OURS = {"engine_core", "models", "kernels", "kv_transfer", "decode_workers", "prefill_workers",
        "frontend"}  # fmt: skip
LEAF = "engine_core.messages"


def imports(folder: str) -> Iterator[tuple[str, str]]:
    """(file, module) for every absolute import of ours under `folder`, lazy ones too."""
    for path in sorted((ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                if name.split(".")[0] in OURS:
                    yield str(path.relative_to(ROOT)), name


def outside_leaf(module: str) -> bool:
    return module != LEAF and not module.startswith(LEAF + ".")


def test_the_shared_nouns_import_nothing_else_of_ours() -> None:
    assert [(f, m) for f, m in imports("engine_core/messages") if outside_leaf(m)] == []


def test_models_and_kv_transfer_reach_the_engine_only_through_its_nouns() -> None:
    found = [(f, m) for folder in ("models", "kv_transfer") for f, m in imports(folder)]
    upward = [(f, m) for f, m in found if m.split(".")[0] not in {"models", "kernels",
              "kv_transfer", "engine_core"}]  # fmt: skip
    into_engine = [(f, m) for f, m in found if m.startswith("engine_core") and outside_leaf(m)]
    assert upward == [] and into_engine == []


def test_importing_the_nouns_loads_no_engine() -> None:
    probe = (
        "import sys, engine_core.messages.worker, engine_core.messages.frontend; "
        "print(sorted(m for m in sys.modules if m.startswith(('engine_core.', 'models', 'torch'))"
        " and not m.startswith('engine_core.messages')))"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
