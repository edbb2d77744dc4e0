"""DDP on CPU: two torchrun ranks route identically and end with identical weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration


def test_two_ranks_route_identically_and_agree_on_weights(tmp_path):
    worker = Path(__file__).with_name("ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker),
               str(tmp_path)]
    launcher = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = launcher.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        # SIGTERM, not SIGKILL: torchrun then stops its workers (they live in their own sessions and
        # would outlive a killed launcher).
        launcher.terminate()
        _, stderr = launcher.communicate(timeout=60)
        pytest.fail(f"torchrun did not finish in 240 s:\n{stderr[-4000:]}")
    assert launcher.returncode == 0, stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    # 16 rows, 2 per device, 2 ranks: the distributed sampler gives 4 optimizer steps, not 8.
    assert [r["world"] for r in ranks] == [2, 2]
    assert [r["steps"] for r in ranks] == [4, 4]
    assert len(ranks[0]["winners"]) == 4
    for w0, w1, s0, s1 in zip(ranks[0]["winners"], ranks[1]["winners"], ranks[0]["scores"], ranks[1]["scores"]):
        assert torch.equal(w0, w1)
        torch.testing.assert_close(s0, s1, atol=0, rtol=0)
    for key, value in ranks[0]["weights"].items():
        torch.testing.assert_close(ranks[1]["weights"][key], value, atol=0, rtol=0, msg=key)
    # Routing was not trivial: after warmup the FFT expert does not win everywhere every step.
    assert any(not w[:, 0].all() for w in ranks[0]["winners"][1:])
    log = tmp_path / "runs"
    assert len(list(log.glob("*/molf_routing.jsonl"))) == 1
