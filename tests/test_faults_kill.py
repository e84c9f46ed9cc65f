"""kill -9 trials: ``train-vqvae``, ``train-prior`` and ``train-classifier`` killed at random
moments, some inside a checkpoint write, then resumed with ``--resume``: no checkpoint is ever
unreadable, and the resumed run ends with the weights of an uninterrupted one, dropout included
(the prior's and the classifier's are on; docs/faults.md).

The trials run the CLI in processes forked from a server that has imported vqvae2 once (a
fresh interpreter spends about 3 s importing torch, the whole budget of a trial). The process
is killed with SIGKILL from this test, either a random time after its first optimiser step (a
trial that ends before its kill is run again from the start with half the delay, so every trial
ends by a kill) or while a hook holds it inside a checkpoint write: after the n-th call that
vqvae2/checkpoint.py makes to ``save_file``, ``os.fsync``, ``os.replace`` or ``shutil.rmtree``,
n drawn among the calls an uninterrupted run makes. The hook lives in the server script below,
never in vqvae2.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from vqvae2.checkpoint import LATEST, MODEL_WEIGHTS, OPTIMIZER_WEIGHTS, read_checkpoint
from vqvae2.logs import read_metrics
from vqvae2.run import has_checkpoint

from .conftest import assert_states_close, write_npz

pytestmark = pytest.mark.slow

SERVER = r'''
"""Fork server of the kill -9 trials (written by tests/test_faults_kill.py).

Requests on stdin, one JSON object a line: {"argv": [...], "log": PATH, "hook": {...}}. Each
runs ``vqvae2.cli.main(argv)`` in a forked child whose output goes to PATH, and which writes
PATH.ended if it ends on its own; the server answers {"pid": N} once the child runs. The child
is reaped only after the next line on stdin, so N stays its pid until the test has killed it;
the server then answers {"signal": S, "code": C}.

hook keys: "started": a file written at the child's first optimiser step; "pause": [FUNCTION,
N] with "marker": after the N-th call that vqvae2/checkpoint.py makes to FUNCTION returns, write
the marker and sleep (the test kills the child there); "count": a file that gets the calls of
each function and the seconds from the first optimiser step to the end.
"""

import collections
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

import torch
import torch._dynamo  # noqa: F401  (the first optimiser imports it: seconds, paid once here)
from torch.optim.optimizer import register_optimizer_step_post_hook

import vqvae2.checkpoint as checkpoint
import vqvae2.train  # noqa: F401
from vqvae2.cli import main

PAUSE_SECONDS = 600


def install(hook):
    calls = collections.Counter()
    first_step = []

    def on_step(*_):
        if not first_step:
            first_step.append(time.monotonic())
            if "started" in hook:
                Path(hook["started"]).write_text("")

    register_optimizer_step_post_hook(on_step)

    def wrap(owner, attribute):
        original = getattr(owner, attribute)

        def wrapper(*args, **kwargs):
            result = original(*args, **kwargs)
            if sys._getframe(1).f_code.co_filename == checkpoint.__file__:
                calls[attribute] += 1
                if hook.get("pause") == [attribute, calls[attribute]]:
                    Path(hook["marker"]).write_text("")
                    time.sleep(PAUSE_SECONDS)
            return result

        setattr(owner, attribute, wrapper)

    for owner, attribute in ((checkpoint, "save_file"), (os, "fsync"), (os, "replace"),
                             (shutil, "rmtree")):
        wrap(owner, attribute)
    return calls, first_step


torch.set_num_threads(1)
while line := sys.stdin.readline():
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(log, 1)
            os.dup2(log, 2)
            hook = request["hook"]
            calls, first_step = install(hook)
            code = main(request["argv"])
            if "count" in hook:
                seconds = time.monotonic() - first_step[0]
                Path(hook["count"]).write_text(json.dumps({"calls": calls, "seconds": seconds}))
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            Path(request["log"] + ".ended").write_text(str(code))
            os._exit(code)
    print(json.dumps({"pid": pid}), flush=True)
    sys.stdin.readline()
    _, status = os.waitpid(pid, 0)
    ended = {
        "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
        "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
    }
    print(json.dumps(ended), flush=True)
'''

STEPS = 8  # every trial's run length; a checkpoint every 2 steps, validation at step 4
OPTIONS = [
    "--quiet",
    "--max-steps",
    str(STEPS),
    "train.checkpoint_every=2",
    "train.log_every=1",
    "train.val_every=4",
]
VQVAE_TRIALS = 16  # half at random times, half inside a checkpoint write
PRIOR_TRIALS = 8  # with dropout 0.1, as the paper's priors
CLASSIFIER_TRIALS = 6  # with dropout 0.3
SEED = 16
MARKER_TIMEOUT = 60.0  # seconds a trial's process may take to reach its marker
# Random kills fall in this share of an uninterrupted run's time from its first step to its end
# (measured once). A trial that ends before its kill (the machine ran it faster than the
# reference) is run again from the start with half the delay, up to RANDOM_ATTEMPTS times.
TIME_WINDOW = 0.7
RANDOM_ATTEMPTS = 4


class ForkServer:
    """The server script above in its own process; runs the CLI in forked children."""

    def __init__(self, folder: Path) -> None:
        script = folder / "fork_server.py"
        script.write_text(SERVER)
        self.folder = folder
        self.child: int | None = None
        self.process = subprocess.Popen(
            [sys.executable, str(script)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )

    def start(self, argv: list[str], log: Path, hook: dict | None = None) -> int:
        request = {"argv": [str(a) for a in argv], "log": str(log), "hook": hook or {}}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        self.child = json.loads(self.process.stdout.readline())["pid"]
        return self.child

    def wait(self) -> dict:
        """Let the server reap the child (killed or ended); how it ended."""
        self.process.stdin.write("reap\n")
        self.process.stdin.flush()
        ended = json.loads(self.process.stdout.readline())
        self.child = None
        return ended

    def run(self, argv: list[str], log: Path, hook: dict | None = None) -> None:
        """Run a command to its end; fail with its output unless it exits 0."""
        self.start(argv, log, hook)
        ended = self.wait()
        assert ended["code"] == 0, log.read_text()[-3000:]

    def close(self) -> None:
        if self.child is not None:  # a failed trial's child, not yet reaped: still ours
            os.kill(self.child, signal.SIGKILL)
        self.process.stdin.close()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = ForkServer(tmp_path_factory.mktemp("server"))
    yield server
    server.close()


@dataclass
class Kind:
    """One trainer under trial: its command lines and where its checkpoints and log go."""

    name: str  # checkpoint kind
    fresh: list  # argv of a new run (RUN stands for the run folder)
    resume: list  # argv of ``--resume``
    kind_dir: str  # checkpoint folder, relative to the run folder
    log_dir: str  # folder of metrics.csv, relative to the run folder
    loss: str  # the logged training loss
    base: Path | None = None  # a run folder each trial starts from a copy of

    def argv(self, words: list, run: Path) -> list:
        return [run if word == "RUN" else word for word in words]

    def new_run(self, folder: Path) -> Path:
        if self.base is not None:
            shutil.copytree(self.base, folder)
        return folder


@dataclass
class Reference:
    """An uninterrupted run: its final checkpoint, checkpoint-write calls and training time."""

    step_dir: Path
    calls: dict[str, int]
    seconds: float


def reference_run(server: ForkServer, kind: Kind, folder: Path) -> Reference:
    run = kind.new_run(folder / "reference")
    count = folder / "reference-count.json"
    server.run(kind.argv(kind.fresh, run), folder / "reference.log", {"count": str(count)})
    counted = json.loads(count.read_text())
    step_dir = read_checkpoint(run / kind.kind_dir, kind.name).path
    return Reference(step_dir, counted["calls"], counted["seconds"])


def wait_for(marker: Path, log: Path) -> None:
    """Wait until the trial's process has written ``marker``; fail if it ends first."""
    deadline = time.monotonic() + MARKER_TIMEOUT
    while not marker.exists():
        assert time.monotonic() < deadline, f"no {marker.name} in time: {log.read_text()[-3000:]}"
        ended = log.with_name(log.name + ".ended")
        assert not ended.exists(), f"ended before {marker.name}: {log.read_text()[-3000:]}"
        time.sleep(0.005)


def kill_trials(server: ForkServer, kind: Kind, folder: Path, trials: int) -> dict[str, int]:
    """Run ``trials`` kill -9 trials of ``kind``; every check is an assertion. Returns counts
    for the summary line."""
    reference = reference_run(server, kind, folder)
    rng = np.random.default_rng([SEED, len(kind.name)])
    functions = sorted(name for name, count in reference.calls.items() if count > 0)
    counts = {"trials": 0, "in_write": 0, "rerun": 0, "resumed": 0, "restarted": 0}
    for trial in range(trials):
        run, log = folder / f"trial-{trial}", folder / f"trial-{trial}.log"
        marker = folder / f"trial-{trial}.marker"
        aimed = trial % 2 == 1
        if aimed:
            function = functions[rng.integers(len(functions))]
            call = int(rng.integers(1, reference.calls[function] + 1))
            hook = {"pause": [function, call], "marker": str(marker)}
            where = f"after {function} call {call}"
            ended = kill_once(server, kind, run, log, hook, marker, delay=0.0)
        else:
            delay = float(rng.uniform(0, TIME_WINDOW * reference.seconds))
            for _ in range(RANDOM_ATTEMPTS):
                ended = kill_once(server, kind, run, log, {"started": str(marker)}, marker, delay)
                if ended["signal"] == signal.SIGKILL:
                    break
                counts["rerun"] += 1
                delay /= 2  # it ended first: this machine is faster now than for the reference
            where = f"{delay:.3f} s after the first step"
        described = f"trial {trial} ({where})"
        assert ended["signal"] == signal.SIGKILL, f"{described} ended before its kill: {ended}"
        counts["trials"] += 1
        counts["in_write"] += aimed
        kind_dir = run / kind.kind_dir
        if has_checkpoint(kind_dir):
            named = (kind_dir / LATEST).read_text().strip()
            try:
                read_checkpoint(kind_dir, kind.name, with_optimizer=True)
            except ValueError as error:
                raise AssertionError(f"{described}: {named} unreadable: {error}") from None
            argv, counts["resumed"] = kind.resume, counts["resumed"] + 1
        else:  # killed before its first checkpoint: the same command starts it again
            argv, counts["restarted"] = kind.fresh, counts["restarted"] + 1
        server.run(kind.argv(argv, run), folder / f"trial-{trial}-resume.log")
        final = read_checkpoint(kind_dir, kind.name).path
        assert final.name == f"step-{STEPS:08d}", described
        for weights in (MODEL_WEIGHTS, OPTIMIZER_WEIGHTS):
            assert_states_close(
                load_file(str(final / weights)),
                load_file(str(reference.step_dir / weights)),
                atol=0.0,
            )
        rows = read_metrics(run / kind.log_dir / "metrics.csv")
        logged = [
            int(r["step"]) for r in rows if r["split"] == "train" and r["metric"] == kind.loss
        ]
        assert logged == list(range(1, STEPS + 1)), f"{described}: steps logged {logged}"
    return counts


def kill_once(
    server: ForkServer, kind: Kind, run: Path, log: Path, hook: dict, marker: Path, delay: float
) -> dict:
    """Start a fresh run of ``kind`` in ``run``, kill it ``delay`` seconds after its ``marker``
    appears, and return how it ended (killed, or ended first)."""
    shutil.rmtree(run, ignore_errors=True)
    marker.unlink(missing_ok=True)
    log.with_name(log.name + ".ended").unlink(missing_ok=True)
    pid = server.start(kind.argv(kind.fresh, kind.new_run(run)), log, hook)
    wait_for(marker, log)
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)  # a no-op on a child that ended first (not yet reaped)
    return server.wait()


def report(capsys, kind: Kind, counts: dict[str, int]) -> None:
    with capsys.disabled():
        print(
            f"\nkill -9 trials of {kind.name}: {counts['trials']} killed "
            f"({counts['in_write']} inside a checkpoint write, {counts['rerun']} randomly timed "
            "ones run again with half the delay after ending first); all resumed to the "
            f"uninterrupted run's weights ({counts['resumed']} with --resume, "
            f"{counts['restarted']} killed before their first checkpoint and started again)"
        )


def test_train_vqvae_killed_at_random_moments_resumes_to_the_same_weights(server, tmp_path, capsys):
    data = write_npz(tmp_path / "blobs.npz")
    fresh = ["train-vqvae", "--config", "tiny", "model.image_size=16", "--data", data]
    kind = Kind(
        name="vqvae",
        fresh=[*fresh, "--out", "RUN", *OPTIONS],
        resume=["train-vqvae", "--data", data, "--out", "RUN", "--resume", "--quiet"],
        kind_dir="vqvae",
        log_dir=".",
        loss="loss",
    )
    counts = kill_trials(server, kind, tmp_path, VQVAE_TRIALS)
    report(capsys, kind, counts)


def test_train_prior_killed_at_random_moments_resumes_to_the_same_weights(server, tmp_path, capsys):
    data = write_npz(tmp_path / "blobs.npz")
    base = tmp_path / "base"
    server.run(
        ["train-vqvae", "--config", "tiny", "model.image_size=16", "--data", data, "--out", base]
        + ["--max-steps", "2", "--quiet"],
        tmp_path / "base.log",
    )
    server.run(["extract-codes", base, "--data", data, "--quiet"], tmp_path / "codes.log")
    kind = Kind(
        name="prior-top",
        fresh=["train-prior", "RUN", "--level", "top", "prior.dropout=0.1", *OPTIONS],
        resume=["train-prior", "RUN", "--level", "top", "--resume", "--quiet"],
        kind_dir="prior-top",
        log_dir="prior-top",
        loss="batch_nll_nats",
        base=base,
    )
    counts = kill_trials(server, kind, tmp_path, PRIOR_TRIALS)
    report(capsys, kind, counts)


def test_train_classifier_killed_at_random_moments_resumes_to_the_same_weights(
    server, tmp_path, capsys
):
    data = write_npz(tmp_path / "blobs.npz")
    preset = ["--config", "classifier-tiny", "model.image_size=16", "model.dropout=0.3"]
    kind = Kind(
        name="classifier",
        fresh=["train-classifier", "--data", data, "--out", "RUN", *preset, *OPTIONS],
        resume=["train-classifier", "--data", data, "--out", "RUN", "--resume", "--quiet"],
        kind_dir=".",
        log_dir=".",
        loss="loss",
    )
    counts = kill_trials(server, kind, tmp_path, CLASSIFIER_TRIALS)
    report(capsys, kind, counts)
