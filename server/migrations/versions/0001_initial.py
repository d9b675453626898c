"""initial schema: runs, rounds, site rounds, evaluations, global states, events

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("run_id", sa.String(64), primary_key=True),
        sa.Column("task", sa.String(128), nullable=False),
        sa.Column("strategy", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("config", JSON, nullable=False),
        sa.Column("code_version", sa.String(128), nullable=False),
        sa.Column("rounds_planned", sa.Integer, nullable=True),
        sa.Column("num_sites", sa.Integer, nullable=True),
        sa.Column("seed", sa.Integer, nullable=True),
        sa.Column("dp", sa.String(64), nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("started_at", sa.Double, nullable=True),
        sa.Column("ended_at", sa.Double, nullable=True),
        sa.Column("message", sa.Text, nullable=False),
    )
    op.create_table(
        "rounds",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(64), sa.ForeignKey("runs.run_id", ondelete="CASCADE"), nullable=False),
        sa.Column("round", sa.Integer, nullable=False),
        sa.Column("started_at", sa.Double, nullable=False),
        sa.Column("ended_at", sa.Double, nullable=False),
        sa.Column("num_sites", sa.Integer, nullable=False),
        sa.Column("num_accepted", sa.Integer, nullable=False),
        sa.Column("metrics", JSON, nullable=False),
        sa.Column("fairness", JSON, nullable=True),
        sa.UniqueConstraint("run_id", "round", name="uq_rounds_run_round"),
    )
    op.create_table(
        "site_rounds",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("round", sa.Integer, nullable=False),
        sa.Column("site", sa.String(128), nullable=False),
        sa.Column("node_id", sa.String(24), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("num_examples", sa.Integer, nullable=False),
        sa.Column("train_loss", sa.Double, nullable=True),
        sa.Column("update_bytes", sa.BigInteger, nullable=False),
        sa.Column("duration_s", sa.Double, nullable=True),
        sa.Column("metrics", JSON, nullable=False),
        sa.Column("privacy", JSON, nullable=True),
        sa.Column("epsilon", sa.Double, nullable=True),
        sa.Column("run_epsilon", sa.Double, nullable=True),
        sa.Column("delta", sa.Double, nullable=True),
        sa.Column("budget", sa.Double, nullable=True),
        sa.UniqueConstraint("run_id", "round", "site", name="uq_site_rounds_run_round_site"),
        sa.ForeignKeyConstraint(["run_id", "round"], ["rounds.run_id", "rounds.round"],
                                ondelete="CASCADE", name="fk_site_rounds_round"),
    )
    op.create_table(
        "evaluations",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("round", sa.Integer, nullable=False),
        sa.Column("scope", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("num_examples", sa.Integer, nullable=False),
        sa.Column("metrics", JSON, nullable=False),
        sa.UniqueConstraint("run_id", "round", "scope", "kind", name="uq_evaluations_run_round_scope_kind"),
        sa.ForeignKeyConstraint(["run_id", "round"], ["rounds.run_id", "rounds.round"],
                                ondelete="CASCADE", name="fk_evaluations_round"),
    )
    op.create_table(
        "global_states",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("round", sa.Integer, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("nbytes", sa.BigInteger, nullable=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
        sa.UniqueConstraint("run_id", "round", name="uq_global_states_run_round"),
        sa.ForeignKeyConstraint(["run_id", "round"], ["rounds.run_id", "rounds.round"],
                                ondelete="CASCADE", name="fk_global_states_round"),
    )
    op.create_table(
        "events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(64), sa.ForeignKey("runs.run_id", ondelete="CASCADE"), nullable=False),
        sa.Column("time", sa.Double, nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("data", JSON, nullable=True),
    )


def downgrade() -> None:
    for table in ("events", "global_states", "evaluations", "site_rounds", "rounds", "runs"):
        op.drop_table(table)
