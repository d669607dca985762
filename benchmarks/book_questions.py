"""A fixed list of questions about the bundled book, answered by ``beacon-llm ask`` exactly as a user runs it.

Every question is one ``beacon-llm ask`` process with the default settings (plus ``--extra`` arguments, e.g. an
official ratio mode for comparison). The first question reads the whole book; the others reuse the condensed book
from the disk cache, as a user's follow-up questions do. An answer is correct when it contains one of the question's
accepted strings and none of its rejected ones (case-insensitive).

``--excerpt first|last`` asks about the first or last part of the book that fits the base model's positions with
the question and the answer, so the plain model's score (which cannot read the whole book) stands beside it.

    python benchmarks/book_questions.py --label fit
    python benchmarks/book_questions.py --label adapt --extra="--ratio-mix adapt-1024"
    python benchmarks/book_questions.py --label plain_last --excerpt last
    python benchmarks/book_questions.py --fast      # two questions on a small excerpt (CI smoke run)
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
QUESTIONS = ROOT / "benchmarks" / "data" / "oz_questions.json"


def is_correct(answer: str, accept: list[str], reject: list[str]) -> bool:
    """The scoring rule of the question file: one accepted string, no rejected one (case-insensitive)."""
    text = answer.lower()
    return any(a.lower() in text for a in accept) and not any(r.lower() in text for r in reject)


def excerpt(book: str, part: str, n_tokens: int, model: str | None = None) -> str:
    """The first or last ``n_tokens`` tokens of ``book`` (the model's tokenizer; default: the embedded one), as text."""
    from transformers import AutoTokenizer

    from beacon_llm.loading import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model(model))
    ids = tok(book, add_special_tokens=False)["input_ids"]
    ids = ids[:n_tokens] if part == "first" else ids[-n_tokens:]
    return tok.decode(ids)


def ask(document: str, question: str, extra: list[str], threads: int, max_new_tokens: int | None) -> dict:
    cmd = [sys.executable, "-m", "beacon_llm.cli", "ask", document, question, "--quiet", "--threads", str(threads)]
    if max_new_tokens is not None:
        cmd += ["--max-new-tokens", str(max_new_tokens)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd + extra, capture_output=True, text=True, cwd=ROOT)
    return {
        "answer": proc.stdout.strip(),
        "exit_code": proc.returncode,
        "stderr_tail": proc.stderr.strip()[-400:] if proc.returncode else "",
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", default="default", help="name of this run in the results file")
    parser.add_argument("--extra", default="", help="extra `beacon-llm ask` arguments, one string")
    parser.add_argument("--excerpt", choices=["first", "last"], default=None)
    parser.add_argument("--excerpt-tokens", type=int, default=7600)
    parser.add_argument("--questions", default=str(QUESTIONS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fast", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    spec = json.loads(Path(args.questions).read_text())
    questions = spec["questions"]
    book_path = str(ROOT / spec["book"])
    extra = shlex.split(args.extra)
    max_new = None
    tmp = None
    model = None
    if args.fast:  # a tiny random model on a short excerpt: the pipeline, not the score
        import beacon_llm
        from beacon_llm.testing import tiny_base_model, tiny_beacon_model

        questions, args.excerpt, args.excerpt_tokens, max_new = questions[:2], "first", 300, 8
        folder = Path(tempfile.mkdtemp(prefix="beacon-fast-"))
        bm = tiny_beacon_model()
        tiny_base_model().save_pretrained(folder / "base")
        bm.tokenizer.save_pretrained(folder / "base")
        beacon_llm.save_adapter(bm, str(folder / "adapter"))
        model = str(folder / "base")
        extra += ["--model", model, "--adapter", str(folder / "adapter"), "--no-cache"]
    document = book_path
    if args.excerpt:
        text = excerpt(Path(book_path).read_text(encoding="utf-8"), args.excerpt, args.excerpt_tokens, model)
        tmp = tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8")
        tmp.write(text)
        tmp.close()
        document = tmp.name
    rows = []
    try:
        for q in questions:
            answer = ask(document, q["question"], extra, args.threads, max_new)
            row = {"id": q["id"], "question": q["question"], **answer}
            row["correct"] = row["exit_code"] == 0 and is_correct(row["answer"], q["accept"], q["reject"])
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        if tmp is not None:
            os.unlink(tmp.name)
    run = {
        "label": args.label,
        "document": "whole book" if not args.excerpt else f"{args.excerpt} {args.excerpt_tokens} tokens",
        "extra_args": args.extra,
        "correct": sum(r["correct"] for r in rows),
        "total": len(rows),
        "rows": rows,
    }
    print(f"{args.label}: {run['correct']}/{run['total']} correct")
    RESULTS.mkdir(exist_ok=True)
    out_path = Path(args.out) if args.out else RESULTS / f"book_questions{'_fast' if args.fast else ''}.json"
    runs = json.loads(out_path.read_text())["runs"] if out_path.is_file() else {}
    runs[args.label] = run
    tmp_out = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    tmp_out.write_text(json.dumps({"questions": str(Path(args.questions).relative_to(ROOT)), "runs": runs}, indent=2))
    os.replace(tmp_out, out_path)
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
