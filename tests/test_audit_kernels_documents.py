"""EPUB chapter text (``beacon_llm.documents``): character references decoded once (a book that writes ``&amp;lt;``
means the four characters ``&lt;``), table cells and definition terms kept apart, trailing text kept."""

import pytest
from epub_helpers import write_epub

from beacon_llm.documents import read_document


def _epub(path, body):
    """A one-chapter EPUB whose chapter's body is ``body``."""
    chapter = (
        f'<?xml version="1.0" encoding="utf-8"?><html xmlns="http://www.w3.org/1999/xhtml"><body>{body}</body></html>'
    )
    return write_epub(path, {"OEBPS/ch1.xhtml": chapter.encode()})


@pytest.mark.parametrize(
    "body, text",
    [
        ("<p>Write &amp;lt;p&amp;gt; to open a paragraph.</p>", "Write &lt;p&gt; to open a paragraph."),
        ("<p>AT&amp;amp;T and &amp;copy;</p>", "AT&amp;T and &copy;"),
        ("<p>a &lt; b &amp;&amp; caf&#233; &#x2014; ok</p>", "a < b && caf\u00e9 \u2014 ok"),
    ],
)
def test_character_references_are_decoded_once(tmp_path, body, text):
    assert read_document(_epub(tmp_path / "book.epub", body)) == text


def test_table_cells_and_definition_terms_do_not_run_together(tmp_path):
    body = (
        "<table><tr><th>Name</th><th>Land</th></tr><tr><td>Dorothy</td><td>Kansas</td></tr></table>"
        "<dl><dt>Oz</dt><dd>a land</dd></dl>"
    )
    words = read_document(_epub(tmp_path / "book.epub", body)).split()
    assert words == ["Name", "Land", "Dorothy", "Kansas", "Oz", "a", "land"]
