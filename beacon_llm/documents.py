"""Reading whole documents as text: .txt / .md (built in), .epub (standard library), .pdf (``pypdf`` extra)."""

from __future__ import annotations

import html
import posixpath
import re
import zipfile
from html.parser import HTMLParser
from pathlib import Path
from xml.etree import ElementTree

SUPPORTED = (".txt", ".md", ".markdown", ".text", ".epub", ".pdf")
# The public-domain book shipped with the package (demos, benchmarks, tests): The Wonderful Wizard of Oz
BUNDLED_BOOK = Path(__file__).parent / "books" / "wonderful_wizard_of_oz.txt"


class DocumentError(ValueError):
    """The document cannot be read; the message says why and what to do."""


class _TextExtractor(HTMLParser):
    BLOCK = {"p", "div", "br", "h1", "h2", "h3", "h4", "h5", "h6", "li", "tr", "section", "blockquote"}

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style", "head"):
            self._skip += 1
        elif tag in self.BLOCK:
            self.parts.append("\n")

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
    text = html.unescape("".join(parser.parts))
    return re.sub(r"\n\s*\n\s*\n+", "\n\n", text).strip()


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
                chapters.append(_html_text(zf.read(posixpath.join(base, href)).decode("utf-8", "replace")))
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
            text = p.read_text(encoding="utf-8")
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
