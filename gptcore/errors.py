"""gptcore.errors: the one exception class that means "the user asked for something that cannot work".

WHAT'S GOING ON HERE
====================
Two kinds of failure reach the top of a `gptcore train / generate / eval` run. A *user* error -- a
corpus path that does not exist, a checkpoint left half-written by a crash, text with characters the
tokenizer never saw -- deserves one clear line naming the file or the value, not a traceback. A
*programming* error (a wrong dtype passed between our own modules, a bug) deserves the full traceback,
and keeps raising TypeError / ValueError / RuntimeError as the kernels and the model do.

GptcoreError marks the first kind. The modules that face the outside world (gptcore.tokenizer,
gptcore.data, gptcore.checkpoint) raise it with a message that stands on its own; the CLI catches
exactly this class and prints the message.
"""


class GptcoreError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits non-zero."""


class ReportedElsewhere(GptcoreError):
    """An error another process of the same job reports (the lowest MPI rank that failed, see
    gptcore.distributed): the CLI exits non-zero without printing it a second time."""
