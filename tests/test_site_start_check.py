"""``fedcare site start`` checks a family site's folder against the run's data contract
(``--set``) before joining, and creates its ledger's folder."""
import pytest
from typer.testing import CliRunner

from fedcare.cli import app
from fedcare.errors import ConfigError
from fedcare.server.deploy import check_site_data

from sitefolders import heart_parquet

CONTRACT = ("data.labels=no disease,disease", "data.features=age,sex,thalach")


def test_a_family_site_is_checked_against_the_contract_given_with_set(tmp_path):
    folder = heart_parquet(tmp_path / "cleveland")
    assert check_site_data("tabular", folder, "cleveland", CONTRACT) == 199
    with pytest.raises(ConfigError, match="data.labels"):     # no contract: said so, not a traceback
        check_site_data("tabular", folder, "cleveland")


def test_site_start_creates_the_ledger_folder_and_takes_the_contract(tmp_path):
    folder = heart_parquet(tmp_path / "cleveland")
    ledger = tmp_path / "new" / "ledgers" / "cleveland.sqlite"
    out = CliRunner().invoke(app, [
        "site", "start", "--site-id", "cleveland", "--data", str(folder), "--superlink", "127.0.0.1:1",
        "--root-cert", str(tmp_path / "missing-ca.pem"), "--node-key", str(tmp_path / "missing.key"),
        "--ledger", str(ledger), "--task", "tabular", *(x for s in CONTRACT for x in ("--set", s))])
    assert out.exit_code != 0 and "No such option" not in out.output, out.output   # stops at the missing CA
    assert ledger.parent.is_dir()
