"""A minimal EPUB written in code, for the document readers' tests."""

from __future__ import annotations

import zipfile
from pathlib import Path


def write_epub(path: Path, chapters: dict[str, bytes | str], spine_hrefs: list[str] | None = None) -> Path:
    """An EPUB at ``path``: ``chapters`` maps archive names to their content; the spine lists ``spine_hrefs``
    (default: the names relative to OEBPS/), in order."""
    hrefs = spine_hrefs or [name.removeprefix("OEBPS/") for name in chapters]
    items = "".join(f'<item id="c{i}" href="{h}" media-type="application/xhtml+xml"/>' for i, h in enumerate(hrefs))
    spine = "".join(f'<itemref idref="c{i}"/>' for i in range(len(hrefs)))
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("mimetype", "application/epub+zip")
        zf.writestr(
            "META-INF/container.xml",
            '<container xmlns="urn:oasis:names:tc:opendocument:xmlns:container">'
            '<rootfiles><rootfile full-path="OEBPS/content.opf"/></rootfiles></container>',
        )
        zf.writestr(
            "OEBPS/content.opf",
            f'<package xmlns="http://www.idpf.org/2007/opf"><manifest>{items}</manifest><spine>{spine}</spine></package>',
        )
        for name, data in chapters.items():
            zf.writestr(name, data)
    return path
