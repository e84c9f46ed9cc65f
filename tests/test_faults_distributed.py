"""Faults of data-parallel runs (gloo, CPU): every process agrees on a non-finite loss that only
one of them sees, a second job on a run folder in use stops on every process, and a prior with
dropout resumes exactly under the same number of processes and runs on under another
(docs/faults.md)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from vqvae2.checkpoint import read_checkpoint
from vqvae2.cli import main
from vqvae2.distributed import DistributedContext
from vqvae2.loop import training_lock

from .conftest import TINY_CLI, assert_states_close, metric_values, torchrun, write_npz
from .test_faults_resume import assert_bit_identical, rewind

pytestmark = pytest.mark.slow  # starts torchrun

NONFINITE_WORKER = r'''
"""Under torchrun: train stage 1 twice, with train.nonfinite=stop and =skip, the loss of rank 1
alone NaN at its third step; each process writes what became of each run."""

import json
import os
import sys
from pathlib import Path

from safetensors.torch import save_file

from vqvae2.config import VQVAERunConfig, load_config
from vqvae2.train import train_vqvae
from vqvae2.vqvae import VQVAE2

data, out = sys.argv[1], Path(sys.argv[2])
rank = int(os.environ["RANK"])
forward = VQVAE2.forward
calls = [0]


def poisoned_forward(self, images):
    output = forward(self, images)
    if self.training:
        calls[0] += 1
        if rank == 1 and calls[0] == 3:
            return output._replace(loss=output.loss * float("nan"))
    return output


VQVAE2.forward = poisoned_forward
for policy in ("stop", "skip"):
    calls[0] = 0
    overrides = ["model.image_size=16", "train.batch_size=8", "train.max_steps=4"]
    overrides += ["train.val_every=1000", "train.log_every=1", f"train.nonfinite={policy}"]
    config = load_config(VQVAERunConfig, "tiny", overrides)
    outcome = {}
    try:
        result = train_vqvae(config, data, out / policy, progress=False)
        outcome["step"] = result.step
        state = {k: v.contiguous() for k, v in result.model.state_dict().items()}
        save_file(state, str(out / f"{policy}-rank{rank}.safetensors"))
    except ValueError as error:
        outcome["error"] = str(error)
    (out / f"{policy}-rank{rank}.json").write_text(json.dumps(outcome))
'''


def test_every_process_stops_or_skips_when_one_process_has_a_non_finite_loss(tmp_path):
    """Rank 1 alone sees NaN at step 3. stop: both processes stop there with the error (none
    hangs in a collective); skip: both skip it and end with the same finite weights."""
    worker = tmp_path / "nonfinite_worker.py"
    worker.write_text(NONFINITE_WORKER)
    data = write_npz(tmp_path / "blobs.npz", count=64)
    torchrun(2, worker, data, tmp_path)
    outcome = {
        (policy, rank): json.loads((tmp_path / f"{policy}-rank{rank}.json").read_text())
        for policy in ("stop", "skip")
        for rank in (0, 1)
    }
    for rank in (0, 1):
        assert outcome["stop", rank]["error"].startswith("the loss is not finite at step 3")
        assert outcome["skip", rank] == {"step": 4}
    weights = [load_file(str(tmp_path / f"skip-rank{rank}.safetensors")) for rank in (0, 1)]
    assert_states_close(weights[0], weights[1], atol=0.0)
    assert all(bool(torch.isfinite(t).all()) for t in weights[0].values() if t.is_floating_point())
    skipped = metric_values(tmp_path / "skip" / "metrics.csv", "train", "skipped_nonfinite")
    assert skipped == {1: 0.0, 2: 0.0, 3: 1.0, 4: 1.0}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_data_parallel_job_on_a_run_folder_in_use_stops_on_every_process(tmp_path):
    """While another trainer holds RUN/vqvae, both processes of a two-process job end at once
    with one line each: rank 0 the refusal, rank 1 what the collective told it. The processes
    get torchrun's environment but no torchrun, which would stop rank 1 as soon as rank 0 ends
    and hide whether rank 1 learned the outcome itself."""
    data = write_npz(tmp_path / "blobs.npz", count=64)
    run = tmp_path / "run"
    group = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    command = [sys.executable, "-m", "vqvae2", "train-vqvae", "--config", "tiny", "--data"]
    command += [str(data), "--out", str(run), "--quiet", "model.image_size=16"]
    with training_lock(run / "vqvae", DistributedContext(), resume=False):
        ranks = [
            subprocess.Popen(
                [*command, "train.batch_size=8"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env={
                    **os.environ,
                    **group,
                    "RANK": str(r),
                    "LOCAL_RANK": str(r),
                    "OMP_NUM_THREADS": "1",
                },
            )
            for r in (0, 1)
        ]
        try:
            ended = [rank.communicate(timeout=120) for rank in ranks]
        finally:
            for rank in ranks:  # a process still waiting in a collective fails the test
                if rank.poll() is None:
                    rank.kill()
                    rank.wait()
    lines = [stderr.strip().splitlines()[-1] if stderr.strip() else "" for _, stderr in ended]
    assert [rank.returncode for rank in ranks] == [2, 2], [stderr for _, stderr in ended]
    assert lines == [
        f"vqvae2: error: another trainer is writing {run / 'vqvae'} (it holds "
        f"{run / 'vqvae' / '.lock'}); wait for it to end or stop it",
        f"vqvae2: error: rank 0 cannot train in {run / 'vqvae'}; see its error",
    ]
    assert not any("Traceback" in stderr for _, stderr in ended)
    assert sorted(p.name for p in (run / "vqvae").iterdir()) == [".lock"]
    assert not (run / "metrics.csv").exists()


def test_a_prior_with_dropout_resumes_exactly_under_two_processes_and_runs_under_one(
    tmp_path, caplog
):
    """Each process's own dropout stream is saved and restored on its rank: two processes
    resumed at step 2 end at step 4 bit for bit as uninterrupted. Resumed by one process, the
    streams cannot be mapped: the run goes on from a stream seeded by (seed, step, rank), says
    so, and saves the state of its own process. (Two processes resuming one's checkpoint:
    tests/test_distributed.py, and the rule is the same.)"""
    data = write_npz(tmp_path / "blobs.npz", count=64)
    base = tmp_path / "base"
    stage_one = ["train-vqvae", *TINY_CLI]
    assert main([*stage_one, "--data", str(data), "--out", str(base), "--max-steps", "2"]) == 0
    assert main(["extract-codes", str(base), "--data", str(data), "--quiet"]) == 0
    two = shutil.copytree(base, tmp_path / "two")
    prior = ["-m", "vqvae2", "train-prior", "--level", "top", "--quiet"]
    options = ["prior.dropout=0.1", "train.batch_size=8", "train.checkpoint_every=2"]
    torchrun(2, *prior, two, *options, "train.val_every=1000", "--max-steps", "4")
    states = read_checkpoint(two / "prior-top", "prior-top", with_optimizer=True).random_state
    assert sorted(states) == [0, 1]
    assert not torch.equal(states[0]["cpu"], states[1]["cpu"])  # each process its own masks

    resumed = rewind(two, tmp_path / "resumed", "prior-top", 2)
    torchrun(2, *prior, resumed, "--resume")
    assert_bit_identical(
        resumed / "prior-top" / "step-00000004", two / "prior-top" / "step-00000004"
    )

    one = rewind(two, tmp_path / "one", "prior-top", 2)
    with caplog.at_level(logging.WARNING, logger="vqvae2.loop"):
        assert main(["train-prior", str(one), "--level", "top", "--resume", "--quiet"]) == 0
    assert "holds the random state of 2 process(es) and this run has 1" in caplog.text
    final = read_checkpoint(one, "prior-top", with_optimizer=True)
    assert final.step == 4 and sorted(final.random_state) == [0]
    assert all(t.isfinite().all() for t in final.model_state.values() if t.is_floating_point())
