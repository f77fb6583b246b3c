"""`python -m aemagent` is `aemagent`."""

import sys

from aemagent.cli import main

sys.exit(main())
