"""fedcare's ServerApp: read the run configuration and hand it to the federation loop."""
from __future__ import annotations

import logging
import sys

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedcare.config import RunConfig

from .federation import run_federation

app = ServerApp()
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = RunConfig.from_flat(context.run_config, strict=False).validate()
    run_federation(grid, cfg)
