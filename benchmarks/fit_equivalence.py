"""The embedded model with its default configuration (fit-N): a document that fits the base positions, with its
question and answer, gives exactly the plain model's logits and greedy answer (``torch.equal``, not a tolerance).

Three checks on a slice of the bundled book: (1) ``BeaconModel.forward`` logits over the whole prompt against the stock
model's, (2) the engine's answer (document and question read in two calls, as ``beacon-llm ask`` does) against the
stock model fed the same two calls with its own KV cache and decoded greedily, with the logits of every step,
(3) ``BeaconModel.generate`` against ``transformers`` ``generate``.

    python benchmarks/fit_equivalence.py                # about 6,000 document tokens
    python benchmarks/fit_equivalence.py --fast         # tiny model (CI smoke run)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from _results import write_json

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true")
    parser.add_argument("--doc-tokens", type=int, default=6000)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import beacon_llm
    from beacon_llm.testing import plain_reference_tokens

    if args.fast:
        from beacon_llm.testing import tiny_beacon_model

        cfg = beacon_llm.BeaconConfig(window=16, ratios=(2, 4), ratio_mix="fit-16")
        bm = tiny_beacon_model(cfg, max_position_embeddings=512)
        args.doc_tokens, args.new_tokens = 300, 8
    else:
        bm = beacon_llm.load()
    engine = beacon_llm.BeaconEngine(bm)
    tok = bm.tokenizer
    book = beacon_llm.read_document(beacon_llm.BUNDLED_BOOK)
    doc = tok.decode(tok(book, add_special_tokens=False)["input_ids"][: args.doc_tokens])
    ids, boundary = engine.document_prompt(doc, "Who is Toto?")
    total = len(ids) + args.new_tokens
    if total > bm.max_positions:
        raise SystemExit(f"{total} tokens do not fit the {bm.max_positions} positions; lower --doc-tokens")
    result: dict = {"ratio_mix": bm.config.ratio_mix, "prompt_tokens": len(ids), "positions": bm.max_positions}

    with torch.no_grad():
        out = bm.forward(ids, return_logits=True, planned_length=total)
        plain = bm.model(input_ids=torch.tensor([ids])).logits[0].float()  # (L, V)
    result["forward_logits_equal"] = bool(torch.equal(out.logits, plain))
    result["forward_max_abs_diff"] = float((out.logits - plain).abs().max())
    result["memory"] = out.cache.kv_by_kind()
    del out, plain

    configured = bm.model.generation_config.eos_token_id
    configured = [configured] if isinstance(configured, int) else list(configured or [])
    eos = tuple(sorted({tok.eos_token_id, *configured}))
    completion = engine.complete(ids, boundary=boundary, max_new_tokens=args.new_tokens, repetition_penalty=1.15)
    ref_tokens, ref_logits = plain_reference_tokens(
        bm.model, [ids[:boundary], ids[boundary:]], args.new_tokens, repetition_penalty=1.15, eos_token_ids=eos
    )
    result["engine_answer"] = completion.text
    result["engine_tokens_equal"] = completion.token_ids == [t for t in ref_tokens if t not in eos]
    cache = bm.new_cache()
    with torch.no_grad():
        bm.forward(ids[:boundary], cache, planned_length=total, return_token_logprobs=False)
        steps = [bm.forward(ids[boundary:], cache, return_token_logprobs=False).last_logits]
        for t in ref_tokens[:-1]:
            steps.append(bm.forward([t], cache, return_token_logprobs=False).last_logits)
    result["engine_step_logits_equal"] = all(torch.equal(a, b) for a, b in zip(steps, ref_logits))
    result["engine_steps_compared"] = len(ref_logits)

    prompt = torch.tensor(ids)
    ours = bm.generate(prompt, max_new_tokens=args.new_tokens, return_dict_in_generate=True)
    theirs = bm.model.generate(prompt[None], max_new_tokens=args.new_tokens, do_sample=False)
    result["generate_tokens_equal"] = ours.new_tokens == theirs[0, len(ids) :].tolist()
    result["all_equal"] = all(result[k] for k in ("forward_logits_equal", "engine_tokens_equal",
                                                  "engine_step_logits_equal", "generate_tokens_equal"))  # fmt: skip
    print(json.dumps(result, indent=2))
    RESULTS.mkdir(exist_ok=True)
    out_path = Path(args.out) if args.out else RESULTS / f"fit_equivalence{'_fast' if args.fast else ''}.json"
    write_json(out_path, result)
    if not result["all_equal"]:
        raise SystemExit("fit-N differs from the plain model on a read that fits")


if __name__ == "__main__":
    main()
