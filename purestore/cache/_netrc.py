"""The check the standard library's :mod:`netrc` parser (which :func:`.http_auth.netrc_login`
uses) does not make: a keyword without its value.  That parser takes ``login`` or ``password``
at the end of the file as an empty value, and an entry's first word that follows such a keyword
as its value (``machine a password`` then ``default login x password y`` gives host a the
password ``default`` and loses the default entry).

Words are read as that parser reads them: separated by white space, in double quotes or not,
``\\`` escaping the next character; a word starting with ``#`` where a keyword is expected
starts a comment to the end of its line; ``macdef NAME`` is followed by lines up to an empty
one.  Only a file that parser accepted is checked here.
"""

from __future__ import annotations

_WITH_VALUE = frozenset({"machine", "login", "user", "account", "password"})
_ENTRY = frozenset({"machine", "default", "macdef"})


class _Words:
    def __init__(self, text: str):
        self.text, self.i, self.line = text, 0, 1

    def _char(self) -> str:
        ch = self.text[self.i:self.i + 1]
        self.i += 1
        self.line += ch == "\n"
        return ch

    def next(self) -> tuple[str, bool, int, bool] | None:
        """(word, quoted, its line, whether its line goes on after it); None at the end."""
        ch = self._char()
        while ch and ch in " \t\r\n":
            ch = self._char()
        if not ch:
            return None
        line, word, quoted = self.line, "", ch == '"'
        if not quoted:
            self.i -= 1
        while True:
            ch = self._char()
            if not ch or (ch == '"' if quoted else ch in " \t\r\n"):
                return word, quoted, line, self.line == line
            if ch == "\\":
                ch = self._char()
            word += ch

    def skip_line(self) -> None:
        end = self.text.find("\n", self.i)
        self.i = len(self.text) if end < 0 else end + 1
        self.line += end >= 0

    def skip_macro(self) -> None:
        """Pass over a macdef's body: lines up to an empty one."""
        while self.i < len(self.text):
            start = self.i
            self.skip_line()
            if self.text[start:self.i] == "\n":
                return


def missing_value(text: str) -> tuple[int, str] | None:
    """(line, message) of the first keyword in ``text`` (a netrc file) with no value after it;
    None when every keyword has its value."""
    words = _Words(text)
    pending: tuple[str, int] | None = None  # a keyword whose value is the next word
    while (w := words.next()) is not None:
        word, quoted, line, goes_on = w
        if pending is not None:
            if not quoted and word in _ENTRY:
                return pending[1], (f"'{pending[0]}' has no value (the next word is '{word}'; "
                                    f"if that is the value, quote it: \"{word}\")")
            pending = None
        elif quoted:
            continue
        elif word.startswith("#"):
            if goes_on:
                words.skip_line()
        elif word in _WITH_VALUE:
            pending = (word, line)
        elif word == "macdef":
            words.next()  # its name
            words.skip_macro()
    if pending is not None:
        return pending[1], f"'{pending[0]}' has no value (the file ends after it)"
    return None
