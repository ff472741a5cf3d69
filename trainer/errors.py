"""The one exception type a user ever sees.

Anything the user can fix (a bad image, a missing token, an unknown preset key) is raised as a
``UserError`` whose text is a complete sentence saying what happened and what to do. The CLI prints it
as one line on stderr and exits non-zero; the app shows it in the page. Everything else is a bug and
keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can fix; ``str(err)`` is the whole message shown to them."""
