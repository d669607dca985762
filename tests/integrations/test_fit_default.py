"""With the fit-N default, a document that fits the base positions (with its question and answer) gets exactly the
plain model's answer through every entry point: the CLI, LangChain's ChatBeacon and BeaconLLM, LlamaIndex's BeaconLLM
and query engine. The reference is the stock transformers model fed the same token calls with its own KV cache."""

import pytest

import beacon_llm
from beacon_llm import BeaconConfig, BeaconEngine, BeaconModel
from beacon_llm.testing import plain_reference_tokens, tiny_base_model, tiny_beacon_model

FIT = BeaconConfig(window=16, ratios=(2, 4), ratio_mix="fit-16")
DOC = "Toto is a small black dog who lives in Kansas with Dorothy. "
EOS = 2


class Recorder:
    """Records each engine call (prompt ids, options, the model calls that read the prompt) and replays it on the
    plain model."""

    def __init__(self, monkeypatch):
        self.calls = []
        stream, forward = BeaconEngine.stream, BeaconModel.forward

        def spy_stream(engine, ids, **kw):
            self.calls.append({"engine": engine, "ids": list(ids), "kw": kw, "chunks": []})
            return stream(engine, ids, **kw)

        def spy_forward(bm, input_ids, cache=None, **kw):
            if kw.get("planned_length") is not None and self.calls:  # a prompt read (generation steps plan nothing)
                self.calls[-1]["chunks"].append([int(i) for i in input_ids])
            return forward(bm, input_ids, cache, **kw)

        monkeypatch.setattr(BeaconEngine, "stream", spy_stream)
        monkeypatch.setattr(BeaconModel, "forward", spy_forward)

    def plain_text(self, index=-1):
        call = self.calls[index]
        assert sum(map(len, call["chunks"])) == len(call["ids"])  # read raw, nothing from a cache
        engine, kw = call["engine"], call["kw"]
        tokens, _ = plain_reference_tokens(
            engine.bm.model, call["chunks"], kw["max_new_tokens"], repetition_penalty=kw.get("repetition_penalty"),
            eos_token_ids=(EOS,),
        )  # fmt: skip
        return engine.tokenizer.decode([t for t in tokens if t != EOS], skip_special_tokens=True)


@pytest.fixture
def fit_engine():
    return BeaconEngine(tiny_beacon_model(FIT, max_position_embeddings=512))


def test_cli_answer_that_fits_is_the_plain_models(tmp_path, monkeypatch, capsys):
    from beacon_llm.cli import main

    bm = tiny_beacon_model()
    tiny_base_model().save_pretrained(tmp_path / "base")
    bm.tokenizer.save_pretrained(tmp_path / "base")
    beacon_llm.save_adapter(bm, str(tmp_path / "adapter"))
    monkeypatch.setenv("BEACON_LLM_HOME", str(tmp_path / "home"))
    doc = tmp_path / "doc.txt"
    doc.write_text(DOC * 4)
    rec = Recorder(monkeypatch)
    args = ["ask", str(doc), "Who is Toto?", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter")]
    assert main([*args, "--max-new-tokens", "10", "--quiet"]) == 0
    printed = capsys.readouterr().out.strip()
    assert rec.calls[-1]["engine"].bm.config.is_fit  # the CLI's default mode
    assert printed == rec.plain_text().strip()


def test_langchain_chat_and_llm_answers_that_fit_are_the_plain_models(fit_engine, monkeypatch):
    pytest.importorskip("langchain_core")
    from langchain_beacon import BeaconLLM, ChatBeacon

    rec = Recorder(monkeypatch)
    chat = ChatBeacon(engine=fit_engine, max_tokens=10, repetition_penalty=1.15)
    answer = chat.invoke([("system", DOC * 4), ("human", "Who is Toto?")]).content
    assert answer == rec.plain_text()
    follow = chat.invoke([("system", DOC * 4), ("human", "Where?")])
    assert follow.usage_metadata["input_token_details"]["cache_read"] > 0  # the document is not read again
    llm = BeaconLLM(engine=fit_engine, max_tokens=10)
    assert llm.invoke(DOC * 3 + "Question: who is Toto?") == rec.plain_text()


def test_llamaindex_llm_and_query_engine_answers_that_fit_are_the_plain_models(fit_engine, monkeypatch):
    pytest.importorskip("llama_index.core")
    from llama_index.core import Document
    from llama_index.llms.beacon import BeaconLLM, BeaconQueryEngine

    rec = Recorder(monkeypatch)
    llm = BeaconLLM(engine=fit_engine, max_new_tokens=10)
    assert llm.complete(DOC * 3 + "Who is Toto?").text == rec.plain_text()
    qe = BeaconQueryEngine.from_documents([Document(text=DOC * 4)], llm=llm)
    assert str(qe.query("Who is Toto?")).strip() == rec.plain_text().strip()
