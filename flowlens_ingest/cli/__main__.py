"""`python -m flowlens_ingest.cli`: the `flowlens-ingest` command."""

import sys

from flowlens_ingest.cli.main import main

sys.exit(main())
