"""`python -m gptcore ...` is the `gptcore` command (gptcore.cli).

WHAT'S GOING ON HERE
  Python runs this file for `python -m gptcore`. It passes the arguments to gptcore.cli.main, the
  function the installed `gptcore` script calls, and exits with its status. Everything else is in
  gptcore.cli.
"""
import signal
import sys

from gptcore.cli import main

status = main()
# The command is over and whatever it wrote is complete: a Ctrl-C while Python shuts down must not
# turn a finished run into a KeyboardInterrupt traceback.
signal.signal(signal.SIGINT, signal.SIG_IGN)
sys.exit(status)
