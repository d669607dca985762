"""Reading documents: EPUB chapter paths and encodings, .txt byte-order marks and NUL bytes (no model)."""

import codecs
import re

import pytest
from epub_helpers import write_epub

from beacon_llm.documents import DocumentError, _chapter_encoding, _chapter_path, read_document

XHTML = '<?xml version="1.0" encoding="{enc}"?><html><body><p>The fox is br\u00f8wn.</p></body></html>'
PLAIN = "<html><body><p>The fox is br\u00f8wn.</p></body></html>"


@pytest.mark.parametrize(
    "base, href, expected",
    [
        ("OEBPS", "ch1.xhtml", "OEBPS/ch1.xhtml"),
        ("OEBPS", "chapter%201.xhtml", "OEBPS/chapter 1.xhtml"),
        ("OEBPS", "../Text/ch1.xhtml", "Text/ch1.xhtml"),
        ("OEBPS/a", "./b/../c%C3%A9.xhtml", "OEBPS/a/c\u00e9.xhtml"),
        ("OEBPS", "ch1.xhtml#start", "OEBPS/ch1.xhtml"),
        ("", "ch1.xhtml", "ch1.xhtml"),
    ],
)
def test_chapter_path_decodes_and_normalises_the_href(base, href, expected):
    assert _chapter_path(base, href) == expected


@pytest.mark.parametrize(
    "data, expected",
    [
        (PLAIN.encode(), "utf-8"),
        (XHTML.format(enc="utf-8").encode(), "utf-8"),
        (codecs.BOM_UTF8 + PLAIN.encode(), "utf-8-sig"),
        (XHTML.format(enc="utf-16").encode("utf-16"), "utf-16"),  # with its byte-order mark
        (XHTML.format(enc="utf-16").encode("utf-16-le"), "utf-16-le"),  # none: the declaration's first bytes
        (XHTML.format(enc="utf-16").encode("utf-16-be"), "utf-16-be"),
        (PLAIN.encode("utf-32"), "utf-32"),
        (XHTML.format(enc="ISO-8859-1").encode("latin-1"), "ISO-8859-1"),
        (b"<?xml version='1.0' encoding='windows-1252'?><p/>", "windows-1252"),
        (XHTML.format(enc="UTF-16").encode(), "utf-8"),  # an ASCII-readable declaration cannot be UTF-16
        (XHTML.format(enc="no-such-codec").encode(), "no-such-codec"),  # left for the caller to name
    ],
)
def test_chapter_encoding_from_bom_then_declaration_then_utf8(data, expected):
    assert _chapter_encoding(data) == expected


def _epub(path, chapters, spine_hrefs=None):
    return write_epub(path, chapters, spine_hrefs)


@pytest.mark.parametrize(
    "chapters, hrefs",
    [
        ({"OEBPS/chapter 1.xhtml": XHTML.format(enc="utf-8").encode()}, ["chapter%201.xhtml"]),
        ({"Text/ch1.xhtml": XHTML.format(enc="utf-8").encode()}, ["../Text/ch1.xhtml"]),
        ({"OEBPS/ch1.xhtml": XHTML.format(enc="utf-16").encode("utf-16")}, None),
        ({"OEBPS/ch1.xhtml": XHTML.format(enc="utf-16").encode("utf-16-le")}, None),
        ({"OEBPS/ch1.xhtml": XHTML.format(enc="iso-8859-1").encode("latin-1")}, None),
        ({"OEBPS/ch1.xhtml": codecs.BOM_UTF8 + PLAIN.encode()}, None),
    ],
)
def test_epub_chapters_are_found_and_decoded(tmp_path, chapters, hrefs):
    assert read_document(_epub(tmp_path / "book.epub", chapters, hrefs)) == "The fox is br\u00f8wn."


@pytest.mark.parametrize(
    "data, message",
    [
        (PLAIN.encode("latin-1"), r"chapter OEBPS/ch1\.xhtml is not valid utf-8 \(invalid .* at byte \d+\)"),
        (XHTML.format(enc="no-such-codec").encode(), "chapter OEBPS/ch1.xhtml declares an unknown encoding"),
        (PLAIN.replace("\u00f8", "o").encode("utf-16-le"), "chapter OEBPS/ch1.xhtml contains NUL characters"),
    ],
    ids=["latin-1", "unknown-codec", "utf-16-le-ascii"],
)
def test_an_undecodable_epub_chapter_is_refused_by_name(tmp_path, data, message):
    with pytest.raises(DocumentError, match=message) as info:
        read_document(_epub(tmp_path / "book.epub", {"OEBPS/ch1.xhtml": data}))
    assert "re-save the book as UTF-8" in str(info.value)


def test_txt_byte_order_mark_is_dropped(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes(codecs.BOM_UTF8 + b"The fox\r\nis brown.")
    assert read_document(path) == "The fox\nis brown."


@pytest.mark.parametrize(
    "data",
    ["The fox is brown.".encode("utf-16-le"), "The fox is brown.".encode("utf-16-be"), b"text\x00more"],
    ids=["utf-16-le", "utf-16-be", "nul"],
)
def test_txt_with_nul_bytes_is_refused(tmp_path, data):
    path = tmp_path / "wide.txt"
    path.write_bytes(data)
    with pytest.raises(DocumentError, match=re.escape(f"{path}: not UTF-8 text (it contains NUL")) as info:
        read_document(path)
    assert "convert it to UTF-8" in str(info.value)
