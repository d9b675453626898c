"""indices for the dashboard's and listings' queries (runs by time; per-site series;
per-scope evaluation series; events in time order)

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""
from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

INDICES = (
    ("ix_runs_created_at", "runs", ["created_at"]),
    ("ix_site_rounds_run_site_round", "site_rounds", ["run_id", "site", "round"]),
    ("ix_evaluations_run_scope_kind_round", "evaluations", ["run_id", "scope", "kind", "round"]),
    ("ix_events_run_time", "events", ["run_id", "time"]),
)


def upgrade() -> None:
    for name, table, columns in INDICES:
        op.create_index(name, table, columns)


def downgrade() -> None:
    for name, table, _ in INDICES:
        op.drop_index(name, table_name=table)
