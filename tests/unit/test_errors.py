"""errors.one_line / exc_line: a library's message, however long or many-lined, fits one error line."""

from __future__ import annotations

from hld.errors import HldError, exc_line, one_line


def test_a_long_many_lined_message_becomes_one_short_line():
    text = "first line\n\n  second\tline " + "x" * 500
    assert one_line(text) == ("first line second line " + "x" * 500)[:200]
    assert one_line(text, 10) == "first line"
    assert exc_line(OSError("disk\nfull")) == "OSError: disk full"
    assert "\n" not in HldError(f"cannot load: {exc_line(ValueError(text))}", "fix it").line()
