"""Run by ``accelerate launch --multi_gpu --num_processes 2`` (without GPUs: CPU processes over gloo): a few
training steps of a tiny beacon model; each process writes its beacon weights and its losses to OUT/rank<r>.*."""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from beacon_llm import BeaconConfig, beacon_state_dict
from beacon_llm.tasks import SampleStream
from beacon_llm.testing import tiny_beacon_model
from beacon_llm.training import TrainConfig, train


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    bm = tiny_beacon_model(BeaconConfig(window=16, ratios=(2, 4), ratio_mix="step-random"))
    text = "Dorothy lived in the midst of the great Kansas prairies, with Uncle Henry and Aunt Em. " * 20
    stream = SampleStream([text], bm.tokenizer, 64, seed=0)
    cfg = TrainConfig(output_dir=str(out / "run"), steps=3, seq_len=64, grad_accum=1, lr=1e-2, warmup_steps=1,
                      save_every=100, gradient_checkpointing=False)  # fmt: skip
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    state = train(bm, stream, cfg, resume=False, accelerator=accelerator, progress=False)
    rank = accelerator.process_index
    save_file({k: v.detach().contiguous() for k, v in beacon_state_dict(bm.model).items()},
              str(out / f"rank{rank}.safetensors"))  # fmt: skip
    losses = [h["loss"] for h in state.history]
    (out / f"rank{rank}.json").write_text(
        json.dumps({"world": accelerator.num_processes, "tokens": state.tokens, "losses": losses})
    )


if __name__ == "__main__":
    main()
