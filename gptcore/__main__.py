"""`python -m gptcore ...` is the `gptcore` command (gptcore.cli)."""
import sys

from gptcore.cli import main

sys.exit(main())
