"""The `beacon-llm` command on a tiny model: answers, the condensed-book disk cache, exit codes for bad input."""

import re

import pytest

import beacon_llm
from beacon_llm.cli import main
from beacon_llm.testing import tiny_base_model, tiny_beacon_model


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    bm = tiny_beacon_model()
    tiny_base_model().save_pretrained(root / "base")  # the same base weights, without beacons
    bm.tokenizer.save_pretrained(root / "base")
    beacon_llm.save_adapter(bm, str(root / "adapter"))
    return root


@pytest.fixture
def run(tiny_dirs, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BEACON_LLM_HOME", str(tmp_path / "home"))

    def _run(*args):
        code = main(
            [
                args[0],
                *args[1:],
                "--model",
                str(tiny_dirs / "base"),
                "--adapter",
                str(tiny_dirs / "adapter"),
                "--max-new-tokens",
                "8",
            ]
        )
        out = capsys.readouterr()
        return code, out.out, out.err

    return _run


def _doc(tmp_path, text="Dorothy lived in Kansas with Uncle Henry and Aunt Em. " * 12, name="doc.txt"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _read_counts(err):
    m = re.search(r"read (\d+) of (\d+) prompt tokens \((\d+) from", err)
    assert m, err
    return tuple(int(x) for x in m.groups())


def test_ask_answers_and_the_second_question_reads_only_itself(run, tmp_path):
    doc = _doc(tmp_path)
    code, out, err = run("ask", doc, "Where did Dorothy live?")
    assert code == 0 and out.strip()
    read, total, cached = _read_counts(err)
    assert (read, cached) == (total, 0)
    assert list((tmp_path / "home" / "books").glob("*.safetensors"))
    code, out2, err2 = run("ask", doc, "Who is Em?")
    read2, total2, cached2 = _read_counts(err2)
    question_tokens = total2 - cached2
    assert code == 0 and cached2 > 0.9 * total and read2 == question_tokens < 60


def test_corrupted_cache_is_read_again(run, tmp_path):
    doc = _doc(tmp_path)
    assert run("ask", doc, "Where?")[0] == 0
    for f in (tmp_path / "home" / "books").glob("*.safetensors"):
        f.write_bytes(b"garbage")
    code, out, err = run("ask", doc, "Who?")
    assert code == 0
    read, total, cached = _read_counts(err)
    assert cached == 0 and read == total


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda p: str(p / "missing.txt"), "no such file"),
        (lambda p: _doc(p, "   \n\n", "empty.txt"), "the document is empty"),
        (lambda p: _doc(p, "x", "book.docx"), "unsupported format .docx"),
        (lambda p: (p / "bad.txt").write_bytes(b"\xff\xfe\x00abc") and str(p / "bad.txt"), "not UTF-8 text"),
        (lambda p: (p / "bad.epub").write_bytes(b"not a zip") and str(p / "bad.epub"), "unreadable"),
        (lambda p: _doc(p, "word " * 3000, "long.txt"), r"15\d\d\d tokens, more than this model's capacity of 2012"),
    ],
)
def test_bad_documents_exit_2_with_a_message(run, tmp_path, make, message):
    code, out, err = run("ask", make(tmp_path), "question?")
    assert code == 2
    assert re.search(message, err), err


def test_unknown_model_path_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BEACON_LLM_HOME", str(tmp_path))
    code = main(["ask", _doc(tmp_path), "q?", "--model", str(tmp_path / "no" / "such" / "model")])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err


def test_epub_is_read(run, tmp_path):
    import zipfile

    path = tmp_path / "book.epub"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(
            "META-INF/container.xml",
            '<container xmlns="urn:oasis:names:tc:opendocument:xmlns:container">'
            '<rootfiles><rootfile full-path="OEBPS/content.opf"/></rootfiles></container>',
        )
        zf.writestr(
            "OEBPS/content.opf",
            '<package xmlns="http://www.idpf.org/2007/opf"><manifest>'
            '<item id="c1" href="c1.xhtml"/></manifest><spine><itemref idref="c1"/></spine></package>',
        )
        zf.writestr("OEBPS/c1.xhtml", "<html><body><p>Toto was a little black dog.</p></body></html>")
    from beacon_llm.documents import read_document

    assert read_document(path) == "Toto was a little black dog."
    assert run("ask", str(path), "Who is Toto?")[0] == 0
