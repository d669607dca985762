"""What the user-facing docs show, checked against the code: every command line they give parses with the parser
it names, the README's Python block runs (on the tiny model), and the defaults, option names, config keys, request
fields and capacities they state are the code's."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import runpy
import shlex
import shutil
import sys
from pathlib import Path

import pytest
import torch

import beacon_llm
from beacon_llm import BeaconConfig
from beacon_llm.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
MODEL_CARD = "beacon_llm/adapters/smollm2-135m-instruct/README.md"
DOCS = [
    "README.md",
    "docs/design.md",
    "docs/fit_schedule.md",
    "docs/serve.md",
    "integrations/langchain-beacon/README.md",
    "integrations/llama-index-llms-beacon/README.md",
    MODEL_CARD,
]


def _text(doc: str) -> str:
    return (ROOT / doc).read_text(encoding="utf-8")


def _section(doc: str, heading: str) -> str:
    """The text of a ``## heading`` section (up to the next heading of the same level)."""
    text = _text(doc)
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else len(text)]


def _commands(doc: str) -> list[str]:
    """Command lines a user would copy: lines of shell blocks and inline code that start with a program name."""
    text = _text(doc)
    found = []
    for lang, body in re.findall(r"```(\w*)\n(.*?)```", text, re.S):
        if lang in ("bash", "sh", ""):
            found += [line.strip() for line in re.sub(r"\\\n\s*", " ", body).splitlines()]
    inline = re.sub(r"\s*\n\s*", " ", re.sub(r"```.*?```", "", text, flags=re.S))
    found += re.findall(r"`((?:python|beacon-llm|\.venv/bin/beacon-llm) [^`]+)`", inline)
    return found


def _argv(command: str) -> list[str]:
    argv = shlex.split(command.replace("\\|", "|"), comments=True)
    return argv[: argv.index("|")] if "|" in argv else argv


# ------------------------------------------------------------------------------------------------- beacon-llm lines
def _cli_cases() -> list[tuple[str, str]]:
    cases = []
    for doc in DOCS:
        for command in _commands(doc):
            for part in command.split("&&"):  # the README's set-up line ends with the first ask
                argv = _argv(part.strip())
                if not argv or not argv[0].endswith("beacon-llm"):
                    continue
                if len(argv) < 3 or "..." in argv or "ask/chat" in argv:  # a bare name in prose, or a fragment
                    continue
                cases.append((doc, part.strip()))
    return cases


CLI_CASES = _cli_cases()


def test_the_docs_give_beacon_llm_command_lines():
    docs = {doc for doc, _ in CLI_CASES}
    assert {"README.md", "docs/serve.md", MODEL_CARD} <= docs
    assert len(CLI_CASES) >= 10


@pytest.mark.parametrize(("doc", "command"), CLI_CASES, ids=[f"{d}:{c[:60]}" for d, c in CLI_CASES])
def test_every_beacon_llm_command_in_the_docs_parses(doc, command):
    argv = _argv(command)
    try:
        build_parser().parse_args(argv[1:])
    except SystemExit as exc:  # argparse exits 2 on an unknown flag or a bad value
        pytest.fail(f"{doc}: `{command}` does not parse (exit {exc.code})")


# ------------------------------------------------------------------------------------------ python benchmarks/... lines
# placeholders the docs use for a value: a value the script accepts
_PLACEHOLDERS = {"N": "1", "R": "4", "DIR": "some/dir"}
_RECIPE = "kl_r32"


class _Parsed(BaseException):
    pass


def _benchmark_cases() -> list[tuple[str, str]]:
    cases = []
    for doc in DOCS:
        for command in _commands(doc):
            argv = _argv(command)
            if len(argv) >= 2 and argv[0] in ("python", ".venv/bin/python") and argv[1].startswith("benchmarks/"):
                cases.append((doc, command))
    return cases


BENCHMARK_CASES = _benchmark_cases()


def _benchmark_argv(command: str) -> list[str]:
    # optional parts "[--flag VALUE]" are given, the first of "a|b" alternatives taken
    command = re.sub(r"\[([^\]]*)\]", r"\1", command.replace("\\|", "|"))
    command = re.sub(r"(\S+)\|\S+", r"\1", command)
    argv = shlex.split(command, comments=True)
    script = argv[1]
    out = []
    for i, arg in enumerate(argv[2:]):
        previous = argv[1 + i]
        if arg == "NAME":
            arg = _RECIPE if (script.endswith("training_ablations.py") and previous == "--recipe") else "name"
        out.append(_PLACEHOLDERS.get(arg, arg))
    return [script, *out]


def test_the_docs_give_benchmark_command_lines():
    assert len(BENCHMARK_CASES) >= 60
    assert {doc for doc, _ in BENCHMARK_CASES} >= {"README.md", MODEL_CARD}


@pytest.mark.parametrize(("doc", "command"), BENCHMARK_CASES, ids=[f"{d}:{c[:70]}" for d, c in BENCHMARK_CASES])
def test_every_benchmark_command_in_the_docs_parses(doc, command, monkeypatch, capsys):
    """The script is run up to its argument parsing, which stops it: nothing is measured or written."""
    argv = _benchmark_argv(command)
    script = ROOT / argv[0]
    assert script.is_file(), f"{doc}: `{command}` names a script that does not exist"
    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(parse(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", [str(script), *argv[1:]])
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.chdir(ROOT)
    threads = torch.get_num_threads()
    try:
        runpy.run_path(str(script), run_name="__main__")
    except _Parsed:
        pass
    except SystemExit as exc:
        pytest.fail(f"{doc}: `{command}` does not parse: {capsys.readouterr().err.strip()[-300:]} (exit {exc.code})")
    else:
        pytest.fail(f"{doc}: {argv[0]} ran without parsing its arguments with argparse")
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------- flags named in prose
def _subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


def _options(*commands: str) -> set[str]:
    return {opt for name in commands for opt in _subparser(name)._option_string_actions}


FLAG_SECTIONS = [
    ("README.md", "The two commands", ("ask", "chat")),
    ("README.md", "Training beacons", ("train",)),
    ("docs/serve.md", None, ("serve",)),
]


@pytest.mark.parametrize(("doc", "section", "commands"), FLAG_SECTIONS)
def test_every_flag_the_docs_name_for_a_command_exists(doc, section, commands):
    text = _text(doc) if section is None else _section(doc, section)
    if doc == "docs/serve.md":  # the Ray section names Ray's own options (`serve run --address`)
        text = text[: text.index("## Scaling out on Ray Serve")]
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # the command lines are parsed whole above
    named = {m for m in re.findall(r"`(--[a-z][a-z0-9-]*)", text)}
    assert named, f"no flag found in {doc} {section}"
    missing = sorted(named - _options(*commands))
    assert not missing, f"{doc} names {missing}, which `beacon-llm {'/'.join(commands)}` does not take"


# ------------------------------------------------------------------------------------- the README's Python block
def test_the_readme_python_block_runs_on_the_tiny_model(tiny_dirs, tmp_path, monkeypatch, capsys):
    """The block as printed, with the tiny model's folders for its placeholders: the hub checkpoint line (hub and
    GPU) is left out, ``window=1024`` becomes 16 (the tiny model has 512 positions)."""
    block = re.search(r"```python\n(.*?)```", _section("README.md", "Python"), re.S).group(1)
    lines = [line for line in block.splitlines() if "namespace-Pt/" not in line]
    code = "\n".join(lines)
    assert "window=1024" in code and '"path/to/llama"' in code and '"my-beacons"' in code
    code = code.replace("window=1024", "window=16").replace('"path/to/llama"', repr(str(tiny_dirs / "base")))
    shutil.copytree(tiny_dirs / "adapter", tmp_path / "my-beacons")
    code = code.replace('"my-beacons"', repr(str(tmp_path / "my-beacons")))
    code = code.replace('"book.safetensors"', repr(str(tmp_path / "book.safetensors")))
    from beacon_llm.testing import tiny_beacon_model

    monkeypatch.setattr(beacon_llm, "load", lambda *a, **k: tiny_beacon_model())
    namespace = {"book_ids": torch.randint(5, 100, (1, 100)), "question_ids": torch.randint(5, 100, (1, 6))}
    exec(compile(code, "README.md#python", "exec"), namespace)

    bm, cache = namespace["bm"], namespace["cache"]
    assert set(cache.kv_by_kind()) == {"sink", "condensed", "raw", "total"}
    assert cache.kv_by_kind()["condensed"] > 0  # 100 tokens in windows of 16: condensed
    assert namespace["out"].token_logprobs.numel() == 99 and namespace["out"].loss is not None
    assert namespace["answer"].finish_reason in ("length", "eos", "stop")
    saved = sorted(p.name for p in (tmp_path / "my-beacons").iterdir())
    assert saved == ["beacon_config.json", "beacon_model.safetensors"]
    reloaded, _ = beacon_llm.load_cache(str(tmp_path / "book.safetensors"), bm)
    assert reloaded.kv_by_kind() == cache.kv_by_kind()


def test_the_readme_generate_call_takes_the_transformers_keywords():
    from transformers import TextStreamer

    from beacon_llm.testing import tiny_beacon_model

    bm = tiny_beacon_model()
    tokenizer = tok = bm.tokenizer
    text = "Dorothy lived in Kansas."
    ids = bm.generate(**tokenizer(text, return_tensors="pt"), max_new_tokens=4, do_sample=True, temperature=0.7,
                      top_p=0.9, top_k=20, repetition_penalty=1.1, stop_strings=["."],
                      streamer=TextStreamer(tok))  # fmt: skip
    assert isinstance(ids, torch.Tensor)
    out = bm.generate(**tokenizer(text, return_tensors="pt"), max_new_tokens=4, return_dict_in_generate=True)
    assert isinstance(out, beacon_llm.GenerateOutput) and isinstance(out.text, str)


# ------------------------------------------------------------------------------------------ configuration (design §1)
def _design_knobs() -> dict[str, str]:
    table = _text("docs/design.md").split("### 1.1 Knobs")[1].split("\n\n")[1]
    rows = [row.split("|")[1:-1] for row in table.splitlines()[2:]]
    return {cells[0].strip().strip("`"): cells[1].strip() for cells in rows}


def _shown(value: object) -> str:
    if isinstance(value, tuple):
        return "(" + ", ".join(str(v) for v in value) + ")"
    return str(value)


def test_the_design_knob_table_lists_every_config_field():
    fields = {f.name for f in dataclasses.fields(BeaconConfig) if f.init}
    assert set(_design_knobs()) == fields


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(BeaconConfig) if f.init])
def test_the_design_knob_table_gives_each_default(name):
    shown = _design_knobs()[name].replace("`", "")
    if name == "attend_previous":  # None: resolved by era
        assert shown == "v2: True" and BeaconConfig(era="v2", pos="append", attn="step-expansion").attend_previous
    elif name == "attend_prev":
        assert shown == "v3: True" and BeaconConfig().attend_prev is True
    else:
        default = next(f for f in dataclasses.fields(BeaconConfig) if f.name == name).default
        assert shown.split(" = ")[0] == _shown(default), f"design.md §1.1 says {shown!r}, the code {default!r}"


def test_the_readme_names_every_config_knob():
    text = _section("README.md", "Configuration")
    for field in dataclasses.fields(BeaconConfig):
        if field.init and field.name not in ("fit_overlap", "memory_gate"):  # those two: design.md only
            assert f"`{field.name}`" in text, field.name


def test_the_readme_error_example_is_the_message_the_code_gives():
    example = re.search(r"for example\s+`([^`]+)`", _section("README.md", "Configuration")).group(1)
    assert example == "beacon_stride=100 is not divisible by ratio 8"
    with pytest.raises(ValueError, match=re.escape(example)):
        BeaconConfig.from_dict({"beacon_window": 1024, "beacon_stride": [100], "beacon_ratio": [8],
                                "beacon_attend_previous": True})  # fmt: skip


_V3 = {"beacon_window": 1024, "beacon_ratio": [8], "beacon_param": ["q", "k", "v"]}
REFUSED = [  # design.md §1.4, each with the words of the rule
    ({**_V3, "retrieval_method": "bm25"}, "experimental mode"),
    ({**_V3, "beacon_parallel_window": 2}, "experimental mode"),
    ({**_V3, "beacon_foo": 1}, "unknown beacon config keys"),
    ({"beacon_window": 1024, "beacon_stride": [1024, 512], "beacon_ratio": [8], "beacon_attend_previous": True},
     "only a single stride"),
    ({**_V3, "beacon_param": ["q", "mlp"]}, "'mlp' is not supported"),
    ({**_V3, "beacon_ratio": [3]}, "not divisible by ratio 3"),
    ({**_V3, "beacon_ratio_mix": "fit-1024", "beacon_stride": 512}, "needs beacon_stride = beacon_window"),
    ({**_V3, "beacon_pos": "interleave", "beacon_attn": "step-expansion"}, "requires beacon_attend_prev=False"),
    ({**_V3, "beacon_fit_overlap": 64}, "only applies to a fit-N"),
    ({"beacon_window": 1024, "beacon_ratio": [8]}, "no beacon_param"),
    ({"hidden_size": 3}, "not an Activation Beacon config"),
]  # fmt: skip


@pytest.mark.parametrize(("config", "message"), REFUSED)
def test_the_refusals_of_design_1_4_are_value_errors_naming_the_rule(config, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        BeaconConfig.from_dict(config)


@pytest.mark.parametrize(
    ("config", "era", "attn", "pos", "param"),
    [  # design.md §1.3: the era detected and the defaults of an absent key
        ({"beacon_window": 1024, "beacon_ratio": [8], "beacon_attend_previous": True}, "v2", "step-expansion",
         "append", ("q", "k", "v", "o")),
        ({"beacon_window": 1024, "beacon_stride": [1024], "beacon_ratio": [8]}, "v2", "step-expansion", "append",
         ("q", "k", "v", "o")),
        (_V3, "v3", "step-expansion", "append", ("q", "k", "v")),
        ({**_V3, "beacon_pos": "interleave"}, "v3", "full-coverage", "interleave", ("q", "k", "v")),
    ],
)  # fmt: skip
def test_an_official_config_reads_with_the_documented_era_and_defaults(config, era, attn, pos, param):
    cfg = BeaconConfig.from_dict(config)
    assert (cfg.era, cfg.attn, cfg.pos, cfg.param) == (era, attn, pos, param)


# --------------------------------------------------------------------------------- capacities of the embedded model
def _shipped_config() -> BeaconConfig:
    return BeaconConfig.from_json_file(str(ROOT / "beacon_llm/adapters/smollm2-135m-instruct/beacon_config.json"))


def _number(text: str) -> int:
    return int(text.replace(",", ""))


EMBEDDED_POSITIONS = 8192  # SmolLM2-135M's max_position_embeddings, as the docs give it


def test_the_documented_embedded_capacities_are_the_codes():
    from beacon_llm.schedule import config_capacity, fit_capacity, ratio_capacity

    cfg = _shipped_config()
    assert (cfg.window, max(cfg.ratios), cfg.fit_overlap, cfg.ratio_mix) == (512, 32, 64, "fit-1024")
    with_overlap = config_capacity(cfg, EMBEDDED_POSITIONS)
    without = fit_capacity(32, EMBEDDED_POSITIONS, cfg.window, cfg.sink_size, 0)
    adapt = ratio_capacity(32, EMBEDDED_POSITIONS, cfg.window)

    fit_doc = re.sub(r"\s+", " ", _text("docs/fit_schedule.md"))
    said = re.search(r"K = 64\) that is ([\d,]+) tokens \(([\d,]+) without the overlap", fit_doc)
    assert said, "docs/fit_schedule.md no longer gives the embedded model's capacity"
    assert (_number(said.group(1)), _number(said.group(2))) == (with_overlap, without)

    card = re.sub(r"\s+", " ", _text(MODEL_CARD))
    said = re.search(r"Capacity ([\d,]+) tokens \(([\d,]+) without the overlap\)", card)
    assert said and (_number(said.group(1)), _number(said.group(2))) == (with_overlap, without)
    said = re.search(r"`adapt-1024` \(every window condensed at one ratio; capacity ([\d,]+)\)", card)
    assert said and _number(said.group(1)) == adapt


def test_forward_past_a_fit_plan_raises_the_documented_value_error():
    """docs/fit_schedule.md: the error gives the planned length, the positions and the fix."""
    from beacon_llm.testing import tiny_beacon_model

    bm = tiny_beacon_model(BeaconConfig(window=16, ratios=(2, 4), ratio_mix="fit-16"))
    cache = bm.new_cache()
    bm.forward(torch.randint(5, 100, (1, 600)), cache)  # beyond the 512 positions: planned for 600 + 16
    assert cache.kv_by_kind()["condensed"] > 0
    expected = r"512: it was planned \(once, at its first read\) for 616 tokens.*planned_length="
    with pytest.raises(ValueError, match=expected):
        bm.forward(torch.randint(5, 100, (1, 100)), cache)


def test_the_readme_ratio_8_refusal_gives_the_codes_capacity():
    from beacon_llm.schedule import ratio_capacity

    said = re.search(r"beyond the ratio-8 capacity of ([\d,]+) tokens", _text("README.md")).group(1)
    assert _number(said) == ratio_capacity(8, EMBEDDED_POSITIONS, 512)


# ------------------------------------------------------------------------------------------- environment variables
def test_the_documented_registry_bounds_are_the_defaults(monkeypatch):
    from beacon_llm import loading

    limits = re.sub(r"\s+", " ", _section("README.md", "Limits"))
    models = re.search(r"`\$BEACON_LLM_MAX_MODELS` loaded models \(default (\d+)\)", limits)
    engines = re.search(r"`\$BEACON_LLM_MAX_ENGINES` engines \(default (\d+)\)", limits)
    assert models and engines
    monkeypatch.delenv("BEACON_LLM_MAX_MODELS", raising=False)
    monkeypatch.delenv("BEACON_LLM_MAX_ENGINES", raising=False)
    assert loading._LOADED.max_size == int(models.group(1))
    assert loading._ENGINES.max_size == int(engines.group(1))
    monkeypatch.setenv("BEACON_LLM_MAX_MODELS", "1")
    assert loading._LOADED.max_size == 1


@pytest.mark.parametrize(
    ("value", "choice"),
    [("0", "off"), ("off", "off"), ("false", "off"), ("no", "off"), ("1", "on"), ("on", "on"), ("true", "on"),
     ("yes", "on"), ("auto", "auto"), ("", "auto"), ("maybe", None)],
)  # fmt: skip
def test_beacon_llm_native_kernels_takes_the_documented_values(value, choice, monkeypatch):
    from beacon_llm import native_kernels

    design = re.sub(r"\s+", " ", _text("docs/design.md"))
    assert "A value other than 0 / 1 (or off / on, false / true, no / yes), `auto` or unset is refused" in design
    monkeypatch.setenv("BEACON_LLM_NATIVE_KERNELS", value)
    if choice is None:
        with pytest.raises(ValueError, match="BEACON_LLM_NATIVE_KERNELS"):
            native_kernels.env_choice()
    else:
        assert native_kernels.env_choice() == choice


def test_beacon_llm_home_is_where_the_docs_say(monkeypatch, tmp_path):
    from beacon_llm.embedded import home
    from beacon_llm.serve import default_store_dir

    monkeypatch.delenv("BEACON_LLM_HOME", raising=False)
    assert home() == Path.home() / ".cache" / "beacon-llm"
    monkeypatch.setenv("BEACON_LLM_HOME", str(tmp_path))
    assert home() == tmp_path and default_store_dir() == tmp_path / "serve"
    assert "(default `$BEACON_LLM_HOME/serve`, i.e. `~/.cache/beacon-llm/serve`)" in _text("docs/serve.md")


# ------------------------------------------------------------------------------------------------------ the server
SERVE_DEFAULTS = [  # (what docs/serve.md says, the ServeLimits field, its value)
    ("`--max-body-bytes` (default 32 MiB", "max_body_bytes", 32 * 2**20),
    ("Default: 512 (`--max-tokens`)", "default_max_tokens", 512),
    ("`--max-engines` (default 8)", "max_engines", 8),
    ("`--max-prefixes` (default 2)", "max_prefixes", 2),
    ("`--max-concurrent` (default 4)", "max_concurrent", 4),
    ("`--max-queued` of them (default 64)", "max_queued", 64),
    ("`--shutdown-timeout` seconds (default 30)", "shutdown_timeout", 30),
    ("stored only when it holds at least 64 tokens", "min_prefix", 64),
]


@pytest.mark.parametrize(("said", "field", "value"), SERVE_DEFAULTS)
def test_the_documented_serve_defaults_are_the_codes(said, field, value):
    from beacon_llm.serve import ServeLimits

    assert said in re.sub(r"\s+", " ", _text("docs/serve.md"))
    assert getattr(ServeLimits(), field) == value


def test_the_ray_keys_docs_serve_lists_are_the_limits_fields():
    from beacon_llm.serve import ServeLimits

    text = re.sub(r"\s+", " ", _text("docs/serve.md"))
    listed = re.search(r"the `ServeLimits` fields \(([^)]*)\)", text).group(1)
    assert set(re.findall(r"`(\w+)`", listed)) == {f.name for f in dataclasses.fields(ServeLimits)}


@pytest.fixture(scope="module")
def served():
    from fastapi.testclient import TestClient

    from beacon_llm.serve import create_app
    from beacon_llm.testing import tiny_beacon_model

    with TestClient(create_app(tiny_beacon_model(), model_name="tiny")) as client:
        yield client


def _accepted(client, endpoint: str, body: dict) -> set[str]:
    response = client.post(endpoint, json={**body, "no_such_field": 1})
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    return set(message.split("accepted fields: ")[1].split(", "))


def test_the_request_field_table_is_what_the_server_accepts(served):
    table = _text("docs/serve.md").split("## Request fields")[1].split("\n\n")[1]
    documented = set()
    for row in table.splitlines()[2:]:
        documented |= set(re.findall(r"`(\w+)[^`]*`", row))
    # a message's `name`, the roles, a sub-field of stream_options: not request fields
    documented -= {"name", "system", "developer", "assistant", "include_obfuscation", "beacon_llm"}
    accepted = _accepted(served, "/v1/chat/completions", {"model": "tiny", "messages": []})
    accepted |= _accepted(served, "/v1/completions", {"model": "tiny", "prompt": ""})
    assert documented == accepted


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", "/health", 200), ("GET", "/v1/models", 200), ("GET", "/v1/models/tiny", 200),
     ("GET", "/v1/models/other", 404), ("GET", "/v1/chat/completions", 405), ("GET", "/no/such/path", 404)],
)  # fmt: skip
def test_the_documented_endpoints_answer(served, method, path, status):
    endpoints = _text("docs/serve.md").split("## Endpoints")[1].split("\n\n")[1]
    assert "`GET /health`" in endpoints and "`GET /v1/models`, `GET /v1/models/{id}`" in endpoints
    assert served.request(method, path).status_code == status


NEUTRAL_CHAT = {  # every field of the table at the value it says is accepted
    "max_tokens": 2, "max_completion_tokens": 2, "temperature": 0, "top_p": 1, "seed": 1, "stop": ["x"], "top_k": 3,
    "repetition_penalty": 1.1, "n": 1, "presence_penalty": 0, "frequency_penalty": 0, "logprobs": False,
    "top_logprobs": 0, "logit_bias": {}, "tools": [], "functions": None, "tool_choice": "none",
    "parallel_tool_calls": True, "response_format": {"type": "text"}, "modalities": ["text"], "audio": None,
    "user": "u", "metadata": {}, "store": False, "service_tier": "auto", "safety_identifier": "s",
    "prompt_cache_key": "k",
}  # fmt: skip


def test_the_request_fields_are_accepted_at_their_documented_values(served):
    messages = [{"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}], "name": "bob"}]  # fmt: skip
    response = served.post("/v1/chat/completions", json={"model": "tiny", "messages": messages, **NEUTRAL_CHAT})
    assert response.status_code == 200, response.json()
    assert set(response.json()["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens",
                                             "prompt_tokens_details"}  # fmt: skip
    body = {"model": "tiny", "prompt": [[5, 6, 7]], "max_tokens": 2, "echo": False, "suffix": "", "best_of": 1}
    assert served.post("/v1/completions", json=body).status_code == 200


def test_a_prompt_beyond_the_capacity_is_a_plain_400_in_a_stream_too(served):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "a" * 5000}], "stream": True, "max_tokens": 2}
    response = served.post("/v1/chat/completions", json=body)
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "stream_options": {"include_usage": True}}
    assert served.post("/v1/chat/completions", json=body).status_code == 400  # stream_options only with stream


def test_the_models_endpoint_gives_max_model_len_as_the_capacity(served):
    data = served.get("/v1/models").json()["data"]
    from beacon_llm.testing import tiny_beacon_model

    assert [m["id"] for m in data] == ["tiny"] and data[0]["max_model_len"] == tiny_beacon_model().capacity


# -------------------------------------------------------------------------------------------------- integrations
def _listed_names(doc: str, starts: str) -> set[str]:
    text = re.sub(r"\s+", " ", _text(doc))
    bullet = text.split(starts, 1)[1].split(" - ", 1)[0]
    return {name.rstrip("=") for name in re.findall(r"`(\w+=?)`", bullet)}


def test_the_langchain_readme_options_are_fields():
    from langchain_beacon import BeaconLLM, ChatBeacon

    names = _listed_names("integrations/langchain-beacon/README.md", "- `ChatBeacon` (chat model) and `BeaconLLM`")
    names -= {"ChatBeacon", "BeaconLLM"}
    assert {"model", "adapter", "max_tokens", "timeout", "cache_dir"} <= names
    for cls in (ChatBeacon, BeaconLLM):
        known = set(cls.model_fields) | {f.alias for f in cls.model_fields.values() if f.alias}
        assert names <= known, sorted(names - known)
    assert ChatBeacon(adapter="some/folder").beacon == "some/folder"


def test_the_llamaindex_readme_options_are_fields(tiny_dirs, tmp_path, monkeypatch):
    from llama_index.llms.beacon import BeaconLLM

    text = re.sub(r"\s+", " ", _text("integrations/llama-index-llms-beacon/README.md"))
    bullet = text.split("- `BeaconLLM`:", 1)[1].split("behave as in LlamaIndex's own LLMs", 1)[0]
    names = {name.rstrip("=") for name in re.findall(r"`(\w+=?)`", bullet)}
    names -= {"formatted"}  # a call argument, checked below
    assert {"model", "adapter", "max_new_tokens", "cache_dir", "system_prompt"} <= names
    assert names <= set(BeaconLLM.model_fields), sorted(names - set(BeaconLLM.model_fields))
    monkeypatch.setenv("BEACON_LLM_HOME", str(tmp_path))
    llm = BeaconLLM(model=str(tiny_dirs / "base"), adapter=str(tiny_dirs / "adapter"), max_new_tokens=2)
    assert llm.complete("Dorothy", formatted=True).raw["usage"]


# --------------------------------------------------------------------------------- training files (design §9.3)
def test_a_training_run_writes_the_documented_files(tiny_dirs, tmp_path, monkeypatch):
    from beacon_llm.cli import main

    monkeypatch.setenv("BEACON_LLM_HOME", str(tmp_path / "home"))
    out = tmp_path / "run"
    argv = ["train", "--model", str(tiny_dirs / "base"), "--data", str(tiny_dirs / "data.txt"), "--output-dir",
            str(out), "--steps", "2", "--seq-len", "64", "--grad-accum", "1", "--task-rate", "0", "--window", "16",
            "--ratios", "2", "4", "--save-every", "1", "--no-gradient-checkpointing"]  # fmt: skip
    assert main(argv) == 0
    documented = {"beacon_model.safetensors", "beacon_config.json", "optimizer.safetensors", "trainer_state.json"}
    for step in ("checkpoint-1", "checkpoint-2"):
        assert documented <= {p.name for p in (out / step).iterdir()}
    assert {p.name for p in (out / "final").iterdir()} >= {"beacon_model.safetensors", "beacon_config.json"}
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["state"]["step"] == 2 and {"tokens", "samples", "history"} <= set(state["state"]) and state["data_rng"]
    assert main([*argv, "--fresh"]) == 0  # the earlier run is moved aside, as the help and design §9.3 say
    assert any(p.name.startswith("earlier-run-") for p in out.iterdir())


def test_train_data_reads_the_documented_jsonl_form(tmp_path):
    from beacon_llm.tasks import read_corpus

    assert '`.jsonl` files (one `{"text": ...}` object per\nline)' in _section("README.md", "Training beacons")
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"text": "Dorothy lived in Kansas."}) + "\n" + json.dumps({"text": "Toto too."}) + "\n")
    (tmp_path / "book.md").write_text("# Oz\n\nThe Wizard.\n")
    assert read_corpus([data, tmp_path / "book.md"])[:2] == ["Dorothy lived in Kansas.", "Toto too."]
    with pytest.raises(ValueError, match="data.jsonl"):
        data.write_text(json.dumps({"body": "no text field"}) + "\n")
        read_corpus([data])


# ------------------------------------------------------------------------------------------- names the docs cite
def _cited_names() -> list[tuple[str, str]]:
    modules = {p.stem for p in (ROOT / "beacon_llm").glob("*.py")} - {"__init__", "serve_ray"}
    found = []
    for doc in DOCS:
        for name in sorted(set(re.findall(r"`((?:beacon_llm\.)?[A-Za-z_]+\.[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)?)(?:\(\))?`",
                                            _text(doc)))):  # fmt: skip
            head = name.removeprefix("beacon_llm.").split(".")[0]
            if name.endswith((".py", ".json", ".md", ".c")):
                continue
            if head in modules or head in _CLASSES:
                found.append((doc, name))
    return found


def _classes() -> dict[str, str]:
    """Class name -> module, for the classes the package defines (the docs cite ``Class.method``)."""
    out = {}
    for path in (ROOT / "beacon_llm").glob("*.py"):
        if path.stem != "serve_ray":
            for name in re.findall(r"^class (\w+)", path.read_text(encoding="utf-8"), re.M):
                out.setdefault(name, path.stem)
    return out


_CLASSES = _classes()


NOT_OURS = {  # dotted names in the docs whose first part is not one of the package's modules
    "serve.deployment",  # Ray Serve's
    "serve.shutdown",
    "model.beacon_embed_tokens",  # an attribute of the transformers model, checked below
}
CITED = [(doc, name) for doc, name in _cited_names() if name not in NOT_OURS]


def test_fresh_beacons_add_the_documented_modules():
    from beacon_llm.testing import tiny_base_model

    base = tiny_base_model()
    beacon_llm.BeaconModel.attach(base, BeaconConfig(window=16, ratios=(2, 4), param=("q", "k", "v", "o")))
    names = {name for name, _ in base.named_modules()}
    assert "model.beacon_embed_tokens" in names
    assert {f"model.layers.0.self_attn.beacon_{p}_proj" for p in "qkvo"} <= names


def test_the_docs_cite_module_names():
    assert len(CITED) >= 30


@pytest.mark.parametrize(("doc", "name"), CITED, ids=[f"{d}:{n}" for d, n in CITED])
def test_every_module_name_the_docs_cite_exists(doc, name):
    import importlib

    parts = name.removeprefix("beacon_llm.").split(".")
    parts = [{"engine": "BeaconEngine"}.get(parts[0], parts[0]), *parts[1:]]  # an engine object's method
    if parts[0] in _CLASSES:
        parts = [_CLASSES[parts[0]], *parts]
    obj = importlib.import_module(f"beacon_llm.{parts[0]}")
    for part in parts[1:]:
        if isinstance(obj, type) and part in getattr(obj, "__dataclass_fields__", {}):
            return  # a dataclass field
        assert hasattr(obj, part), f"{doc} cites `{name}`, which does not exist"
        obj = getattr(obj, part)
