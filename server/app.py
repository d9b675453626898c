"""fedcare's ServerApp: read the run configuration and hand it to the federation loop."""
from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedcare.config import RunConfig

from .federation import run_federation

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = RunConfig.from_flat(context.run_config, strict=False).validate()
    run_federation(grid, cfg)
