"""FlowLens Ingest: verified GitHub webhooks into YugabyteDB/PostgreSQL.

The data flow, one module per step: webhook (HTTP) -> signature -> parse ->
delivery -> mappers (pure rows) -> plan -> database (one transaction) -> answer.
`flowlens_ingest.app.create_app` builds the Flask app. Importing this package
loads nothing else, so the pure modules stay free of Flask and the database driver.
"""

__version__ = "0.1.0"
