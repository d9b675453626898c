"""Privacy accounting lives in one module (fedcare/accounting.py) that the site's ledger
and the server's client-level DP both use: strategies/ no longer imports client/, so
the client -> strategies -> client import cycle is gone."""
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
