"""The package's imports run one way: utilities <- engine <- ragged cache <- methods <- integration <-
registry, generation, CLI, eval, benchmarks. Checked on the source (lazy imports inside functions too)."""
from __future__ import annotations

import ast
from pathlib import Path

import tca_attention

ROOT = Path(tca_attention.__file__).parent
# rank of each top-level part; a module may import only parts of lower or equal rank
RANK = {
    "paths": 0, "introspect": 0, "clihelp": 0, "data": 0, "layer_probe_plot": 0,
    "engine": 1,
    "ragged_cache": 2, "static_cache": 2,
    "methods": 3,
    "integration": 4,
    "registry": 5, "generation": 5, "models": 5,
    "cli": 6, "bench": 6, "eval": 6, "benchmarks": 6, "__init__": 7,
}


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path, top: Path = ROOT.parent) -> list[str]:
    """Absolute tca_attention modules (and imported names) imported anywhere in the file."""
    package = list(path.relative_to(top).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod == "tca_attention" or mod.startswith("tca_attention."):
                # "from . import x" may import a submodule: count each name too
                names = [f"{mod}.{a.name}" for a in node.names]
                found += names if mod == "tca_attention" else [mod, *names]
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("tca_attention")]
    return found


def _modules() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.py"))


def test_imports_run_one_way():
    bad = []
    for path in _modules():
        me = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
        mine = RANK[_part(me)]
        for mod in _imports(path):
            theirs = RANK.get(_part(mod), 99)
            if theirs > mine:
                bad.append(f"{me} imports {mod}")
    assert not bad, "\n".join(bad)


def test_engine_imports_no_method_and_no_transformers():
    for path in (ROOT / "engine").glob("*.py"):
        src = path.read_text()
        assert "methods" not in " ".join(_imports(path)), path.name
        assert "import transformers" not in src and "from transformers" not in src, path.name


def test_methods_do_not_import_each_other():
    """A peer is one file on the engine: it may use base.py, state.py, head_kinds.py (per-head
    kinds as plans), decode_tokens.py (token-level decode selections of the decode-side peers) and
    compose.py (what the attention calibrators share), never another method."""
    shared = {"base", "state", "head_kinds", "decode_tokens", "compose"}
    for path in (ROOT / "methods").glob("*.py"):
        if path.stem in shared | {"__init__"}:
            continue
        for mod in _imports(path):
            parts = mod.split(".")
            if len(parts) > 2 and parts[1] == "methods":
                assert parts[2] in shared, f"{path.name} imports {mod}"


def test_checker_sees_a_violation(tmp_path):
    """The scanner itself: an upward import is found (the rule could fail)."""
    p = tmp_path / "tca_attention" / "engine" / "probe.py"
    p.parent.mkdir(parents=True)
    p.write_text("def f():\n    from ..methods import base\n")
    found = _imports(p, tmp_path)
    assert "tca_attention.methods.base" in found
    assert max(RANK[_part(m)] for m in found) > RANK["engine"]
