"""`beacon-llm chat` / `ask` over several turns on a tiny model: a question that does not fit or a Ctrl-C mid-answer
ends only that answer, options and an oversized document are refused before the first question, a closed output pipe
ends quietly, and the summary line says where the reused tokens came from."""

import io
import os
import re
import subprocess
import sys

import pytest

from beacon_llm.cli import main
from beacon_llm.engine import BeaconEngine

DOC = "Dorothy lived in Kansas with Uncle Henry and Aunt Em. " * 12
READ = re.compile(r"\[read (\d+) of (\d+) prompt tokens \((\d+) from")


@pytest.fixture
def doc(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text(DOC)
    return str(path)


def _model_args(tiny_dirs):
    return ["--model", str(tiny_dirs / "base"), "--adapter", str(tiny_dirs / "adapter"), "--max-new-tokens", "6"]


@pytest.fixture
def chat(tiny_dirs, tmp_path, monkeypatch, capsys):
    """Runs `beacon-llm chat` with the given lines on standard input: (exit code, stdout, stderr)."""
    monkeypatch.setenv("BEACON_LLM_HOME", str(tmp_path / "home"))

    def _chat(document, lines, *extra):
        monkeypatch.setattr("sys.stdin", io.StringIO("".join(f"{line}\n" for line in lines)))
        code = main(["chat", document, *_model_args(tiny_dirs), *extra])
        out = capsys.readouterr()
        return code, out.out, out.err

    return _chat


def _not_called(*args, **kwargs):
    raise AssertionError("must not be reached")


def test_a_question_that_does_not_fit_is_refused_and_the_chat_goes_on(chat, doc):
    code, out, err = chat(doc, ["Where?", "why " * 400, "Who is Em?"])
    reads = [tuple(map(int, m)) for m in READ.findall(err)]
    assert len(reads) == 2, err  # the first and the third question were answered
    assert "more than this model's capacity" in err and "This question was not answered" in err
    assert "ask a shorter one" in err
    read, total, cached = reads[1]
    assert cached > 0.9 * reads[0][1] and read == total - cached  # the third question reused the document
    assert code == 2  # a script learns that a question was refused


@pytest.mark.parametrize("when", ["reading", "answering"])
def test_ctrl_c_stops_only_the_answer_and_the_next_question_is_answered(chat, doc, monkeypatch, when):
    stream = BeaconEngine.stream
    calls = []

    def interrupted_once(self, ids, **kwargs):
        calls.append(len(ids))
        items = stream(self, ids, **kwargs)
        if len(calls) == 1 and when == "reading":
            raise KeyboardInterrupt  # before the document is read
        for item in items:
            yield item
            if len(calls) == 1 and isinstance(item, str):
                raise KeyboardInterrupt  # after the first words of the answer

    monkeypatch.setattr(BeaconEngine, "stream", interrupted_once)
    code, out, err = chat(doc, ["Where?", "Who is Em?"])
    assert code == 0 and len(calls) == 2
    assert "[interrupted]" in err
    reads = [tuple(map(int, m)) for m in READ.findall(err)]
    assert len(reads) == 1, err
    read, total, cached = reads[0]
    assert read + cached == total
    if when == "answering":  # the document was read before the interrupt: the next question reuses it
        assert cached > 0.9 * total


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--max-new-tokens", "0"], "--max-new-tokens=0 must be a positive int"),
        (["--temperature", "-1"], "--temperature=-1.0 must be a number >= 0"),
        (["--top-p", "2"], "--top-p=2.0 must be in (0, 1]"),
        (["--repetition-penalty", "0"], "--repetition-penalty=0.0 must be > 0"),
    ],
)
@pytest.mark.parametrize("command", ["ask", "chat"])
def test_generation_options_are_refused_before_the_model_loads(command, extra, message, doc, monkeypatch, capsys):
    monkeypatch.setattr("beacon_llm.loading.load", _not_called)
    monkeypatch.setattr("sys.stdin", io.StringIO("Where?\n"))
    args = ["ask", doc, "Where?"] if command == "ask" else ["chat", doc]
    assert main([*args, *extra]) == 2
    err = capsys.readouterr().err
    assert f"beacon-llm: error: {message}" in err, err


def test_chat_refuses_a_document_that_leaves_no_room_before_asking(chat, tmp_path, monkeypatch):
    long = tmp_path / "long.txt"
    long.write_text("word " * 3000)
    code, out, err = chat(str(long), ["Where?"])
    assert code == 2
    assert re.search(r"long\.txt: the prompt has \d+ tokens .* more than this model's capacity", err), err
    assert "Ask about the document" not in err  # no question was asked of a document that cannot be read


def test_the_summary_says_where_reused_tokens_come_from(chat, doc):
    code, out, err = chat(doc, ["Where?", "Who is Em?"], "--no-cache")
    assert code == 0 and len(READ.findall(err)) == 2
    assert "books" not in err and "cache in memory, --no-cache)" in err


def test_an_answer_without_text_reports_no_first_token(chat, doc, monkeypatch):
    stream = BeaconEngine.stream

    def no_text(self, ids, **kwargs):  # an answer that ends at once (the model's first token is its end)
        yield from (item for item in stream(self, ids, **kwargs) if not isinstance(item, str))

    monkeypatch.setattr(BeaconEngine, "stream", no_text)
    code, out, err = chat(doc, ["Where?"])
    assert code == 0 and len(READ.findall(err)) == 1
    assert "first token after" not in err and "no text" in err


def test_ask_into_a_closed_pipe_ends_quietly(tiny_dirs, doc, tmp_path):
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first word is written (`beacon-llm ask ... | head -c 0`)
    env = {**os.environ, "BEACON_LLM_HOME": str(tmp_path / "home")}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "beacon_llm.cli", "ask", doc, "Where?", *_model_args(tiny_dirs), "--quiet"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            env=env,
            timeout=300,
            text=True,
        )
    finally:
        os.close(write_end)
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr, proc.stderr
    assert proc.returncode == 141
