"""`python -m growrun` is the `growrun` command."""
import sys

from growrun.cli import main

sys.exit(main())
