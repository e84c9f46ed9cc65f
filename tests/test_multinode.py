"""Multi-node training under torchrun: two agents on this machine, one process each, join one
group by c10d rendezvous as two nodes of a cluster do (ranks assigned by the rendezvous, no
``--node_rank``), and train stage 1 as one process does on the same global batch.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import assert_states_close, write_npz
from .ddp_worker import run

pytestmark = pytest.mark.slow  # starts two torchrun agents

WORKER = Path(__file__).with_name("ddp_worker.py")
STEPS = 4
# Both agents together; the run takes 10-20 s on this shared 2-core machine. A rendezvous that never
# completes would wait out torchrun's default timeout (900 s): the test stops it before.
TIMEOUT_SECONDS = 120


def free_port() -> int:
    """A TCP port on localhost that nothing listens on now (the rendezvous store takes it)."""
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def agent_command(endpoint: str, rdzv_id: str, *args: object) -> list[str]:
    """One node's agent: the command of docs/distributed.md with one process per node."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc_per_node=1",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint={endpoint}",
        f"--rdzv_id={rdzv_id}",
        *map(str, args),
    ]


def stop(agent: subprocess.Popen) -> None:
    """End an agent still running: SIGTERM, on which torchrun stops its workers (they run in
    sessions of their own), then SIGKILL if it has not exited within 30 s."""
    if agent.poll() is None:
        agent.terminate()
        try:
            agent.wait(timeout=30)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()


def run_two_nodes(logs: Path, *args: object) -> None:
    """Start two agents at once as nodes of one job and wait for both; unless both exit 0
    within ``TIMEOUT_SECONDS``, stop them and fail the test with both agents' output."""
    endpoint = f"localhost:{free_port()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LOGLEVEL": "INFO"}
    agents, outputs = [], [logs / f"agent{node}.log" for node in (0, 1)]
    for output in outputs:
        with output.open("w") as sink:
            agents.append(
                subprocess.Popen(
                    agent_command(endpoint, "vqvae2-test", *args),
                    stdout=sink,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
            )
    deadline = time.monotonic() + TIMEOUT_SECONDS
    while time.monotonic() < deadline and any(agent.poll() is None for agent in agents):
        time.sleep(0.2)
    timed_out = any(agent.poll() is None for agent in agents)
    for agent in agents:
        stop(agent)
    codes = [agent.returncode for agent in agents]
    if timed_out or codes != [0, 0]:
        report = [f"timed out after {TIMEOUT_SECONDS} s" if timed_out else f"exit codes {codes}"]
        for node, output in enumerate(outputs):
            report.append(
                f"--- agent {node} (exit {codes[node]}) ---\n{output.read_text()[-6000:]}"
            )
        pytest.fail("\n".join(report), pytrace=False)


def test_two_nodes_of_one_process_match_one_process(tmp_path):
    """Each agent brings one process; world size 2 exists only if both joined one group. The
    two processes end bit-identical, and within float rounding of one process."""
    data = write_npz(tmp_path / "blobs.npz", count=64)
    two = tmp_path / "two"
    run_two_nodes(tmp_path, WORKER, "vqvae", data, two, STEPS)
    run("vqvae", data, tmp_path / "one", STEPS)
    ranks = [two / f"vqvae-rank{rank}-of-2.safetensors" for rank in (0, 1)]
    assert_states_close(ranks[0], ranks[1], atol=0.0)
    assert_states_close(ranks[0], tmp_path / "one" / "vqvae-rank0-of-1.safetensors", atol=1e-5)
    assert (two / "vqvae" / "latest").read_text().strip() == f"step-{STEPS:08d}"
