"""Text from outside purestore (a builder's output, a post-build hook's) made safe to print to a
terminal.

A builder may write anything to its log, terminal control sequences included: ``\\x1b]0;…\\x07``
retitles the window, ``\\x1b[2J`` clears the screen, ``\\r`` and ``\\b`` overwrite what was
printed, and some terminals have had sequences that answer back into their input.  Printed as
they are, such bytes in the last lines of a failed build could hide or fake what pure says.  So
what pure prints for people shows them instead, as ``\\x1b``, ``\\x07``, ``\\r``: the control
characters of ASCII (C0, but the tab and the newline) and DEL, and the C1 controls
(U+0080-U+009F; ``\\x9b`` is CSI to some terminals).  Colours go too: keeping them would mean
letting through the sequences of one kind only, which needs a parser of them to be exact, and
colours can hide text as well (``\\x1b[8m``).  The stored log (``pure log``) stays byte-exact.
"""

from __future__ import annotations

__all__ = ["visible"]

_SHOWN = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0)) if c not in (0x09, 0x0A)}
_SHOWN[0x0D] = "\\r"


def visible(text: str) -> str:
    """``text`` with every control character a terminal would act on written out as ``\\xNN``
    (``\\r`` for a carriage return); newlines and tabs stay, and so does everything else."""
    return text.translate(_SHOWN)
