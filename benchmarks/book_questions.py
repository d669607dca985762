"""A fixed list of questions about the bundled book, answered by ``beacon-llm ask`` exactly as a user runs it.

Every question is one ``beacon-llm ask`` process with the default settings (plus ``--extra`` arguments, e.g. an
official ratio mode for comparison). The first question reads the whole book; the others reuse the condensed book
from the disk cache, as a user's follow-up questions do. An answer is correct when it contains one of the question's
accepted strings and none of its rejected ones, each as a whole word (a plural ending allowed; case-insensitive).

``--excerpt first|last`` asks about the first or last part of the book that fits the base model's positions with
the question and the answer, so the plain model's score (which cannot read the whole book) stands beside it.

    python benchmarks/book_questions.py --label after_fit_default
    python benchmarks/book_questions.py --label before_adapt_default --extra="--ratio-mix adapt-1024"
    python benchmarks/book_questions.py --label plain_last_7600 --excerpt last
    python benchmarks/book_questions.py --label plain_first_7600 --excerpt first
    python benchmarks/book_questions.py --fast      # two questions on a small excerpt (CI smoke run)
    python benchmarks/book_questions.py --plan-only # no model run: the prompt length and the fit plan of question 1

``--plan-only`` tokenises the whole book and the first question as ``beacon-llm ask`` does (the embedded tokenizer,
the shipped adapter's config with the CLI's inference defaults and answer length) and stores the read plan the
engine computes for them under ``"plan"`` in the results file; the runs are kept as they are.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _results import write_json

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
QUESTIONS = ROOT / "benchmarks" / "data" / "oz_questions.json"


def mentions(text: str, word: str) -> bool:
    """``word`` appears in ``text`` as a whole word, or with a plural ending ("shoe" in "silver shoes"), ignoring
    case: "em" in "Aunt Em" but not in "them" or "Emerald", "red" in "bright red" but not in "covered"."""
    pattern = r"(?<![^\W_])" + re.escape(word.lower()) + r"(?:s|es)?(?![^\W_])"
    return re.search(pattern, text.lower()) is not None


def is_correct(answer: str, accept: list[str], reject: list[str]) -> bool:
    """The scoring rule of the question file: one accepted string, no rejected one, each as a whole word (a plural
    ending allowed), case-insensitive."""
    return any(mentions(answer, a) for a in accept) and not any(mentions(answer, r) for r in reject)


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


def read_plan(book_path: str, question: str) -> dict:
    """Prompt length and read plan of ``beacon-llm ask BOOK QUESTION`` with the default settings (the embedded
    model, the shipped adapter), computed as the CLI and the engine compute them, without loading any weights."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from beacon_llm import _compat
    from beacon_llm.ask import DEFAULT_SYSTEM
    from beacon_llm.cli import build_parser
    from beacon_llm.config import CONFIG_NAME, BeaconConfig
    from beacon_llm.documents import read_document
    from beacon_llm.engine import BeaconEngine
    from beacon_llm.loading import DEFAULT_ANSWER_RESERVE, inference_overrides, resolve_model, shipped_adapter
    from beacon_llm.schedule import fit_plan, planned_read_length

    max_new = build_parser().parse_args(["ask", book_path, question]).max_new_tokens  # the CLI's default
    model = resolve_model(None)
    adapter = shipped_adapter()
    if adapter is None:
        raise SystemExit("this installation ships no beacon adapter for the embedded model")
    overrides = inference_overrides({}, max(max_new, DEFAULT_ANSWER_RESERVE))  # as beacon_llm.ask.load_for_cli
    cfg = BeaconConfig.from_dict(json.loads((Path(adapter) / CONFIG_NAME).read_text()), **overrides)
    positions = _compat.max_positions_from_dict(json.loads((Path(model) / "config.json").read_text()))
    tok = AutoTokenizer.from_pretrained(model)
    # the prompt of BeaconEngine.document_prompt: the document part tokenised on its own, then the question
    prefix_text, rest_text = BeaconEngine.document_prompt_text(
        SimpleNamespace(tokenizer=tok), read_document(book_path), question, system=DEFAULT_SYSTEM
    )

    def encode(text: str) -> list[int]:
        return list(tok(text, add_special_tokens=False)["input_ids"])

    prefix = encode(prefix_text)
    n_prompt = len(prefix) + len(encode(rest_text))
    # the engine reads with the answer length as its reserve (BeaconEngine._read)
    planned = planned_read_length(cfg, positions, n_prompt, max_new, len(prefix))
    plan = fit_plan(cfg, planned, positions)
    return {
        "book": str(Path(book_path).relative_to(ROOT)),
        "question": question,
        "ratio_mix": cfg.ratio_mix,
        "max_positions": positions,
        "answer_reserve": max_new,
        "prompt_tokens": n_prompt,
        "document_tokens": len(prefix),
        "fit_plan": plan.to_dict(),
        "raw_tokens": n_prompt - plan.raw_from,
    }


def write_results(out_path: Path, questions: str, *, run: dict | None = None, plan: dict | None = None) -> None:
    """Add a run (by its label) or the read plan to the results file, keeping everything else in it."""
    data = json.loads(out_path.read_text()) if out_path.is_file() else {}
    data["questions"] = questions
    data.setdefault("runs", {})
    if run is not None:
        data["runs"][run["label"]] = run
    if plan is not None:
        data["plan"] = plan
    write_json(out_path, data)
    print(f"wrote {out_path}")


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
    parser.add_argument(
        "--plan-only", action="store_true", help="store the prompt length and read plan of question 1, run nothing"
    )
    args = parser.parse_args()

    spec = json.loads(Path(args.questions).read_text())
    questions = spec["questions"]
    book_path = str(ROOT / spec["book"])
    questions_file = str(Path(args.questions).relative_to(ROOT))
    if args.plan_only:
        plan = read_plan(book_path, questions[0]["question"])
        print(json.dumps(plan, indent=2))
        write_results(Path(args.out) if args.out else RESULTS / "book_questions.json", questions_file, plan=plan)
        return
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
    out_path = Path(args.out) if args.out else RESULTS / f"book_questions{'_fast' if args.fast else ''}.json"
    write_results(out_path, questions_file, run=run)


if __name__ == "__main__":
    main()
