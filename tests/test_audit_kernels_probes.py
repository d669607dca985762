"""Probe contexts with a SentencePiece-style tokenizer (Llama 2, Mistral): its decoder drops the leading space of the
first token decoded, so a token decoded alone never shows the space that starts a sentence."""

import re

import numpy as np

from beacon_llm.documents import BUNDLED_BOOK, read_document
from beacon_llm.probes import make_probe_context, sentence_boundaries

TEXT = read_document(BUNDLED_BOOK)[5000:40000]


def _sentencepiece_like():
    """A word-level tokenizer with Llama 2's tokenizer.json normaliser and decoder (``▁`` for spaces; the decoder
    replaces them back and strips one leading space)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for piece in sorted(set(TEXT)) + ["▁"] + sorted({"▁" + w for w in re.findall(r"\S+", TEXT)}):
        vocab.setdefault(piece, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="▁", behavior="merged_with_next")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_sentence_boundaries_are_found_with_a_tokenizer_that_strips_the_first_space():
    tok = _sentencepiece_like()
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids[1:2])[:1] != " "  # the tokenizer drops the leading space of a token decoded alone
    bounds = sentence_boundaries(tok, ids)
    assert len(bounds) > 100
    for i in bounds:  # each one starts a new sentence after a sentence end
        before, after = tok.decode(ids[:i]), tok.decode(ids[: i + 1])
        assert before.rstrip().endswith((".", "!", "?", '."', '!"', '?"'))
        assert after[len(before) :][:1].isspace()


def test_a_probe_context_is_built_with_a_tokenizer_that_strips_the_first_space():
    tok = _sentencepiece_like()
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    ctx, probes = make_probe_context(tok, ids, 3000, np.random.default_rng(0))
    assert len(ctx) == 3000
    assert all(probe.depths and all(0 <= d < 1 for d in probe.depths) for probe in probes)
