"""`python -m nextdetail.cli …`, as the `nextdetail` command."""

import sys

from nextdetail.cli import main

sys.exit(main())
