"""``BeaconCache`` owns its state transitions (docs/design.md §3): no other module of the package writes a cache's
fields or calls its private members; and ``model`` / ``generation``, ``ask`` / ``cli`` import without a cycle.

Both checks read the source with ``ast``, so they cover code paths no behavioural test reaches.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from beacon_llm.cache import BeaconCache, _State
from beacon_llm.config import BeaconConfig

PACKAGE = Path(__file__).resolve().parent.parent / "beacon_llm"

# Names that hold a BeaconCache or its state outside cache.py (`stepped`: the cache a progress callback receives); an
# attribute named `cache` (`entry.cache`, `out.cache`) is one too. (`x.state` alone is not: optimizers and apps have
# one; a cache state's fields are caught by name.)
CACHE_NAMES = {"cache", "st", "stepped"}
CACHE_ATTRS = {"cache"}
# Fields that only a cache or its state has; generic ones (config, generator, trace, ...) are left to the rules above.
_GENERIC = {"config", "num_layers", "generator", "trace", "state"}
FIELDS = {f.name for f in dataclasses.fields(_State)} | {
    name for name in vars(BeaconCache(BeaconConfig(), 1)) if not name.startswith("_") and name not in _GENERIC
}
MUTATORS = {"append", "extend", "insert", "pop", "remove", "clear", "update", "setdefault", "popitem", "sort", "add"}


def _chain(node: ast.expr) -> tuple[ast.expr, list[str]]:
    """The root of an attribute / subscript chain and its attribute names, outermost last (``getattr(x, n)``
    counts as an access on ``x``)."""
    attrs: list[str] = []
    while True:
        if isinstance(node, ast.Attribute):
            attrs.append(node.attr)
            node = node.value
        elif isinstance(node, (ast.Subscript, ast.Starred)):
            node = node.value
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "vars")
            and node.args
        ):
            attrs.append("<dynamic>")
            node = node.args[0]
        else:
            return node, attrs[::-1]


def _inside_cache(node: ast.expr) -> bool:
    """``node`` is a cache, or something a cache holds (its state, a field, an element of one)."""
    root, attrs = _chain(node)
    if isinstance(root, ast.Name) and root.id == "self":
        return False  # outside cache.py, `self` is never a cache
    if isinstance(root, ast.Name) and root.id in CACHE_NAMES:
        return True
    return any(a in CACHE_ATTRS or a in FIELDS for a in attrs)


def _writes_cache(target: ast.expr) -> bool:
    """Assigning to / deleting ``target`` changes a cache (rebinding a plain name never does)."""
    if isinstance(target, (ast.Tuple, ast.List)):
        return any(_writes_cache(t) for t in target.elts)
    if isinstance(target, ast.Starred):
        return _writes_cache(target.value)
    if isinstance(target, ast.Name):
        return False
    root, attrs = _chain(target)
    if isinstance(root, ast.Name) and root.id == "self":
        return False
    if isinstance(root, ast.Name) and root.id in CACHE_NAMES:
        return True
    if isinstance(target, ast.Attribute) and target.attr in CACHE_ATTRS and not any(a in FIELDS for a in attrs):
        return _inside_cache(target.value)  # `entry.cache = c` rebinds the entry's reference
    return any(a in CACHE_ATTRS or a in FIELDS for a in attrs)


def violations(source: str, filename: str = "<source>") -> list[str]:
    """Every write to a cache, private cache access, or in-place change of a cache's contents in ``source``."""
    found: list[str] = []

    def flag(node: ast.AST, what: str) -> None:
        found.append(f"{filename}:{node.lineno}: {what}: {ast.unparse(node).splitlines()[0]}")

    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        elif isinstance(node, ast.Delete):
            targets = node.targets
        else:
            targets = []
        if any(_writes_cache(t) for t in targets):
            flag(node, "writes a cache field")
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            if _inside_cache(node.value):
                flag(node, "uses a private cache member")
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute) and (func.attr in MUTATORS or func.attr.endswith("_")):
                _, attrs = _chain(func.value)
                if (attrs or not isinstance(func.value, ast.Name)) and _inside_cache(func.value):
                    flag(node, "changes a cache's contents in place")
            if isinstance(func, ast.Name) and func.id in ("setattr", "delattr") and node.args:
                if _inside_cache(node.args[0]):
                    flag(node, "sets a cache attribute")
    return found


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name != "cache.py")


@pytest.mark.parametrize(
    "code",
    [
        "cache._snapshot()",
        "cache._restore(snap)",
        "cache.fingerprint = fp",
        "st.pending = []",
        "st.n_seen += n",
        "cache.state.pending = [t]",
        "cache.last_logits = None",
        "cache.win_k, cache.win_v, st.window_flags = a, b, c",
        "cache.mem_k[i] = k",
        "st.window_sizes.append(3)",
        "cache.trace.append(step)",
        "getattr(cache, name)[:] = tensors",
        "cache.generator.bit_generator.state = g",
        "ratio, st.fixed_ratio = pick()",
        "ratio = st.window_ratio = r",
        "entry.cache.last_logits = x",
        "out.cache.state.n_seen = 0",
        "loaded.state.window_sizes = []",
        "stepped.mem_k[0].mul_(2)",
        "setattr(cache, 'mem_k', x)",
        "del cache.trace[n:]",
        "entry.cache._lock.acquire()",
    ],
)
def test_the_checker_catches_writes(code):
    assert violations(code), code


@pytest.mark.parametrize(
    "code",
    [
        "cache = bm.new_cache()",
        "n = cache.state.n_seen + len(cache.state.pending)",
        "cache.set_pending(token)",
        "cache.append_raw_memory(k, v, n)",
        "entry.cache = cache.fork()",
        "state.step += 1",
        "self.generator = generator",
        "optimizer.state[p] = state",
        "app.state.server = server",
        "self._entries[key] = entry",
        "bm._fingerprint()",
        "x = cache.mem_k[0]",
        "with cache.transaction():\n    pass",
    ],
)
def test_the_checker_allows_reads_and_methods(code):
    assert not violations(code), code


def test_only_the_cache_changes_its_state():
    found = [v for path in _modules() for v in violations(path.read_text(), str(path.relative_to(PACKAGE.parent)))]
    assert not found, "modules outside cache.py change a BeaconCache directly:\n" + "\n".join(found)


# ---------------------------------------------------------------------- import cycles
def _runtime_imports(path: Path) -> set[str]:
    """The package modules ``path`` imports when run: module and function level, not ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text())
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module is None:  # from . import x: a submodule, or a name of the package
                names = [a.name if a.name in modules else "__init__" for a in node.names]
            else:
                names = [node.module.split(".")[0]]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("beacon_llm"):
            parts = node.module.split(".")
            names = [parts[1]] if len(parts) > 1 else ["__init__"]
        elif isinstance(node, ast.Import):
            names = [a.name.split(".")[1] for a in node.names if a.name.startswith("beacon_llm.")]
        out.update(n for n in names if n in modules)
    return out


def _reaches(graph: dict[str, set[str]], start: str, goal: str) -> list[str] | None:
    """An import path start -> ... -> goal, or None."""
    stack, seen = [[start]], {start}
    while stack:
        path = stack.pop()
        for nxt in sorted(graph.get(path[-1], ())):
            if nxt == goal:
                return [*path, nxt]
            if nxt not in seen:
                seen.add(nxt)
                stack.append([*path, nxt])
    return None


MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("module", MODULES)
def test_no_import_cycle_through(module):
    graph = {p.stem: _runtime_imports(p) for p in PACKAGE.glob("*.py")}
    assert "generation" in graph["model"] and "cli_errors" in graph["ask"]  # the graph is read at all
    cycle = _reaches(graph, module, module)
    assert cycle is None, " -> ".join(cycle)
