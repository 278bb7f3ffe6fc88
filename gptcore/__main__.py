"""`python -m gptcore ...` is the `gptcore` command (gptcore.cli).

WHAT'S GOING ON HERE
  Python runs this file for `python -m gptcore`. It passes the arguments to gptcore.cli.main, the
  function the installed `gptcore` script calls, and exits with its status. Everything else is in
  gptcore.cli.
"""
import sys

from gptcore.cli import main

sys.exit(main())
