"""files enrichment: the PR's file-list status and the files worker's queue

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29 17:10:00

Adds columns to a live table (nullable, no default: no rewrite, no long lock) and
a new table whose index is built while the table is still empty.
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

FILES_STATUS = "'pending', 'fetched', 'truncated', 'not_found', 'forbidden', 'failed'"


def upgrade() -> None:
    op.add_column("pull_requests", sa.Column("files_changed_sha", sa.Text(), nullable=True))
    op.add_column("pull_requests", sa.Column("files_status", sa.Text(), nullable=True))
    op.create_check_constraint(
        op.f("ck_pull_requests_files_status"), "pull_requests", f"files_status IN ({FILES_STATUS})"
    )
    op.create_table(
        "files_jobs",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("repo_id", sa.UUID(), nullable=False),
        sa.Column("pr_number", sa.Integer(), nullable=False),
        sa.Column("head_sha", sa.Text(), nullable=False),
        sa.Column("installation_id", sa.BigInteger(), nullable=True),
        sa.Column("pr_updated_at", postgresql.TIMESTAMP(timezone=True), nullable=True),
        sa.Column("state", sa.Text(), server_default="pending", nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("run_after", postgresql.TIMESTAMP(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("leased_until", postgresql.TIMESTAMP(timezone=True), nullable=True),
        sa.Column("lease_token", sa.UUID(), nullable=True),
        sa.Column("result", sa.Text(), nullable=True),
        sa.Column("etag", sa.Text(), nullable=True),
        sa.Column("etag_sha", sa.Text(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", postgresql.TIMESTAMP(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", postgresql.TIMESTAMP(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("state IN ('pending', 'done')", name=op.f("ck_files_jobs_state")),
        sa.CheckConstraint(f"result IN ({FILES_STATUS})", name=op.f("ck_files_jobs_result")),
        sa.ForeignKeyConstraint(
            ["repo_id"], ["repositories.id"], name=op.f("fk_files_jobs_repo_id_repositories"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_files_jobs")),
        sa.UniqueConstraint("repo_id", "pr_number", name=op.f("uq_files_jobs_repo_id_pr_number")),
    )
    op.create_index(
        "ix_files_jobs_run_after_pending",
        "files_jobs",
        ["run_after"],
        unique=False,
        postgresql_where=sa.text("state = 'pending'"),
    )


def downgrade() -> None:
    op.drop_index("ix_files_jobs_run_after_pending", table_name="files_jobs", postgresql_where=sa.text("state = 'pending'"))
    op.drop_table("files_jobs")
    op.drop_constraint(op.f("ck_pull_requests_files_status"), "pull_requests", type_="check")
    op.drop_column("pull_requests", "files_status")
    op.drop_column("pull_requests", "files_changed_sha")
