"""`python -m msmodelslim ...` (what torchrun starts with `-m msmodelslim`): the same as the `msmodelslim` command."""
import sys

from msmodelslim.cli.__main__ import main

sys.exit(main())
