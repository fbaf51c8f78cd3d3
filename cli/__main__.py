"""`python -m cli ...`: how `inflight serve` starts its children."""

import sys

from cli.main import main

sys.exit(main())
