"""Data-parallel training through accelerate: two CPU processes train on their own shares of the samples and end
with identical beacon weights (gradients are averaged every step)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from beacon_llm import BeaconConfig, beacon_state_dict
from beacon_llm.testing import tiny_beacon_model

SCRIPT = Path(__file__).parent / "scripts" / "accelerate_train.py"


def test_two_cpu_processes_end_with_identical_beacon_weights(tmp_path):
    # accelerate's --cpu flag starts processes through MPI only; --multi_gpu starts them through torchrun, which on a
    # machine without GPUs gives CPU processes over gloo (the script's Accelerator(cpu=True))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch, "--dynamo_backend", "no", str(SCRIPT)]
    cmd.append(str(tmp_path))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    infos = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [i["world"] for i in infos] == [2, 2]
    assert infos[0]["losses"] != infos[1]["losses"]  # each process trained on its own samples
    assert infos[0]["tokens"] == infos[1]["tokens"] == 3 * 2 * 64  # 3 steps x 2 processes x 64 tokens
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1)]
    start = beacon_state_dict(tiny_beacon_model(BeaconConfig(window=16, ratios=(2, 4), ratio_mix="step-random")).model)
    assert ranks[0].keys() == ranks[1].keys() == start.keys()
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    assert any(not torch.equal(ranks[0][k], start[k]) for k in start)  # training changed the beacons
