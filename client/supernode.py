"""``flower-supernode`` with short polls, for sites whose tasks fedcare's executor runs.

flwr 1.41's SuperNode sleeps 3 s after every pull that brought no message and 0.5 s
between checks for a finished reply (``flwr.supernode.start_client_internal``); with a
warm executor those sleeps are most of a deployed round. This entry point caps the
sleeps of that one module at ``FEDCARE_SUPERNODE_POLL_S`` (default 0.25 s) and then
runs flwr's own ``flower-supernode`` unchanged (same arguments, same TLS, node auth and
retries). ``tests/test_flwr_internals.py`` fails when flwr changes what this relies on.

    python -m fedcare.client.supernode FLOWER-SUPERNODE-ARGS...
"""
from __future__ import annotations

import os
import time as _time

DEFAULT_POLL_S = 0.25


class ShortSleeps:
    """The ``time`` module, with ``sleep`` capped at ``cap`` seconds."""

    def __init__(self, cap: float):
        self.cap = cap

    def __getattr__(self, name):
        return getattr(_time, name)

    def sleep(self, seconds: float) -> None:
        _time.sleep(min(seconds, self.cap))


def main() -> None:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli.flower_supernode import flower_supernode

    start_client_internal.time = ShortSleeps(float(os.environ.get("FEDCARE_SUPERNODE_POLL_S", DEFAULT_POLL_S)))
    flower_supernode()


if __name__ == "__main__":
    main()
