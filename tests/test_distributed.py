"""moss train under torchrun: DDP and FSDP2 on 2 CPU processes (gloo), against 1 process."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
TORCHRUN = shutil.which("torchrun")
pytestmark = pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not on the PATH")
ARGS = ["--batch-size", "4", "--rank", "4", "--lr", "1e-2", "--warmup", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _train(out: Path, nproc: int, *extra, wait=True):
    cmd = ([TORCHRUN, "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else
           [sys.executable]) + ["-m", "moss", "train", *ARGS, "--out", str(out), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=ENV, start_new_session=True)
    if not wait:
        return proc
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-4000:]
    return output


def _losses(out: Path):
    return [json.loads(line)["loss"] for line in (out / "train.log").read_text().splitlines()]


def _adapter(out: Path):
    from safetensors.torch import load_file

    return load_file(out / (out / "latest").read_text() / "moss_adapter.safetensors")


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    _train(out, 1, "--steps", "10", "--save-every", "5")
    return out


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp", "fsdp+checkpointing"])
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, single, wrapper):
    flags = {"ddp": [], "fsdp": ["--fsdp"],
             "fsdp+checkpointing": ["--fsdp", "--gradient-checkpointing"]}[wrapper]
    _train(tmp_path, 2, "--steps", "10", "--save-every", "5", *flags)
    torch.testing.assert_close(_losses(tmp_path), _losses(single), rtol=1e-5, atol=1e-5)
    a, b = _adapter(tmp_path), _adapter(single)
    assert a.keys() == b.keys()
    for k in a:  # (DDP also checks, on the ranks, that their adapters are bitwise equal)
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)


def test_a_killed_run_resumes_and_ends_where_an_uninterrupted_run_ends(tmp_path):
    steps = ["--steps", "300", "--save-every", "50"]
    straight = tmp_path / "straight"
    _train(straight, 2, *steps)
    killed = tmp_path / "killed"
    proc = _train(killed, 2, *steps, wait=False)
    deadline = time.time() + 300
    while not (killed / "latest").is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    at = (killed / "latest").read_text()
    assert at != "checkpoint-300", "the run finished before it could be killed"
    other_world = tmp_path / "other"
    shutil.copytree(killed, other_world)
    _train(killed, 2, *steps, "--resume")
    a, b = _adapter(killed), _adapter(straight)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    # The checkpoint holds whole tensors, so 1 process can take over from 2. (It does not end
    # bitwise where 2 would: the ranks' reduction order differs, and 250 steps amplify it.)
    _train(other_world, 1, *steps, "--resume")
    assert (other_world / "latest").read_text() == "checkpoint-300"
    assert _losses(other_world)[-1] == pytest.approx(_losses(straight)[-1], rel=0.05)


def test_the_global_batch_must_split_evenly(tmp_path):
    proc = _train(tmp_path, 2, "--steps", "2", "--batch-size", "3", wait=False)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "must be a multiple of the 2 processes" in output
