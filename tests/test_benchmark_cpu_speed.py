"""benchmarks/cpu_speed.py: the fast mode's results file, and the pure parts (llama-bench parsing, merging, ratios,
the first ask's cold home, ``--repo``) without building or running anything heavy."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "cpu_speed.py"


def _module():
    if str(SCRIPT.parent) not in sys.path:  # the script imports its folder's _results, as when it runs
        sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("cpu_speed", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_fast_mode_writes_rows_machine_and_ratios(tmp_path):
    out = tmp_path / "cpu_speed_fast.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--fast", "--threads", "1", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert set(data) >= {"machine", "rows", "ratios"}
    assert data["machine"]["threads"] == 1
    assert set(data["machine"]["flags"]) == {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16"}
    assert {"cpu", "torch", "native_bf16"} <= set(data["machine"])
    kinds = {(r["kind"], r["context_tokens"]) for r in data["rows"]}
    assert kinds == {("prefill", 256), ("decode", 256)}
    for row in data["rows"]:
        assert {"engine", "dtype", "kind", "context_tokens", "tok_s", "commit"} <= set(row)
        assert row["engine"] == "beacon_llm" and row["dtype"] == "float32"
        assert row["tok_s"] > 0 and row["kv_entries"] > 0 and "error" not in row
        assert row["native_kernels"] is False  # float32: the stock kernels
    decode = next(r for r in data["rows"] if r["kind"] == "decode")
    assert decode["decode_generated"] == 8 and "after the first generated token" in decode["decode_timing"]
    assert data["ratios"] == {"decode_vs_anchor_f32": [], "prefill_vs_anchor_f32": []}  # no anchor in fast mode


LLAMA_BENCH_JSON = """main: some log line
[
  {"build_commit": "unknown", "build_number": 0, "n_threads": 1, "n_prompt": 512, "n_gen": 0, "n_depth": 0,
   "avg_ts": 1000.5, "stddev_ts": 3.25, "samples_ns": [1, 2], "flash_attn": -1, "type_k": "f16",
   "model_type": "llama ?B all F32"},
  {"build_commit": "unknown", "build_number": 0, "n_threads": 1, "n_prompt": 0, "n_gen": 16, "n_depth": 512,
   "avg_ts": 50.0, "stddev_ts": 0.5, "samples_ns": [1, 2], "flash_attn": -1, "type_k": "f16",
   "model_type": "llama ?B all F32"}
]
"""


def test_llama_bench_output_becomes_rows():
    cs = _module()
    rows = cs.anchor_rows(cs.parse_llama_bench(LLAMA_BENCH_JSON), "float32", "pkg==1")
    assert [(r["kind"], r["context_tokens"], r["tok_s"]) for r in rows] == [
        ("prefill", 512, 1000.5),
        ("decode", 512, 50.0),
    ]
    assert rows[1]["decode_tokens"] == 16 and rows[0]["decode_tokens"] is None
    assert all(r["engine"] == "llama.cpp" and r["build"] == "unknown (0)" for r in rows)


def test_rows_merge_by_key_and_ratios_against_anchor_f32():
    cs = _module()
    here, there = str(cs.ROOT), "/elsewhere"

    def row(engine, dtype, kind, n, tok_s, commit="c1"):
        return {"engine": engine, "dtype": dtype, "kind": kind, "context_tokens": n, "tok_s": tok_s, "commit": commit}

    old = [
        row("llama.cpp", "float32", "decode", 512, 100.0),
        row("llama.cpp", "float32", "decode", 32768, 50.0),
        row("beacon_llm", "float32", "decode", 512, 10.0),
        row("beacon_llm", "float32", "decode", 512, 70.0, commit="old"),
    ]
    new = [row("beacon_llm", "float32", "decode", 512, 90.0), row("beacon_llm", "bfloat16", "decode", 32768, 30.0)]
    merged = cs.merge_rows(old, new)
    assert len(merged) == 5  # the re-measured row replaced, the other commit's kept
    assert {r["tok_s"] for r in merged if r["commit"] == "c1" and r["engine"] == "beacon_llm"} == {90.0, 30.0}
    asks = [
        {**row("beacon_llm", "default", "first_ask", None, None, "base"), "seconds": 300.0, "exit_code": 0}
        | {"checkout": there, "measured_at": "2026-01-01T00:00:00"},
        {**row("beacon_llm", "default", "first_ask", None, None, "c1"), "seconds": 200.0, "exit_code": 0}
        | {"checkout": here, "measured_at": "2026-01-02T00:00:00"},
    ]
    ratios = cs.compute_ratios(merged + asks)
    decode = {(e["dtype"], e["commit"], e["context_tokens"]): e for e in ratios["decode_vs_anchor_f32"]}
    assert decode[("float32", "c1", 512)]["ratio"] == 0.9 and decode[("float32", "c1", 512)]["meets_target"]
    assert decode[("float32", "old", 512)]["ratio"] == 0.7 and not decode[("float32", "old", 512)]["meets_target"]
    assert decode[("bfloat16", "c1", 32768)] == {
        "dtype": "bfloat16",
        "commit": "c1",
        "context_tokens": 32768,
        "project_tok_s": 30.0,
        "anchor_f32_tok_s": 50.0,
        "ratio": 0.6,
        "target": 0.7,
        "meets_target": False,
    }
    assert ratios["first_ask"]["speedup"] == 1.5 and ratios["first_ask"]["baseline"]["commit"] == "base"


def test_results_file_is_merged_not_overwritten(tmp_path):
    cs = _module()
    out = tmp_path / "r.json"
    first = {"engine": "llama.cpp", "dtype": "float32", "kind": "decode", "context_tokens": 512, "tok_s": 100.0}
    cs.write_results(out, {"anchor": {"version": "x"}}, [{**first, "commit": "a"}])
    data = cs.write_results(out, {"machine": {"threads": 2}}, [{**first, "engine": "beacon_llm", "commit": "b"}])
    assert data["anchor"] == {"version": "x"} and data["machine"] == {"threads": 2}
    assert len(data["rows"]) == 2 and data["ratios"]["decode_vs_anchor_f32"][0]["ratio"] == 1.0
    assert json.loads(out.read_text()) == data
    assert not list(tmp_path.glob(".*tmp"))


def test_first_ask_runs_cold_against_the_chosen_checkout(tmp_path):
    cs = _module()
    source = tmp_path / "home"
    for name in (cs.EMBEDDED_MODEL, "wheels", "books", "serve"):
        (source / name).mkdir(parents=True)
    home = cs.cold_home(source)
    try:
        assert sorted(p.name for p in home.iterdir()) == sorted([cs.EMBEDDED_MODEL, "wheels"])
        assert (home / cs.EMBEDDED_MODEL).resolve() == (source / cs.EMBEDDED_MODEL).resolve()
    finally:
        for p in home.iterdir():
            p.unlink()
        home.rmdir()
    cmd = cs.first_ask_command(2)
    assert cmd[1:] == [
        "-m",
        "beacon_llm.cli",
        "ask",
        "beacon_llm/books/wonderful_wizard_of_oz.txt",
        "How does Dorothy finally get back to Kansas?",
        "--threads",
        "2",
    ]
    env, cwd = cs.checkout_env(tmp_path)
    assert cwd == tmp_path and env["PYTHONPATH"].split(":")[0] == str(tmp_path)
    assert cs.checkout_env(None)[1] == cs.ROOT


def test_repo_option_measures_the_first_ask_or_with_project_only_the_project_side(tmp_path):
    cs = _module()
    ask = cs.parse_args(["--repo", str(tmp_path)])
    assert ask.skip_anchor and ask.skip_project and not ask.skip_ask
    project = cs.parse_args(["--repo", str(tmp_path), "--project-only"])
    assert project.skip_anchor and project.skip_ask and not project.skip_project
    default = cs.parse_args([])
    assert (default.prefill, default.contexts, default.decode_tokens) == ([512, 4096], [512, 8192, 32768], 64)
    specs = cs.project_specs(default, ["float32"])
    assert [(s["context"], s["prefill"], s["decode"]) for s in specs] == [
        (512, True, True),
        (4096, True, False),
        (8192, False, True),
        (32768, False, True),
    ]


def test_a_dtype_the_loader_refuses_is_recorded_as_skipped():
    cs = _module()
    spec = {"dtype": "auto", "threads": 2, "context": 512, "prefill": True, "decode": True, "decode_tokens": 64}
    spec["warmup"] = 64
    rows = cs.project_rows(spec, {"error": "ValueError: dtype 'auto'", "stage": "load"}, "c1")
    assert [(r["kind"], r["tok_s"], r["skipped"], r["error"]) for r in rows] == [
        ("prefill", None, True, "ValueError: dtype 'auto'"),
        ("decode", None, True, "ValueError: dtype 'auto'"),
    ]
    assert cs.compute_ratios(rows) == {"decode_vs_anchor_f32": [], "prefill_vs_anchor_f32": []}


def test_llama_bench_commands_and_build_flags(tmp_path):
    cs = _module()
    args = cs.parse_args(["--threads", "3", "--prefill", "512", "--contexts", "512", "32768", "--decode-tokens", "16"])
    prefill, decode = cs.llama_bench_commands(Path("/b/llama-bench"), Path("/m.gguf"), args)
    assert prefill == ["/b/llama-bench", "-m", "/m.gguf", "-t", "3", "-r", "5", "-o", "json", "-p", "512", "-n", "0"]
    assert decode[-6:] == ["-p", "0", "-n", "16", "-d", "512,32768"]
    configure, build = cs.build_commands(tmp_path / "tree", tmp_path / "build", 2)
    assert {"-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF"} <= set(configure)
    assert build[-4:] == ["--target", "llama-bench", "-j", "2"]


def test_decode_bandwidth_bound_from_the_model_shape():
    """Bytes a decoded token reads (weights + KV entries) and the best long/short decode ratio they allow."""
    from types import SimpleNamespace

    mod = _module()
    # SmolLM2-135M's shape: 30 layers, hidden 576, 9 heads, 3 KV heads, MLP 1536, vocabulary 49,152
    config = SimpleNamespace(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                             num_key_value_heads=3, vocab_size=49152)  # fmt: skip
    dims = mod.model_dims(config)
    assert dims == {"layers": 30, "kv_heads": 3, "head_dim": 64, "linear_params": 134_479_872}
    assert mod.decode_bytes(dims, 1, 2) == (268_959_744, 23_040)  # one entry: 30 layers x (k, v) x 3 x 64 x 2 bytes
    rows = [
        {"engine": "beacon_llm", "kind": "decode", "dtype": "bfloat16", "commit": "c", "threads": 2,
         "context_tokens": n, "kv_entries": e, "tok_s": t}
        for n, e, t in ((512, 512, 40.0), (32768, 6976, 20.0))
    ] + [{"engine": "llama.cpp", "kind": "decode", "dtype": "float32", "commit": "x", "context_tokens": 512,
          "kv_entries": 512, "tok_s": 30.0}]  # fmt: skip
    (bound,) = mod.decode_bandwidth_bound(rows, dims)
    assert bound["measured_ratio"] == 0.5 and bound["kv_entries"] == 6976
    weights, short_kv, long_kv = 268_959_744, 512 * 23_040, 6976 * 23_040
    assert bound["bandwidth_bound_ratio"] == round((weights + short_kv) / (weights + long_kv), 3) == 0.653
