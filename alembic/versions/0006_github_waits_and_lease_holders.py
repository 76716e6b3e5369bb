"""GitHub's rate-limit waits shared by every process; who holds a lease, and since when; where a pass resumes

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06 00:45:00

`github_waits` holds, per credential (a key without secret: `installation:<id>`, `app:<id>`,
`token:<sha256 prefix>`), until when GitHub asked it to send nothing, so serve's files worker and
an operator's `recover` or `backfill` on any VM honour the same wall. `leases` gains
`holder_name` and `taken_at`, so `recover` can say who runs recovery and since when.
`webhook_hooks` gains `resume_url` and `resume_newer_than`: where a pass that stopped at its page
bound goes on reading a long log next time, so nothing is skipped. A new table
keyed by its primary key only, and nullable columns without default (no table rewrite):
PostgreSQL 11 syntax.
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "github_waits",
        sa.Column("credential", sa.Text(), nullable=False),
        sa.Column("wait_until", sa.TIMESTAMP(timezone=True), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("updated_at", sa.TIMESTAMP(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("credential", name=op.f("pk_github_waits")),
    )
    op.add_column("leases", sa.Column("holder_name", sa.Text(), nullable=True))
    op.add_column("leases", sa.Column("taken_at", sa.TIMESTAMP(timezone=True), nullable=True))
    op.add_column("webhook_hooks", sa.Column("resume_url", sa.Text(), nullable=True))
    op.add_column("webhook_hooks", sa.Column("resume_newer_than", sa.TIMESTAMP(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("webhook_hooks", "resume_newer_than")
    op.drop_column("webhook_hooks", "resume_url")
    op.drop_column("leases", "taken_at")
    op.drop_column("leases", "holder_name")
    op.drop_table("github_waits")
