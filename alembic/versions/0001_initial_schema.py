"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-28 15:32:39.070111
"""

from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('repositories',
    sa.Column('id', sa.UUID(), nullable=False),
    sa.Column('github_id', sa.BigInteger(), nullable=False),
    sa.Column('name', sa.Text(), nullable=False),
    sa.Column('full_name', sa.Text(), nullable=False),
    sa.Column('owner', sa.Text(), nullable=True),
    sa.Column('owner_avatar_url', sa.Text(), nullable=True),
    sa.Column('description', sa.Text(), nullable=True),
    sa.Column('is_private', sa.Boolean(), nullable=True),
    sa.Column('default_branch', sa.Text(), nullable=True),
    sa.Column('html_url', sa.Text(), nullable=True),
    sa.Column('language', sa.Text(), nullable=True),
    sa.Column('stars', sa.Integer(), nullable=True),
    sa.Column('forks', sa.Integer(), nullable=True),
    sa.Column('is_archived', sa.Boolean(), nullable=True),
    sa.Column('last_activity', sa.TIMESTAMP(timezone=True), nullable=True),
    sa.Column('github_created_at', sa.TIMESTAMP(timezone=True), nullable=True),
    sa.Column('github_updated_at', sa.TIMESTAMP(timezone=True), nullable=True),
    sa.Column('deleted_at', sa.TIMESTAMP(timezone=True), nullable=True),
    sa.Column('created_at', sa.TIMESTAMP(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('updated_at', sa.TIMESTAMP(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_repositories')),
    sa.UniqueConstraint('github_id', name=op.f('uq_repositories_github_id'))
    )
    op.create_index(op.f('ix_repositories_full_name'), 'repositories', ['full_name'], unique=False)
    op.create_table('webhook_deliveries',
    sa.Column('delivery_id', sa.Text(), nullable=False),
    sa.Column('hook_id', sa.BigInteger(), server_default=sa.text('0'), nullable=False),
    sa.Column('event', sa.Text(), nullable=False),
    sa.Column('action', sa.Text(), nullable=True),
    sa.Column('repository_github_id', sa.BigInteger(), nullable=True),
    sa.Column('received_at', sa.TIMESTAMP(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('payload', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('payload_sha256', sa.Text(), nullable=False),
    sa.Column('outcome', sa.Text(), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('applied_at', sa.TIMESTAMP(timezone=True), nullable=True),
    sa.Column('attempts', sa.Integer(), server_default=sa.text('1'), nullable=False),
    sa.CheckConstraint("outcome IN ('applied', 'ignored', 'stale', 'failed')", name=op.f('ck_webhook_deliveries_outcome')),
    sa.PrimaryKeyConstraint('delivery_id', 'hook_id', name=op.f('pk_webhook_deliveries'))
    )
    op.create_index(op.f('ix_webhook_deliveries_outcome_received_at'), 'webhook_deliveries', ['outcome', 'received_at'], unique=False)
    op.create_index(op.f('ix_webhook_deliveries_received_at'), 'webhook_deliveries', ['received_at'], unique=False)
    op.create_table('ci_checks',
    sa.Column('id', sa.UUID(), nullable=False),
    sa.Column('repo_id', sa.UUID(), nullable=False),
    sa.Column('head_sha', sa.Text(), nullable=False),
    sa.Column('source', sa.Text(), nullable=False),
    sa.Column('name', sa.Text(), nullable=False),
    sa.Column('github_id', sa.BigInteger(), nullable=True),
    sa.Column('status', sa.Text(), nullable=False),
    sa.Column('conclusion', sa.Text(), nullable=True),
    sa.Column('url', sa.Text(), nullable=True),
    sa.Column('github_started_at', sa.TIMESTAMP(timezone=True), nullable=True),
    sa.Column('github_completed_at', sa.TIMESTAMP(timezone=True), nullable=True),
    sa.Column('github_updated_at', sa.TIMESTAMP(timezone=True), nullable=True),
    sa.Column('event_at', sa.TIMESTAMP(timezone=True), nullable=True),
    sa.Column('rank', sa.SmallInteger(), nullable=False),
    sa.Column('created_at', sa.TIMESTAMP(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('updated_at', sa.TIMESTAMP(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint("source IN ('check_run', 'check_suite', 'workflow_run', 'workflow_job', 'status')", name=op.f('ck_ci_checks_source')),
    sa.ForeignKeyConstraint(['repo_id'], ['repositories.id'], name=op.f('fk_ci_checks_repo_id_repositories'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_ci_checks')),
    sa.UniqueConstraint('repo_id', 'head_sha', 'source', 'name', name=op.f('uq_ci_checks_repo_id_head_sha_source_name'))
    )
    op.create_table('insights',
    sa.Column('id', sa.UUID(), nullable=False),
    sa.Column('repo_id', sa.UUID(), nullable=False),
    sa.Column('pr_number', sa.Integer(), nullable=False),
    sa.Column('commit_sha', sa.Text(), nullable=True),
    sa.Column('author', sa.Text(), nullable=True),
    sa.Column('avatar_url', sa.Text(), nullable=True),
    sa.Column('risk_level', sa.Text(), nullable=True),
    sa.Column('summary', sa.Text(), nullable=True),
    sa.Column('recommendation', sa.Text(), nullable=True),
    sa.Column('processed', sa.Boolean(), server_default=sa.text('false'), nullable=False),
    sa.Column('version', sa.BigInteger(), server_default=sa.text('1'), nullable=False),
    sa.Column('created_at', sa.TIMESTAMP(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('updated_at', sa.TIMESTAMP(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint("risk_level IN ('low', 'medium', 'high')", name=op.f('ck_insights_risk_level')),
    sa.ForeignKeyConstraint(['repo_id'], ['repositories.id'], name=op.f('fk_insights_repo_id_repositories'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_insights'))
    )
    op.create_index(op.f('ix_insights_processed_updated_at'), 'insights', ['processed', 'updated_at'], unique=False)
    op.create_index(op.f('ix_insights_repo_id_pr_number'), 'insights', ['repo_id', 'pr_number'], unique=False)
    op.create_table('pipeline_runs',
    sa.Column('id', sa.UUID(), nullable=False),
    sa.Column('repo_id', sa.UUID(), nullable=False),
    sa.Column('pr_number', sa.Integer(), nullable=False),
    sa.Column('commit_sha', sa.Text(), nullable=True),
    sa.Column('author', sa.Text(), nullable=True),
    sa.Column('avatar_url', sa.Text(), nullable=True),
    sa.Column('title', sa.Text(), nullable=True),
    sa.Column('status_pr', sa.Text(), server_default='opened', nullable=False),
    sa.Column('status_build', sa.Text(), server_default='pending', nullable=False),
    sa.Column('status_approval', sa.Text(), server_default='pending', nullable=False),
    sa.Column('status_merge', sa.Text(), server_default='pending', nullable=False),
    sa.Column('pr_updated_at', sa.TIMESTAMP(timezone=True), nullable=True),
    sa.Column('processed', sa.Boolean(), server_default=sa.text('false'), nullable=False),
    sa.Column('version', sa.BigInteger(), server_default=sa.text('1'), nullable=False),
    sa.Column('created_at', sa.TIMESTAMP(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('updated_at', sa.TIMESTAMP(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint("status_approval IN ('pending', 'approved', 'changes_requested')", name=op.f('ck_pipeline_runs_status_approval')),
    sa.CheckConstraint("status_build IN ('pending', 'running', 'passed', 'failed')", name=op.f('ck_pipeline_runs_status_build')),
    sa.CheckConstraint("status_merge IN ('pending', 'merged', 'closed')", name=op.f('ck_pipeline_runs_status_merge')),
    sa.CheckConstraint("status_pr IN ('opened', 'updated')", name=op.f('ck_pipeline_runs_status_pr')),
    sa.ForeignKeyConstraint(['repo_id'], ['repositories.id'], name=op.f('fk_pipeline_runs_repo_id_repositories'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_pipeline_runs')),
    sa.UniqueConstraint('repo_id', 'pr_number', name=op.f('uq_pipeline_runs_repo_id_pr_number'))
    )
    op.create_index(op.f('ix_pipeline_runs_processed_updated_at'), 'pipeline_runs', ['processed', 'updated_at'], unique=False)
    op.create_index(op.f('ix_pipeline_runs_repo_id_commit_sha'), 'pipeline_runs', ['repo_id', 'commit_sha'], unique=False)
    op.create_table('pr_reviews',
    sa.Column('id', sa.UUID(), nullable=False),
    sa.Column('repo_id', sa.UUID(), nullable=False),
    sa.Column('pr_number', sa.Integer(), nullable=False),
    sa.Column('reviewer', sa.Text(), nullable=False),
    sa.Column('review_id', sa.BigInteger(), nullable=False),
    sa.Column('state', sa.Text(), nullable=False),
    sa.Column('commit_sha', sa.Text(), nullable=True),
    sa.Column('html_url', sa.Text(), nullable=True),
    sa.Column('github_submitted_at', sa.TIMESTAMP(timezone=True), nullable=True),
    sa.Column('rank', sa.SmallInteger(), nullable=False),
    sa.Column('created_at', sa.TIMESTAMP(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('updated_at', sa.TIMESTAMP(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint("state IN ('approved', 'changes_requested', 'dismissed')", name=op.f('ck_pr_reviews_state')),
    sa.ForeignKeyConstraint(['repo_id'], ['repositories.id'], name=op.f('fk_pr_reviews_repo_id_repositories'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_pr_reviews')),
    sa.UniqueConstraint('repo_id', 'pr_number', 'reviewer', name=op.f('uq_pr_reviews_repo_id_pr_number_reviewer'))
    )
    op.create_table('pull_requests',
    sa.Column('id', sa.UUID(), nullable=False),
    sa.Column('repo_id', sa.UUID(), nullable=False),
    sa.Column('pr_number', sa.Integer(), nullable=False),
    sa.Column('github_id', sa.BigInteger(), nullable=True),
    sa.Column('title', sa.Text(), nullable=True),
    sa.Column('description', sa.Text(), nullable=True),
    sa.Column('author', sa.Text(), nullable=True),
    sa.Column('author_avatar', sa.Text(), nullable=True),
    sa.Column('commit_sha', sa.Text(), nullable=True),
    sa.Column('branch_name', sa.Text(), nullable=True),
    sa.Column('base_branch', sa.Text(), nullable=True),
    sa.Column('pr_url', sa.Text(), nullable=True),
    sa.Column('files_changed', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('additions', sa.Integer(), nullable=True),
    sa.Column('deletions', sa.Integer(), nullable=True),
    sa.Column('changed_files', sa.Integer(), nullable=True),
    sa.Column('commits_count', sa.Integer(), nullable=True),
    sa.Column('labels', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'[]'::jsonb"), nullable=False),
    sa.Column('assignees', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'[]'::jsonb"), nullable=False),
    sa.Column('reviewers', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'[]'::jsonb"), nullable=False),
    sa.Column('is_draft', sa.Boolean(), server_default=sa.text('false'), nullable=False),
    sa.Column('state', sa.Text(), nullable=False),
    sa.Column('merged', sa.Boolean(), server_default=sa.text('false'), nullable=False),
    sa.Column('merged_at', sa.TIMESTAMP(timezone=True), nullable=True),
    sa.Column('closed_at', sa.TIMESTAMP(timezone=True), nullable=True),
    sa.Column('github_created_at', sa.TIMESTAMP(timezone=True), nullable=True),
    sa.Column('github_updated_at', sa.TIMESTAMP(timezone=True), nullable=True),
    sa.Column('processed', sa.Boolean(), server_default=sa.text('false'), nullable=False),
    sa.Column('version', sa.BigInteger(), server_default=sa.text('1'), nullable=False),
    sa.Column('created_at', sa.TIMESTAMP(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('updated_at', sa.TIMESTAMP(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint("state IN ('open', 'closed', 'merged')", name=op.f('ck_pull_requests_state')),
    sa.ForeignKeyConstraint(['repo_id'], ['repositories.id'], name=op.f('fk_pull_requests_repo_id_repositories'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_pull_requests')),
    sa.UniqueConstraint('repo_id', 'pr_number', name=op.f('uq_pull_requests_repo_id_pr_number'))
    )
    op.create_index(op.f('ix_pull_requests_processed_updated_at'), 'pull_requests', ['processed', 'updated_at'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_pull_requests_processed_updated_at'), table_name='pull_requests')
    op.drop_table('pull_requests')
    op.drop_table('pr_reviews')
    op.drop_index(op.f('ix_pipeline_runs_repo_id_commit_sha'), table_name='pipeline_runs')
    op.drop_index(op.f('ix_pipeline_runs_processed_updated_at'), table_name='pipeline_runs')
    op.drop_table('pipeline_runs')
    op.drop_index(op.f('ix_insights_repo_id_pr_number'), table_name='insights')
    op.drop_index(op.f('ix_insights_processed_updated_at'), table_name='insights')
    op.drop_table('insights')
    op.drop_table('ci_checks')
    op.drop_index(op.f('ix_webhook_deliveries_received_at'), table_name='webhook_deliveries')
    op.drop_index(op.f('ix_webhook_deliveries_outcome_received_at'), table_name='webhook_deliveries')
    op.drop_table('webhook_deliveries')
    op.drop_index(op.f('ix_repositories_full_name'), table_name='repositories')
    op.drop_table('repositories')
