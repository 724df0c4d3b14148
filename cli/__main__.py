"""`python -m cli`: the `asif` command without the installed script."""

import sys

from cli.main import main

sys.exit(main())
