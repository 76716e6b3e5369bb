"""`python -m flowlens_ingest.cli`: the `flowlens-ingest` command."""

from flowlens_ingest.cli.main import main

main()
