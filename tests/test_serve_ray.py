"""``beacon_llm.serve_ray`` on a local Ray (CPU only): two replicas of the server over a tiny model saved to disk,
behind Ray Serve's HTTP proxy, sharing one store. Both replicas answer, with the same greedy answers as the
in-process engine, and a document condensed by one replica is reused from the shared disk store by the other."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile

import pytest

pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install -e '.[ray]'")

import httpx  # noqa: E402
from serve_helpers import MAX_TOKENS, MODEL, cached, chat_body, document, tiny_model  # noqa: E402

import beacon_llm  # noqa: E402
from beacon_llm import BeaconEngine  # noqa: E402
from beacon_llm.serve import ServeLimits, load_model  # noqa: E402
from beacon_llm.testing import tiny_base_model  # noqa: E402

OVERRIDES = {"beacon_ratio_mix": "fit-64"}  # as tests/serve_helpers.py reads the tiny model
TRIES = 60  # requests sent until both replicas answered (each goes to a random one of the two: 2**-60 to miss)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """The tiny model as replicas load it: base weights + tokenizer, and the beacon adapter, in folders."""
    root = tmp_path_factory.mktemp("tiny")
    bm = tiny_model()
    tiny_base_model().save_pretrained(root / "base")  # the same base weights, without beacons
    bm.tokenizer.save_pretrained(root / "base")
    beacon_llm.save_adapter(bm, str(root / "adapter"))
    return root


@pytest.fixture(scope="module")
def ray_serve(model_dirs, tmp_path_factory):
    """A local Ray (2 CPUs, no dashboard) with two replicas deployed; yields (base URL, store folder)."""
    import ray
    from ray import serve

    from beacon_llm.serve_ray import deploy

    store = tmp_path_factory.mktemp("store")
    saved = {k: os.environ.get(k) for k in ("RAY_USAGE_STATS_ENABLED", "OMP_NUM_THREADS")}
    os.environ.update(RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1")  # inherited by Ray's workers
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths live under it
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=temp)
    try:
        port = _free_port()
        deploy(
            str(model_dirs / "base"),
            adapter=str(model_dirs / "adapter"),
            beacon_overrides=OVERRIDES,
            model_name=MODEL,
            store_dir=store,
            limits=ServeLimits(min_prefix=8, max_concurrent=2),
            threads=1,
            num_replicas=2,
            num_cpus=0.5,
            port=port,
        )
        yield f"http://127.0.0.1:{port}", store
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            shutil.rmtree(temp, ignore_errors=True)
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def _replica(response: httpx.Response) -> str:
    return response.headers["x-beacon-replica"]


def test_two_replicas_share_one_store_and_answer_alike(ray_serve, model_dirs):
    url, store = ray_serve
    client = httpx.Client(base_url=url, timeout=120)

    pids: dict[str, str] = {}
    for _ in range(TRIES):
        response = client.get("/health")
        assert response.status_code == 200 and response.json() == {"status": "ok", "model": MODEL}
        pids[_replica(response)] = response.headers["x-beacon-pid"]
        if len(pids) == 2:
            break
    assert len(pids) == 2, f"only replica(s) {pids} answered {TRIES} requests"
    assert len(set(pids.values()) | {str(os.getpid())}) == 3  # two worker processes, neither of them this one

    doc, first_question, follow_up = document(0), "Who walked?", "How many crows?"
    first = client.post("/v1/chat/completions", json=chat_body(doc, first_question))
    assert first.status_code == 200, first.text
    reader = _replica(first)
    assert cached(first.json()) == 0  # this replica read the document and stored it in the shared folder
    files = list(store.rglob("*.safetensors"))
    assert len(files) == 1

    answers: dict[str, list[dict]] = {}  # replica -> its responses to the follow-up, in order
    for _ in range(TRIES):
        response = client.post("/v1/chat/completions", json=chat_body(doc, follow_up))
        assert response.status_code == 200, response.text
        answers.setdefault(_replica(response), []).append(response.json())
        if len(answers) == 2:
            break
    assert set(answers) == set(pids), f"only replica(s) {list(answers)} answered the follow-up"
    other = next(r for r in answers if r != reader)
    engine = BeaconEngine(load_model(str(model_dirs / "base"), adapter=str(model_dirs / "adapter"), **OVERRIDES))
    messages = [{"role": "system", "content": doc}, {"role": "user", "content": follow_up}]
    ids, boundary = engine.encode_chat(messages)
    expected = engine.complete(ids, boundary=boundary, max_new_tokens=MAX_TOKENS)
    for responses in answers.values():
        for r in responses:
            assert r["choices"][0]["message"]["content"] == expected.text  # same greedy answer on both replicas
            assert r["usage"]["completion_tokens"] == expected.usage.output_tokens
    # the other replica never read the document: its first follow-up found it condensed in the shared disk store
    assert cached(answers[other][0]) == boundary > 0
    assert list(store.rglob("*.safetensors")) == files  # reused, not read and written again

    streamed = chat_body(doc, follow_up, stream=True, stream_options={"include_usage": True})
    with client.stream("POST", "/v1/chat/completions", json=streamed) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == expected.text
    assert cached(chunks[-1]) == boundary  # streams pass through Ray's proxy unchanged

    bad = client.post("/v1/chat/completions", json={**chat_body(doc, follow_up), "n": 2})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "n"  # the server's own errors too
    client.close()


def test_build_app_reads_serve_run_arguments():
    """``serve run beacon_llm.serve_ray:build_app key=value``: strings become the options of ``application``."""
    from beacon_llm.serve_ray import build_app

    app = build_app(
        {"model": "m", "num_replicas": "3", "num_cpus": "0.5", "max_concurrent": "2", "ratio": "8,16", "window": "512"}
    )
    deployment = app._bound_deployment
    assert deployment.num_replicas == 3 and deployment.ray_actor_options["num_cpus"] == 0.5
    assert deployment.max_ongoing_requests == 2
    kwargs = deployment.init_kwargs
    assert deployment.init_args == ("m",) and kwargs["limits"]["max_concurrent"] == 2
    assert kwargs["beacon_overrides"] == {"beacon_ratio": [8, 16], "beacon_window": 512}
    assert os.path.isabs(kwargs["store_dir"])
