"""Memory at the paper's sizes: parameters, a training step's peak, the sampler's state, batches that fit.

Cases are the paper presets (Tables 3-5): the `imagenet-256` and `ffhq-1024` VQ-VAEs (stage 1)
and their priors, each prior given its level's map side, the upper levels' sides and the classes
of its data (ImageNet 1,000, FFHQ none), K = 512, float32.

What is counted: the bytes of every tensor storage alive, from a ``TorchDispatchMode`` that
records each storage an operation creates and a weak-reference callback that subtracts it when
it is freed; the peak is the largest sum during the measured work. Kernels' private scratch
memory, the allocator's slack and (on a GPU) the CUDA context are not tensors and not counted.

* Training step: after one warm-up step (which creates Adam's moments), the measured step is
  forward, backward and the fused Adam step, with parameters, Adam state and inputs alive at the
  start and the gradients of the previous step already freed (``zero_grad(set_to_none=True)``).
  Priors run on fake tensors (``FakeTensorMode``: shapes, devices and kernel choices of the
  CPU, no data, so the paper sizes cost nothing); the VQ-VAEs, whose quantizer reads data, run on
  real CPU tensors. The prior's loss is ``cross_entropy(prior.logits(codes, condition), codes)``,
  i.e. ``forward`` without its input checks (which read values).
* Sampling: fake tensors, no gradients; the peak over the conditioning features (*after*:
  ``condition_per_image``, as ``sample_level_cached`` computes them; *before*: the whole batch
  at once, as it did), building the sampler state and the first two rows of ``logits_at`` /
  ``set_codes`` (every later row repeats the second's work on buffers of the same sizes).
  *State* is the sampler's own tensors.
* Per image: the slope of the peak between two batch sizes, *fixed* the intercept
  (parameters, Adam state, batch-independent tensors); the largest batch that fits a capacity
  is floor((capacity - fixed) / per image), for 80 GB and 141 GB (10^9 bytes, as sold). Priors:
  batches 16 and 32 (``--prior-batches``; at batch 1 or 2 the peak of a step can sit at the end
  of the backward pass, where parameters, gradients and Adam's moments meet, instead of at its
  start), each training batch so found checked by fake runs at it and one above it, each
  sampling line by a run at twice the larger batch. VQ-VAEs (real tensors): batches 1 and 2.
  The step peak and the forward pass's peak above the step's start are also given at batch 1.
* *before* is the prior module of ``--baseline-rev`` (loaded from git into a throwaway module,
  same weights layout), *after* today's. Attention with dropout has no fused kernel on the CPU
  (PyTorch falls back to its reference formula, which builds the (T, T) weights), so *after* is
  also given with the attention-weight dropout off, the fused kernel's memory: what the GPU's
  flash and memory-efficient kernels hold with dropout on (they keep a random seed and the
  softmax statistics per row, not the weights).

    PYTHONPATH=src .venv/bin/python bench/bench_memory.py --baseline-rev 8c2b4e7 [--threads 2]

``--checkpointing`` measures instead only the training step, in float32 and bf16 autocast, each
without and with ``train.activation_checkpointing`` (priors with the fused attention kernel;
where a line misses, the largest batch is searched one batch at a time), and with
``--time-rounds N`` the CPU step time it costs (``checkpointing_seconds``):

    PYTHONPATH=src:bench .venv/bin/python bench/bench_memory.py --checkpointing --threads 1 \
        --prior-batches 256 512 --time-rounds 3
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import time
import types
import weakref

import torch
import torch.nn.functional as F
from bench_sampling import load_baseline
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from vqvae2 import pixelsnail, pixelsnail_sampler
from vqvae2.config import PriorRunConfig, TrainConfig, VQVAERunConfig, load_config
from vqvae2.optimizer import AdamInBackward
from vqvae2.vqvae import VQVAE2

CAPACITIES = {"80 GB": 80 * 10**9, "141 GB": 141 * 10**9}
GIB, MIB = 2**30, 2**20
# stage-1 preset -> (its priors top first, classes of its data)
HIERARCHIES = {
    "imagenet-256": (("prior-top-imagenet-256", "prior-bottom-imagenet-256"), 1000),
    "ffhq-1024": (
        ("prior-top-ffhq-1024", "prior-middle-ffhq-1024", "prior-bottom-ffhq-1024"),
        0,
    ),
}
SAMPLED_ROWS = 2
# The presets whose training steps are timed with and without activation checkpointing.
TIMED_HIERARCHY = {
    "fashion-mnist-32": (("prior-top-fashion-mnist-32", "prior-bottom-fashion-mnist-32"), 10)
}


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of the tensor storages alive while active, and their peak.

    Storages that exist before (parameters, inputs) are added with ``track``; every storage an
    operation returns is added once and subtracted when it is freed.
    """

    def __init__(self) -> None:
        super().__init__()
        self.sizes: dict[int, int] = {}  # storage address -> bytes
        self.live = self.peak = 0

    def track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key, size = storage._cdata, storage.nbytes()
        if key in self.sizes:
            self.live += size - self.sizes[key]  # resized in place
        else:
            weakref.finalize(storage, self._free, key)
            self.live += size
        self.sizes[key] = size
        self.peak = max(self.peak, self.live)

    def _free(self, key: int) -> None:
        self.live -= self.sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(result):
            if isinstance(leaf, torch.Tensor):
                self.track(leaf)
        return result


def tracked(tensors) -> LiveTensorBytes:
    tracker = LiveTensorBytes()
    for tensor in tensors:
        tracker.track(tensor)
    return tracker


# ----------------------------------------------------------------------------------------------
# Cases


def prior_configs(hierarchies=HIERARCHIES) -> dict[str, tuple]:
    """prior preset -> (PixelSNAILConfig for its data, stage-1 preset)."""
    configs = {}
    for stage1, (priors, classes) in hierarchies.items():
        model = load_config(VQVAERunConfig, stage1).model
        for level, name in enumerate(priors):
            configs[name] = (
                dataclasses.replace(
                    load_config(PriorRunConfig, name).prior,
                    code_size=model.latent_sizes[level],
                    condition_sizes=tuple(model.latent_sizes[:level]),
                    codebook_size=model.codebook_size,
                    num_classes=classes,
                ),
                stage1,
            )
    return configs


def prior_inputs(config, batch: int):
    side = config.code_size
    codes = torch.randint(0, config.codebook_size, (batch, side, side))
    labels = torch.randint(0, config.num_classes, (batch,)) if config.num_classes else None
    upper = [torch.randint(0, config.codebook_size, (batch, s, s)) for s in config.condition_sizes]
    return codes, labels, upper or None


def training_loss(prior, codes, labels, upper, precision: str = "float32") -> torch.Tensor:
    """``prior(codes, labels, upper).loss`` without the input checks (they read values), under
    bf16 autocast for ``precision="bf16"`` (as the trainer runs its forward pass)."""
    with autocast(precision):
        return F.cross_entropy(prior.logits(codes, prior.condition(labels, upper)), codes)


def autocast(precision: str):
    """The trainer's ``--precision``: bf16 autocast on the CPU's kernels, or nothing."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def parameters_of(config) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in pixelsnail.PixelSNAIL(config).parameters())


def prior_training(
    module,
    config,
    batches,
    attention_dropout=None,
    in_backward=False,
    precision="float32",
    checkpointing=False,
) -> dict[int, dict]:
    """One training step of ``module.PixelSNAIL(config)`` on fake tensors, per batch size:
    ``peak`` (live bytes, the whole step) and ``forward`` (the forward pass's peak above the
    step's start: activations and their transients). ``in_backward``: Adam steps each
    parameter inside the backward pass (``train.optimizer_in_backward``); ``precision``:
    "float32" or "bf16" (autocast); ``checkpointing``: ``train.activation_checkpointing``."""
    results = {}
    with FakeTensorMode():
        prior = module.PixelSNAIL(config).train()
        if checkpointing:
            prior.set_activation_checkpointing(True)
        if attention_dropout is not None:
            for attention in prior.attention.values():
                attention.dropout = attention_dropout
        if in_backward:
            optimizer = AdamInBackward(prior, TrainConfig(optimizer_in_backward=True))
            optimizers = optimizer.optimizers
        else:
            optimizer = torch.optim.Adam(prior.parameters(), fused=True)
            optimizers = [optimizer]
        for index, batch in enumerate(batches):
            codes, labels, upper = prior_inputs(config, batch)
            inputs = [t for t in (codes, labels, *(upper or [])) if t is not None]

            if index == 0:  # a first step creates Adam's moments
                training_loss(prior, codes, labels, upper, precision).backward()
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state = [t for o in optimizers for s in o.state.values() for t in s.values()]
            with tracked([*prior.parameters(), *state, *inputs]) as tracker:
                start = tracker.live
                loss = training_loss(prior, codes, labels, upper, precision)
                forward_peak = tracker.peak - start
                loss.backward()
                del loss
                optimizer.step()
            results[batch] = {"peak": tracker.peak, "forward": forward_peak}
    return results


def baseline_state_tensors(state) -> list[torch.Tensor]:
    """Every tensor the sampler of revision 8c2b4e7 allocates (its bench's count)."""
    tensors = [
        state.embedded,
        state.input_from_above,
        *state.vertical,
        *state.horizontal,
        *state.blocks_from_above,
    ]
    tensors += [t for pair in state.attention_cache.values() for t in pair]
    tensors += [t for pair in state.conditions if pair is not None for t in pair]
    return tensors


def prior_sampling(module, config, batches) -> dict[int, dict]:
    """Sampling with ``module``'s sampler on fake tensors, per batch size: ``condition`` (peak
    live bytes while the conditioning features are computed), ``peak`` (over everything) and
    ``state`` (the sampler's own tensors)."""
    results = {}
    with FakeTensorMode(), torch.no_grad():
        prior = module.PixelSNAIL(config).eval()
        side = config.code_size
        for batch in batches:
            _, labels, upper = prior_inputs(config, batch)
            inputs = [t for t in (labels, *(upper or [])) if t is not None]
            with tracked([*prior.parameters(), *inputs]) as tracker:
                codes = torch.zeros(batch, side, side, dtype=torch.long)
                if hasattr(prior, "condition_per_image"):  # as sample_level_cached does
                    condition = prior.condition_per_image(labels, upper)
                else:  # the baseline's sample_level_cached: the whole batch at once
                    condition = prior.condition(labels, upper)
                condition_peak = tracker.peak
                state = module.IncrementalSampler(prior, batch, condition)
                del condition
                if hasattr(state, "state_tensors"):
                    tensors = state.state_tensors()
                else:
                    tensors = baseline_state_tensors(state)
                state_bytes = sum(t.numel() * t.element_size() for t in tensors)
                del tensors
                for row in range(SAMPLED_ROWS):
                    for column in range(side):
                        logits = state.logits_at(row, column)
                        probabilities = torch.softmax(logits.float(), dim=-1)
                        codes[:, row, column] = torch.multinomial(probabilities, 1)[:, 0]
                        state.set_codes(row, column, codes[:, row, column])
                del state
            results[batch] = {
                "condition": condition_peak,
                "peak": tracker.peak,
                "state": state_bytes,
            }
    return results


def stage1_training(
    name: str, batches, precision: str = "float32", checkpointing: bool = False
) -> dict[int, dict]:
    """One VQ-VAE training step on real CPU tensors, per batch size (as ``prior_training``)."""
    model_config = load_config(VQVAERunConfig, name).model
    torch.manual_seed(0)
    model = VQVAE2(model_config).train()
    model.set_activation_checkpointing(checkpointing)
    optimizer = torch.optim.Adam(model.parameters(), fused=True)
    size = model_config.image_size
    results = {}
    for index, batch in enumerate(batches):
        images = torch.rand(batch, model_config.in_channels, size, size) * 2 - 1
        if index == 0:  # a first step creates Adam's moments
            with autocast(precision):
                loss = model(images).loss
            loss.backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state = [t for s in optimizer.state.values() for t in s.values()]
        tensors = [*model.parameters(), *model.buffers(), *state, images]
        with tracked(tensors) as tracker:
            start = tracker.live
            with autocast(precision):
                loss = model(images).loss
            forward_peak = tracker.peak - start
            loss.backward()
            del loss
            optimizer.step()
        results[batch] = {"peak": tracker.peak, "forward": forward_peak}
    return results


# ----------------------------------------------------------------------------------------------
# Figures


def fit(peaks: dict[int, int], first: int, second: int) -> dict:
    """Per-image bytes (the slope between two batch sizes), fixed bytes (the intercept) and the
    largest batch each capacity holds, extrapolated along that line."""
    per_image = (peaks[second] - peaks[first]) // (second - first)
    fixed = peaks[first] - first * per_image
    largest = {name: max(0, (cap - fixed) // per_image) for name, cap in CAPACITIES.items()}
    return {"per_image": per_image, "fixed": fixed, "largest_batch": largest}


def train_figures(measure, batches: tuple[int, int], verify: bool) -> dict:
    """Step peak and forward peak at batch 1, the line through ``batches``, and (``verify``)
    the step peaks at each predicted largest batch and one above it."""
    runs = measure((1, *batches))
    figures = {
        "peak_batch1": runs[1]["peak"],
        "forward_batch1": runs[1]["forward"],
        **fit({b: r["peak"] for b, r in runs.items()}, *batches),
    }
    if verify:
        checks, searched = {}, {}
        for name, batch in figures["largest_batch"].items():
            peaks = measure((batch, batch + 1))
            checks[name] = peaks[batch]["peak"] <= CAPACITIES[name] < peaks[batch + 1]["peak"]
            if not checks[name]:
                searched[name] = search_largest_batch(measure, batch, CAPACITIES[name])
        figures["largest_batch_verified"] = checks
        if searched:  # where the line missed: the batch found by runs one batch apart
            figures["largest_batch_searched"] = searched
    return figures


SEARCH_LIMIT = 32  # batches tried one by one from the line's prediction


def search_largest_batch(measure, batch: int, capacity: int) -> int | None:
    """The largest batch whose step peak fits ``capacity``, walking one batch at a time from
    ``batch`` (None when it lies more than ``SEARCH_LIMIT`` away)."""
    fits = measure((batch,))[batch]["peak"] <= capacity
    for _ in range(SEARCH_LIMIT):
        candidate = batch + 1 if fits else batch - 1
        if candidate < 1:
            return None
        if (measure((candidate,))[candidate]["peak"] <= capacity) != fits:
            return batch if fits else candidate
        batch = candidate
    return None


def sample_figures(measure, batches: tuple[int, int]) -> dict[str, dict]:
    """Lines through ``batches`` for the sampling peak (``sample``), the conditioning's peak
    (``condition``) and the state (``state``); the sampling line is checked against a run at
    twice the larger batch (a run at the largest batch itself would cost minutes: the
    conditioning takes one pass per image)."""
    check_batch = 2 * batches[1]
    runs = measure((*batches, check_batch))
    figures = {
        kind: fit({b: r[key] for b, r in runs.items()}, *batches) for kind, key in KINDS.items()
    }
    line = figures["sample"]
    predicted = line["fixed"] + check_batch * line["per_image"]
    line["line_error_at_check"] = abs(runs[check_batch]["peak"] - predicted) / predicted
    return figures


KINDS = {"sample": "peak", "condition": "condition", "state": "state"}


def check_fake_matches_real() -> dict:
    """The tracker on fake and on real tensors, one narrow attention prior's training step."""
    config = dataclasses.replace(
        prior_configs()["prior-top-imagenet-256"][0],
        hidden_channels=64,
        residual_channels=128,
        code_size=8,
        num_layers=4,
        attention_layers=2,
        output_stack_layers=2,
    )
    fake = prior_training(pixelsnail, config, [2], attention_dropout=0.0)[2]["peak"]
    torch.manual_seed(0)
    prior = pixelsnail.PixelSNAIL(config).train()
    for attention in prior.attention.values():
        attention.dropout = 0.0
    optimizer = torch.optim.Adam(prior.parameters(), fused=True)
    codes, labels, _ = prior_inputs(config, 2)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        training_loss(prior, codes, labels, None).backward()
        optimizer.step()

    step()
    optimizer.zero_grad(set_to_none=True)
    state = [t for s in optimizer.state.values() for t in s.values()]
    with tracked([*prior.parameters(), *state, codes, labels]) as tracker:
        step()
    return {"fake_bytes": fake, "real_bytes": tracker.peak}


def mib(value: int) -> str:
    return f"{value / MIB:,.1f}"


def gib(value: int) -> str:
    return f"{value / GIB:,.2f}"


def largest_batch(figures: dict, capacity: str) -> int:
    """The searched largest batch where the line missed, else the line's."""
    return figures.get("largest_batch_searched", {}).get(
        capacity, figures["largest_batch"][capacity]
    )


def batches_text(figures: dict) -> str:
    """The largest batches (80 / 141 GB); where the line missed, the searched one and the
    line's in brackets."""
    searched = figures.get("largest_batch_searched", {})
    return " / ".join(
        f"{searched[name]:,} (line {figures['largest_batch'][name]:,})"
        if name in searched
        else f"{figures['largest_batch'][name]:,}"
        for name in CAPACITIES
    )


def print_tables(stage1: dict, priors: dict) -> None:
    print("Sampling: state and peak per image (MiB), largest batch (80 / 141 GB)\n")
    print(
        "| prior | parameters (M) | state before | state after | after / before | "
        "peak per image before | peak per image after | fixed GiB | batch before | "
        "batch after | line error |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, row in priors.items():
        state = row["state_before"]["per_image"], row["state_after"]["per_image"]
        before, after = row["sample_before"], row["sample_after"]
        error = max(before["line_error_at_check"], after["line_error_at_check"])
        print(
            f"| {name} | {row['parameters'] / 1e6:,.1f} | {mib(state[0])} | {mib(state[1])} | "
            f"{state[1] / state[0]:.3f} | {mib(before['per_image'])} | {mib(after['per_image'])} | "
            f"{gib(after['fixed'])} | {batches_text(before)} | {batches_text(after)} | "
            f"{error:.1e} |"
        )
    print("\nTraining step (forward, backward, fused Adam), float32\n")
    print(
        "| model | variant | parameters (M) | step peak at batch 1 GiB | forward at batch 1 MiB | "
        "per image MiB | fixed GiB | largest batch (80 / 141 GB) | checked |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    rows = [(f"{name} (stage 1)", "real tensors", row) for name, row in stage1.items()]
    for name, row in priors.items():
        for key, label in VARIANTS.items():
            if key in row:
                rows.append((name, label, dict(row[key], parameters=row["parameters"])))
    for name, label, row in rows:
        train = row.get("train", row)
        checked = train.get("largest_batch_verified")
        print(
            f"| {name} | {label} | {row['parameters'] / 1e6:,.1f} | {gib(train['peak_batch1'])} | "
            f"{mib(train['forward_batch1'])} | {mib(train['per_image'])} | {gib(train['fixed'])} | "
            f"{batches_text(train)} | {'-' if checked is None else all(checked.values())} |"
        )


VARIANTS = {
    "train_before": "before",
    "train_after": "after, CPU kernels",
    "train_after_fused": "after, fused kernel",
    "train_after_in_backward": "after, fused kernel, optimizer_in_backward",
}


# ----------------------------------------------------------------------------------------------
# Activation checkpointing and bf16 (``--checkpointing``)

CHECKPOINTING_VARIANTS = {  # key -> (precision, train.activation_checkpointing)
    "float32": ("float32", False),
    "float32_checkpointed": ("float32", True),
    "bf16": ("bf16", False),
    "bf16_checkpointed": ("bf16", True),
}


def checkpointing_memory(args) -> tuple[dict, dict]:
    """Training-step figures of every variant: the VQ-VAEs on real tensors (batches 1 and 2),
    the priors on fake tensors with the fused attention kernel (the GPU's memory), checked."""
    stage1, priors = {}, {}
    for name in [] if args.skip_stage1 else HIERARCHIES:
        stage1[name] = {
            key: train_figures(
                lambda b, n=name, p=precision, c=checkpointed: stage1_training(n, b, p, c),
                batches=(1, 2),
                verify=False,
            )
            for key, (precision, checkpointed) in CHECKPOINTING_VARIANTS.items()
        }
    for name, (config, _) in prior_configs().items():
        if args.priors and name not in args.priors:
            continue
        fused = 0.0 if config.attention_layers else None
        priors[name] = {"parameters": parameters_of(config)}
        for key, (precision, checkpointed) in CHECKPOINTING_VARIANTS.items():
            priors[name][key] = train_figures(
                lambda b, c=config, d=fused, p=precision, k=checkpointed: prior_training(
                    pixelsnail, c, b, d, False, p, k
                ),
                batches=tuple(args.prior_batches),
                verify=True,
            )
    return stage1, priors


def checkpointing_seconds(batch: int, rounds: int, steps: int) -> dict[str, dict]:
    """Seconds per training step (forward, backward, fused Adam; real CPU tensors, float32) of
    the ``TIMED_HIERARCHY`` presets without and with checkpointing: per round each variant
    runs ``steps`` timed steps after one untimed one, variants interleaved; the medians over
    the rounds and their ratio."""
    cases = {}
    for name, (config, _) in prior_configs(TIMED_HIERARCHY).items():
        torch.manual_seed(0)
        prior = pixelsnail.PixelSNAIL(config).train()
        codes, labels, upper = prior_inputs(config, batch)
        cases[name] = (prior, functools.partial(training_loss, prior, codes, labels, upper))
    for name in TIMED_HIERARCHY:
        torch.manual_seed(0)
        model = VQVAE2(load_config(VQVAERunConfig, name).model).train()
        size, channels = model.config.image_size, model.config.in_channels
        images = torch.rand(batch, channels, size, size) * 2 - 1
        cases[f"{name} (stage 1)"] = (model, lambda m=model, x=images: m(x).loss)
    results = {}
    for name, (model, loss_fn) in cases.items():
        optimizer = torch.optim.Adam(model.parameters(), fused=True)
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(rounds):
            for checkpointed in (False, True):
                model.set_activation_checkpointing(checkpointed)
                for index in range(steps + 1):
                    start = time.perf_counter()
                    optimizer.zero_grad(set_to_none=True)
                    loss_fn().backward()
                    optimizer.step()
                    if index > 0:  # the first step of each turn is a warm-up
                        times[checkpointed].append(time.perf_counter() - start)
        plain, checkpointed = (statistics.median(times[k]) for k in (False, True))
        results[name] = {"plain_s": plain, "checkpointed_s": checkpointed}
        results[name]["ratio"] = checkpointed / plain
    return results


def print_checkpointing_tables(stage1: dict, priors: dict, seconds: dict, batch: int) -> None:
    print("Training step (forward, backward, fused Adam) by precision and checkpointing\n")
    print(
        "| model | precision | checkpointing | step peak at batch 1 GiB | forward at batch 1 MiB | "
        "per image MiB | fixed GiB | largest batch (80 / 141 GB) | x float32 (80 GB) | checked |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = [(f"{name} (stage 1)", variants) for name, variants in stage1.items()]
    rows += list(priors.items())
    for name, variants in rows:
        today = largest_batch(variants["float32"], "80 GB")
        for key, (precision, checkpointed) in CHECKPOINTING_VARIANTS.items():
            train = variants[key]
            checked = train.get("largest_batch_verified")
            checked = "-" if checked is None else str(all(checked.values()))
            if "largest_batch_searched" in train:
                checked = "searched"
            gain = largest_batch(train, "80 GB") / today if today else float("inf")
            print(
                f"| {name} | {precision} | {'on' if checkpointed else 'off'} | "
                f"{gib(train['peak_batch1'])} | {mib(train['forward_batch1'])} | "
                f"{mib(train['per_image'])} | {gib(train['fixed'])} | {batches_text(train)} | "
                f"{gain:.2f} | {checked} |"
            )
    if seconds:
        print(f"\nSeconds per training step on this CPU, float32, batch {batch}\n")
        print("| model | plain s | checkpointed s | checkpointed / plain |")
        print("|---|---|---|---|")
        for name, row in seconds.items():
            print(
                f"| {name} | {row['plain_s']:.4f} | {row['checkpointed_s']:.4f} | "
                f"{row['ratio']:.3f} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--baseline-rev", help="git revision for 'before' (required without --checkpointing)"
    )
    parser.add_argument(
        "--checkpointing",
        action="store_true",
        help="only the training step by precision (float32, bf16) and activation checkpointing",
    )
    parser.add_argument(
        "--time-rounds",
        type=int,
        default=0,
        help="with --checkpointing: rounds of the CPU step-time comparison (0: none)",
    )
    parser.add_argument("--time-steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--time-batch", type=int, default=32, help="batch of the timed steps")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--skip-stage1", action="store_true", help="priors only (no real runs)")
    parser.add_argument("--priors", nargs="*", help="only these prior presets (default: all)")
    parser.add_argument(
        "--prior-batches",
        type=int,
        nargs=2,
        default=(16, 32),
        help="batch sizes the priors' per-image line is drawn through (fake tensors)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.checkpointing:
        start = time.perf_counter()
        stage1, priors = checkpointing_memory(args)
        seconds = {}
        if args.time_rounds:
            seconds = checkpointing_seconds(args.time_batch, args.time_rounds, args.time_steps)
        print_checkpointing_tables(stage1, priors, seconds, args.time_batch)
        figures = {"capacities_bytes": CAPACITIES, "prior_batches": args.prior_batches}
        figures.update(stage1=stage1, priors=priors, step_seconds=seconds)
        print(json.dumps({**figures, "seconds": round(time.perf_counter() - start, 1)}))
        return
    if args.baseline_rev is None:
        parser.error("--baseline-rev is required without --checkpointing")
    baseline = load_baseline(args.baseline_rev)
    start = time.perf_counter()
    check = check_fake_matches_real()

    stage1 = {}
    if not args.skip_stage1:
        for name in HIERARCHIES:
            model_config = load_config(VQVAERunConfig, name).model
            with torch.device("meta"):
                parameters = sum(p.numel() for p in VQVAE2(model_config).parameters())
            # Real tensors: batches 1 and 2 only; the parameters are too few to move the peak.
            train = train_figures(
                lambda b, n=name: stage1_training(n, b), batches=(1, 2), verify=False
            )
            stage1[name] = {"parameters": parameters, "train": train}

    priors = {}
    for name, (config, _) in prior_configs().items():
        if args.priors and name not in args.priors:
            continue
        row = {"parameters": parameters_of(config)}
        fused = 0.0 if config.attention_layers else None
        variants = {
            "train_before": (baseline, None, False),
            "train_after": (pixelsnail, None, False),
            "train_after_in_backward": (pixelsnail, fused, True),
        }
        if config.attention_layers:
            variants["train_after_fused"] = (pixelsnail, 0.0, False)
        for key, (module, dropout, in_backward) in variants.items():
            row[key] = train_figures(
                lambda b, m=module, c=config, d=dropout, i=in_backward: prior_training(
                    m, c, b, d, i
                ),
                batches=tuple(args.prior_batches),
                verify=True,
            )
        today = types.SimpleNamespace(
            PixelSNAIL=pixelsnail.PixelSNAIL,
            IncrementalSampler=pixelsnail_sampler.IncrementalSampler,
        )  # the prior and its sampler, as one module of an older revision held both
        for key, module in (("before", baseline), ("after", today)):
            row.update(
                {
                    f"{kind}_{key}": figures
                    for kind, figures in sample_figures(
                        lambda b, m=module, c=config: prior_sampling(m, c, b),
                        batches=tuple(args.prior_batches),
                    ).items()
                }
            )
        priors[name] = row

    print_tables(stage1, priors)
    print(
        json.dumps(
            {
                "baseline_rev": args.baseline_rev,
                "capacities_bytes": CAPACITIES,
                "prior_batches": args.prior_batches,
                "fake_vs_real_check": check,
                "stage1": stage1,
                "priors": priors,
                "seconds": round(time.perf_counter() - start, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
