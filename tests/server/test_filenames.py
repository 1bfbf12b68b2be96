"""`checked_filename`: a name a file may have comes back as given; any other is a 400
naming the field."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.errors import APIError
from server.filenames import checked_filename

# Characters of ordinary names: letters, digits, punctuation and spaces of any script
# (no control characters, no surrogates), and no path separator.
_NAME_CHARS = st.characters(
    blacklist_categories=("Cc", "Cs", "Cf", "Co", "Cn"), blacklist_characters="/\\"
)


def _refused(name: str) -> APIError:
    with pytest.raises(APIError) as info:
        checked_filename(name, "input[0].content[0].filename")
    assert info.value.status == 400 and info.value.param == "input[0].content[0].filename"
    return info.value


@given(st.text(st.sampled_from(". \u00a0\u2003\u3000"), max_size=12))
def test_a_name_of_dots_and_spaces_only_is_refused(name):
    """`.` and `..` name a directory, not a file, and names of dots and spaces are no
    better: a client saving the file under it would write its directory, or its parent."""
    _refused(name)


@given(
    st.text(_NAME_CHARS, max_size=20),
    st.sampled_from("/\\"),
    st.text(_NAME_CHARS, max_size=20),
)
def test_a_name_holding_a_path_separator_is_refused(head, separator, tail):
    """A name, not a path: `../x`, `dir/x` or `dir\\x` (Windows' separator) could place
    the file elsewhere than where its reader saves it."""
    assert "separator" in _refused(head + separator + tail).message


@given(st.text(_NAME_CHARS, min_size=1, max_size=60))
def test_an_ordinary_name_comes_back_as_given(name):
    if not name.replace(".", "").strip():
        return  # dots and spaces only: the test above
    assert checked_filename(name, "file") == name
