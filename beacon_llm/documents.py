"""Reading whole documents as text: .txt / .md (built in), .epub (standard library), .pdf (``pypdf`` extra)."""

from __future__ import annotations

import codecs
import posixpath
import re
import zipfile
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote
from xml.etree import ElementTree

SUPPORTED = (".txt", ".md", ".markdown", ".text", ".epub", ".pdf")
# The public-domain book shipped with the package (demos, benchmarks, tests): The Wonderful Wizard of Oz
BUNDLED_BOOK = Path(__file__).parent / "books" / "wonderful_wizard_of_oz.txt"


class DocumentError(ValueError):
    """The document cannot be read; the message says why and what to do."""


class _TextExtractor(HTMLParser):
    """The text of (X)HTML markup: a line break around each block element and a space before each table cell (so
    neighbouring cells do not run into one word); character references are decoded once, by the parser."""

    BLOCK = {
        "p", "div", "br", "hr", "h1", "h2", "h3", "h4", "h5", "h6", "li", "ul", "ol", "dl", "dt", "dd", "tr", "table",
        "caption", "section", "article", "aside", "header", "footer", "nav", "main", "figure", "figcaption",
        "blockquote", "pre", "address",
    }  # fmt: skip
    SPACED = {"td", "th"}

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style", "head"):
            self._skip += 1
        elif tag in self.BLOCK:
            self.parts.append("\n")
        elif tag in self.SPACED:
            self.parts.append(" ")

    def handle_endtag(self, tag):
        if tag in ("script", "style", "head") and self._skip:
            self._skip -= 1
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self._skip:
            self.parts.append(data)


def _html_text(markup: str) -> str:
    parser = _TextExtractor()
    parser.feed(markup)
    parser.close()
    text = "".join(parser.parts)  # the parser already decoded the character references (convert_charrefs)
    return re.sub(r"\n\s*\n\s*\n+", "\n\n", text).strip()


# byte-order marks, longest first (UTF-32-LE's starts with UTF-16-LE's), and the first bytes of an XML declaration
# written without one (XML 1.0 appendix F)
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
_UNMARKED = ((b"<\x00?\x00", "utf-16-le"), (b"\x00<\x00?", "utf-16-be"))
_XML_ENCODING = re.compile(rb"""^<\?xml[^>]*?\sencoding\s*=\s*["']([A-Za-z][A-Za-z0-9._-]*)["']""")


def _chapter_encoding(data: bytes) -> str:
    """The encoding of an (X)HTML chapter: its byte-order mark, else its XML declaration's, else UTF-8."""
    for mark, encoding in _BOMS:
        if data.startswith(mark):
            return encoding
    for start, encoding in _UNMARKED:
        if data.startswith(start):
            return encoding
    declared = _XML_ENCODING.match(data)
    if declared is None:
        return "utf-8"
    encoding = declared.group(1).decode("ascii")
    try:
        wide = codecs.lookup(encoding).name.startswith(("utf-16", "utf-32"))
    except LookupError:
        return encoding  # the caller names it
    # a declaration readable as ASCII is wrong about a 16/32-bit encoding (that text starts with a BOM or `<\0?\0`)
    return "utf-8" if wide else encoding


def _decode_chapter(data: bytes, name: str, path: Path) -> str:
    """A chapter's text in its own encoding (:func:`_chapter_encoding`), decoded strictly: a chapter that does not
    decode raises :class:`DocumentError` naming it instead of turning into replacement characters."""
    encoding = _chapter_encoding(data)
    try:
        text = data.decode(encoding)
    except LookupError as exc:
        raise DocumentError(
            f"{path}: chapter {name} declares an unknown encoding {encoding!r}; re-save the book as UTF-8"
        ) from exc
    except UnicodeDecodeError as exc:
        raise DocumentError(
            f"{path}: chapter {name} is not valid {encoding} ({exc.reason} at byte {exc.start}); "
            "re-save the book as UTF-8"
        ) from exc
    if "\x00" in text:
        raise DocumentError(
            f"{path}: chapter {name} contains NUL characters (UTF-16 without a byte-order mark?); re-save the book "
            "as UTF-8"
        )
    return text


def _chapter_path(base: str, href: str) -> str:
    """The archive name of a manifest ``href`` (a URL relative to the package file in folder ``base``):
    percent-decoded, without a fragment, ``.`` and ``..`` resolved."""
    return posixpath.normpath(posixpath.join(base, unquote(href.split("#", 1)[0])))


def _read_epub(path: Path) -> str:
    with zipfile.ZipFile(path) as zf:
        container = ElementTree.fromstring(zf.read("META-INF/container.xml"))
        ns = {"c": "urn:oasis:names:tc:opendocument:xmlns:container"}
        rootfile = container.find(".//c:rootfile", ns)
        if rootfile is None:
            raise DocumentError(f"{path}: EPUB without a package file")
        opf_path = rootfile.attrib["full-path"]
        opf = ElementTree.fromstring(zf.read(opf_path))
        ons = {"o": "http://www.idpf.org/2007/opf"}
        manifest = {i.attrib["id"]: i.attrib["href"] for i in opf.findall(".//o:manifest/o:item", ons)}
        base = posixpath.dirname(opf_path)
        chapters = []
        for ref in opf.findall(".//o:spine/o:itemref", ons):
            href = manifest.get(ref.attrib.get("idref", ""))
            if href:
                name = _chapter_path(base, href)
                chapters.append(_html_text(_decode_chapter(zf.read(name), name, path)))
    return "\n\n".join(c for c in chapters if c)


def _read_pdf(path: Path) -> str:
    try:
        from pypdf import PdfReader
    except ImportError as exc:
        raise DocumentError(f"{path}: reading PDF needs the pdf extra: pip install 'beacon-llm[pdf]'") from exc
    reader = PdfReader(str(path))
    return "\n\n".join((page.extract_text() or "") for page in reader.pages).strip()


def read_document(path: str | Path) -> str:
    """The text of a document; raises :class:`DocumentError` (missing, unsupported, unreadable, empty)."""
    p = Path(path)
    if not p.exists():
        raise DocumentError(f"{p}: no such file")
    if not p.is_file():
        raise DocumentError(f"{p}: not a file")
    suffix = p.suffix.lower()
    if suffix not in SUPPORTED:
        raise DocumentError(f"{p}: unsupported format {suffix or '(none)'}; supported: {', '.join(SUPPORTED)}")
    try:
        if suffix == ".epub":
            text = _read_epub(p)
        elif suffix == ".pdf":
            text = _read_pdf(p)
        else:
            text = p.read_text(encoding="utf-8-sig")  # without the byte-order mark some editors write
            if "\x00" in text:
                raise DocumentError(
                    f"{p}: not UTF-8 text (it contains NUL characters: UTF-16 or a binary file?); convert it to UTF-8"
                )
    except DocumentError:
        raise
    except UnicodeDecodeError as exc:
        raise DocumentError(f"{p}: not UTF-8 text ({exc.reason} at byte {exc.start}); convert it to UTF-8") from exc
    except (OSError, zipfile.BadZipFile, ElementTree.ParseError, KeyError) as exc:
        raise DocumentError(f"{p}: unreadable ({exc})") from exc
    except Exception as exc:  # parser errors of the optional PDF reader
        raise DocumentError(f"{p}: unreadable ({type(exc).__name__}: {exc})") from exc
    if not text.strip():
        raise DocumentError(f"{p}: the document is empty (no text could be extracted)")
    return text
