"""The project's one exception type for problems the user can fix from the message alone.

`finetune-phi` shows a UserError as a single line (`finetune-phi CMD: error: ...`, exit code 2):
a bad data row, a model folder that would be overwritten, an output folder in use or read-only,
a full disk, a bad flag or `--config` file (`finetune-phi --debug ...` shows its traceback too).
Anything else is a fault (ours or a library's) and keeps its traceback, which is what a bug report
needs. Raise UserError (or a subclass) only with a message that says what to do. One exception to
that rule lives in cli.main: an error raised by the Azure SDK (auth, permissions, quota) is one line
too, with its class and Azure's own message, exit code 1 (`--debug` shows its traceback).
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake or an environment problem the message explains; shown without a traceback."""
