"""The import graph as the design draws it (/work/shared/DESIGN.md, "Rooms"): no cycle
among fedcare's own modules, each room importing only what it may, no site module
reaching the server's store, no ``__getattr__`` read-through. Privacy accounting lives
in one module (fedcare/accounting.py) that the site's ledger and the server's
client-level DP both use."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_strategies_do_not_import_the_client():
    offenders = {str(p.relative_to(ROOT)): sorted(m for m in _imports(p) if m.startswith("fedcare.client"))
                 for p in (ROOT / "strategies").glob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_one_accountant_for_both_levels():
    from fedcare import accounting
    from fedcare.client import ledger
    from fedcare.strategies import client_dp

    assert ledger.epsilon_of is accounting.epsilon_of is client_dp.epsilon_of


# ------------------------------------------------------------- the design's rooms
# fedcare's own packages: folder -> dotted name (pyproject's package-dir)
PACKAGES = {"fedcare": "fedcare", "server": "fedcare.server", "client": "fedcare.client",
            "strategies": "fedcare.strategies", "models": "fedcare.models", "dashboard": "fedcare.dashboard"}

# /work/shared/DESIGN.md, "Rooms": room -> what none of its modules may import (directly,
# at module level or inside a function), and why.
FORBIDDEN = {
    "fedcare.models": (("flwr", "sqlalchemy", "fedcare.server", "fedcare.client"),
                       "task families know no Flower message and no SQL"),
    "fedcare.strategies": (("fedcare.client", "fedcare.server", "fedcare.dashboard", "flwr", "sqlalchemy",
                            "os", "pathlib", "shutil", "subprocess", "socket"),
                           "aggregation is functions of decoded states: no I/O, Flower's strategies only in tests"),
    "fedcare.dashboard": (("fedcare.client",), "the dashboard reads the store, it never asks a site"),
    "fedcare.client": (("fedcare.server.store", "fedcare.server.queries", "fedcare.server.migrations",
                        "sqlalchemy"), "a site never touches the server's store"),
}
# Known violations, each (importer, imported), listed so that the test fails on any new one
# (none today; the known lists below only shrink: a fixed one needs no edit here).
KNOWN_FORBIDDEN: set[tuple[str, str]] = set()
# What a site's process may reach through any chain of imports must not hold the store.
# Known: the SuperExec executor takes resolve_config from fedcare.launch, the top layer
# that also opens the store (issue 21: resolve_config should only layer task defaults,
# below the CLI); listed so that any other path from client/ to the store fails.
KNOWN_STORE_REACH = {"fedcare.client.executor"}
STORE = ("fedcare.server.store", "fedcare.server.queries", "fedcare.server.migrations", "sqlalchemy")
# ``__getattr__`` read-throughs forward unknown names to another object (one once skipped
# client-level DP noise). Known, outside strategies/: time-module stand-in for flwr's
# SuperNode sleeps, and the dashboard's cached queries.
KNOWN_GETATTR = {"fedcare.client.supernode", "fedcare.dashboard.common"}


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


MODULES = _modules()


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """Dotted names an import statement in ``module`` loads (a module, or the package
    whose attribute it takes)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
        package = package[:len(package) - node.level + 1]
        base = ".".join(package + ([node.module] if node.module else []))
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


def _module_imports(module: str, module_level_only: bool) -> set[str]:
    """What ``module`` imports: at module level only (what importing it runs), or
    everywhere; ``if TYPE_CHECKING:`` blocks are not imports at run time."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) and module_level_only:
                continue
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.update(_targets(module, child))
            visit(child)

    visit(ast.parse(MODULES[module].read_text()))
    return found


def _within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_no_import_cycle_among_fedcares_modules():
    """Importing any module of fedcare's own never comes back to itself (module-level
    imports, the ones that run on import; Tarjan's strongly connected components)."""
    graph = {m: sorted(i for i in _module_imports(m, True) if i in MODULES and i != m) for m in MODULES}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            strong(v)
    assert cycles == []
    assert len(MODULES) > 50 and sum(map(len, graph.values())) > 100   # the graph was read


def test_each_room_imports_only_what_the_design_allows():
    found = {(m, i) for m in MODULES for room, (banned, _) in FORBIDDEN.items() if _within(m, [room])
             for i in _module_imports(m, False) if _within(i, banned)}
    assert found - KNOWN_FORBIDDEN == set(), {room: why for room, (_, why) in FORBIDDEN.items()}


def test_no_site_module_reaches_the_servers_store():
    everything = {m: _module_imports(m, False) for m in MODULES}
    reaching = set()
    for start in (m for m in MODULES if _within(m, ["fedcare.client"])):
        seen, todo = set(), [start]
        while todo:
            for w in everything.get(todo.pop(), ()):
                if w not in seen:
                    seen.add(w)
                    todo += [w] if w in MODULES else []
        if any(_within(w, STORE) for w in seen):
            reaching.add(start)
    assert reaching <= KNOWN_STORE_REACH


def test_no_getattr_read_through():
    defining = {m for m, path in MODULES.items() for node in ast.walk(ast.parse(path.read_text()))
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == "__getattr__"}
    assert defining <= KNOWN_GETATTR
