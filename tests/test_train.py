"""Stage-1 training loop: learning, exact resume, reconstruction report."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pytest
import torch

from vqvae2.batches import EpochBatchSampler
from vqvae2.config import TrainConfig, VQVAERunConfig
from vqvae2.data import open_dataset, uint8_to_float
from vqvae2.logs import read_metrics
from vqvae2.measure import low_pass, measure_levels
from vqvae2.reconstruct import reconstruct
from vqvae2.run import Run, load_vqvae
from vqvae2.schedule import RunClock, learning_rate
from vqvae2.train import train_vqvae

from . import conftest
from .conftest import assert_states_close, metric_values


def tiny_run_config(*overrides: str) -> VQVAERunConfig:
    """The tiny 16x16 preset, logging every step and resetting codes dead for 2 steps."""
    overrides = ("model.dead_code_after_steps=2", "train.log_every=1", *overrides)
    return conftest.tiny_run_config(*overrides)


def train_losses(run_dir) -> dict[int, float]:
    return metric_values(run_dir / "metrics.csv", "train", "loss")


def test_sampler_batch_depends_only_on_seed_and_step():
    full = list(EpochBatchSampler(50, 8, seed=1, start_step=0, end_step=14))
    tail = list(EpochBatchSampler(50, 8, seed=1, start_step=9, end_step=14))
    assert full[9:] == tail
    assert len(full) == 14 and all(len(b) == 8 for b in full)
    first_epoch = sum(full[:6], [])
    assert len(set(first_epoch)) == 48  # no repeats within an epoch
    with pytest.raises(ValueError, match="fewer than one batch"):
        EpochBatchSampler(5, 8, seed=0, start_step=0, end_step=1)


def test_keyed_sampler_numbers_each_image_of_the_run_once():
    """With keys, item (index, key) carries the image's position in the run's sequence of
    images, step * batch + slot, whatever the process: the same key means the same draw."""
    plain = list(EpochBatchSampler(50, 8, seed=1, start_step=0, end_step=9))
    keyed = list(EpochBatchSampler(50, 8, seed=1, start_step=0, end_step=9, keyed=True))
    assert [[index for index, _ in batch] for batch in keyed] == plain
    assert [key for batch in keyed for _, key in batch] == list(range(72))
    halves = [
        list(EpochBatchSampler(50, 8, 1, 6, 9, rank=rank, world_size=2, keyed=True))
        for rank in range(2)
    ]
    assert [a + b for a, b in zip(*halves, strict=True)] == keyed[6:]


def test_learning_rate_schedules_by_hand():
    def rates(**fields):
        train = TrainConfig(learning_rate=1.0, max_steps=10, **fields)
        return [learning_rate(train, step) for step in range(10)]

    assert rates() == [1.0] * 10
    assert rates(lr_schedule="linear") == pytest.approx([1 - s / 10 for s in range(10)])
    assert rates(lr_schedule="cosine") == pytest.approx(
        [0.5 * (1 + math.cos(math.pi * s / 10)) for s in range(10)]
    )
    # Warm-up 0.5, 1.0 over two steps, then the linear decay over the remaining eight.
    assert rates(lr_schedule="linear", warmup_steps=2) == pytest.approx(
        [0.5, 1.0] + [1 - s / 8 for s in range(8)]
    )
    assert rates(lr_schedule="cosine", warmup_steps=2)[2] == 1.0
    # A warm-up longer than half the run is cut to max_steps // 2 = 5 steps.
    assert rates(lr_schedule="linear", warmup_steps=50)[:6] == pytest.approx(
        [0.2, 0.4, 0.6, 0.8, 1.0, 1.0]
    )


def test_time_budget_moves_the_schedule_on():
    train = TrainConfig(learning_rate=1.0, max_steps=10, lr_schedule="linear", warmup_steps=2)
    # The decay follows whichever of steps and budget is further along; the warm-up does not.
    assert learning_rate(train, 0, budget_spent=0.9) == 0.5
    assert learning_rate(train, 2, budget_spent=0.25) == pytest.approx(0.75)
    assert learning_rate(train, 6, budget_spent=0.25) == pytest.approx(0.5)  # steps: 4 of 8
    assert learning_rate(train, 3, budget_spent=1.5) == 0.0
    cosine = TrainConfig(learning_rate=1.0, max_steps=10, lr_schedule="cosine")
    assert learning_rate(cosine, 1, budget_spent=0.5) == pytest.approx(0.5)
    constant = TrainConfig(learning_rate=1.0, max_steps=10)
    assert learning_rate(constant, 1, budget_spent=0.5) == 1.0


def test_run_clock_counts_earlier_processes_and_its_own_deadline():
    t = [100.0]
    budget = RunClock(59.0, None, budget_minutes=1.0, now=lambda: t[0])
    # The budget counts the time of earlier processes of a resumed run.
    assert budget.elapsed() == 59.0 and budget.limited and not budget.out_of_time()
    t[0] += 1.0
    assert budget.elapsed() == 60.0 and budget.out_of_time()
    # --max-minutes counts this process's time only.
    deadline = RunClock(59.0, 1.0, now=lambda: t[0])
    t[0] += 59.0
    assert deadline.elapsed() == 118.0 and not deadline.out_of_time()
    t[0] += 1.0
    assert deadline.out_of_time()
    unlimited = RunClock(1e6, None, now=lambda: t[0])
    assert not unlimited.limited and not unlimited.out_of_time()


def test_time_budget_ends_the_run_and_its_schedule(tmp_path, npz_data, step_clock):
    """A 6-second budget on a clock that gains one second per step: six steps, the rate linear
    in the time spent before each step."""
    config = tiny_run_config(
        "train.max_steps=100000", "train.lr_schedule=linear", "train.schedule_minutes=0.1"
    )
    result = train_vqvae(config, npz_data, tmp_path / "run", progress=False, now=step_clock)
    assert result.step == 6
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.csv") if r["metric"] == "lr"]
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["elapsed_seconds"] for r in rows] == ["1.0", "2.0", "3.0", "4.0", "5.0", "6.0"]
    rates = [float(r["value"]) for r in rows]
    assert rates == pytest.approx([1e-3 * (1 - s / 6) for s in range(6)], rel=1e-12)
    # A resumed run whose budget is spent takes no more steps.
    again = train_vqvae(
        config, npz_data, tmp_path / "run", resume=True, progress=False, now=step_clock
    )
    assert again.step == 6
    assert metric_values(tmp_path / "run" / "metrics.csv", "train", "lr") == dict(
        zip(range(1, 7), rates, strict=True)
    )


def test_interrupted_and_resumed_run_matches_uninterrupted_run(tmp_path, npz_data):
    straight = tmp_path / "straight"
    whole = train_vqvae(tiny_run_config("train.max_steps=9"), npz_data, straight, progress=False)
    resumed = tmp_path / "resumed"
    train_vqvae(tiny_run_config("train.max_steps=4"), npz_data, resumed, progress=False)
    result = train_vqvae(
        tiny_run_config("train.max_steps=9"), npz_data, resumed, resume=True, progress=False
    )
    assert result.step == 9
    expected, got = train_losses(straight), train_losses(resumed)
    assert sorted(got) == list(range(1, 10))
    assert got == expected  # bit-identical float losses, steps 5-9 cross an epoch boundary
    # The same weights and codebooks, bit for bit.
    assert_states_close(result.model.state_dict(), whole.model.state_dict(), atol=0.0)


@pytest.mark.slow  # DataLoader worker processes
def test_random_flips_give_the_same_run_with_worker_processes_and_on_resume(tmp_path, npz_data):
    """Random flips are drawn per image from (seed, key): two loader processes and a resumed
    run train the same weights as one uninterrupted run in this process."""
    flips = ("data.random_flip=true", "data.random_crop=true")
    straight = train_vqvae(
        tiny_run_config("train.max_steps=6", *flips), npz_data, tmp_path / "a", progress=False
    )
    workers = train_vqvae(
        tiny_run_config("train.max_steps=6", "data.num_workers=2", *flips),
        npz_data,
        tmp_path / "b",
        progress=False,
    )
    assert_states_close(workers.model.state_dict(), straight.model.state_dict(), atol=0.0)
    train_vqvae(
        tiny_run_config("train.max_steps=3", *flips), npz_data, tmp_path / "c", progress=False
    )
    resumed = train_vqvae(
        tiny_run_config("train.max_steps=6", *flips),
        npz_data,
        tmp_path / "c",
        resume=True,
        progress=False,
    )
    assert_states_close(resumed.model.state_dict(), straight.model.state_dict(), atol=0.0)
    plain = train_vqvae(
        tiny_run_config("train.max_steps=6"), npz_data, tmp_path / "d", progress=False
    )
    assert train_losses(tmp_path / "d") != train_losses(tmp_path / "a")  # the flips took effect
    del plain


def test_loss_goes_down_and_codes_are_used(tmp_path, npz_data):
    config = tiny_run_config(
        "train.max_steps=150", "train.learning_rate=3e-3", "train.log_every=10"
    )
    result = train_vqvae(config, npz_data, tmp_path / "run", progress=False)
    losses = train_losses(tmp_path / "run")
    assert losses[150] < 0.5 * losses[10]
    # Better than the best constant guess: the mean validation image.
    val = open_dataset(npz_data, "val", 16, 1, config.data)
    images = uint8_to_float(torch.stack([val[i][0] for i in range(len(val))]))
    baseline = float((((images - images.mean(0)) / 2) ** 2).mean())
    assert result.metrics["mse"] < 0.5 * baseline
    assert result.metrics["usage_bottom"] > 0.3
    assert (tmp_path / "run" / "reconstructions.png").is_file()
    assert (tmp_path / "run" / "config.yaml").is_file()


def test_refuses_to_overwrite_a_run_and_resume_needs_a_run(tmp_path, npz_data):
    config = tiny_run_config("train.max_steps=2")
    train_vqvae(config, npz_data, tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match="already holds a trained VQ-VAE"):
        train_vqvae(config, npz_data, tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match="does not exist"):
        train_vqvae(config, npz_data, tmp_path / "other", resume=True, progress=False)


def test_reconstruct_reports_split_metrics_and_writes_grid(tmp_path, npz_data):
    config = tiny_run_config("train.max_steps=5")
    train_vqvae(config, npz_data, tmp_path / "run", progress=False)
    result = reconstruct(Run.open(tmp_path / "run"), npz_data, "test", tmp_path / "grid.png")
    assert result["images"] == 10 and result["split"] == "test"
    # By hand on the test split: the clamped reconstruction's error on [0, 1] pixels, and the
    # share of the K = 16 codes each level uses.
    model = load_vqvae(tmp_path / "run")
    test = open_dataset(npz_data, "test", 16, 1, config.data)
    images = uint8_to_float(test.__getitems__(list(range(len(test))))[0])
    with torch.no_grad():
        output = model(images)
    mse = float(((output.reconstruction.clamp(-1, 1) - images) / 2).pow(2).mean())
    assert result["mse"] == pytest.approx(mse, rel=1e-5)
    # PSNR from the images themselves: peak 1 on [0, 1] pixels, the reconstruction clamped.
    pixels, reconstruction = (images.double() + 1) / 2, (output.reconstruction.double() + 1) / 2
    squared = (reconstruction.clamp(0, 1) - pixels).pow(2).mean()
    assert result["psnr"] == pytest.approx(float(10 * torch.log10(1 / squared)), rel=1e-5)
    for name, codes in zip(("top", "bottom"), output.codes, strict=True):
        assert result[f"usage_{name}"] == len(codes.unique()) / 16, name
    from PIL import Image

    grid = Image.open(tmp_path / "grid.png")
    # 3 rows (original, reconstruction, top only) of 10 tiles of 16 px with 2 px padding.
    assert grid.size == (10 * 18 + 2, 3 * 18 + 2)


def test_reconstruct_grid_shows_images_from_across_the_split(tmp_path, npz_data):
    """The grid's originals are spread over the split (first, middle, last), not its first
    images, so a split sorted by class shows more than one class."""
    config = tiny_run_config("train.max_steps=2")
    train_vqvae(config, npz_data, tmp_path / "run", progress=False)
    reconstruct(Run.open(tmp_path / "run"), npz_data, "test", tmp_path / "grid.png", grid_images=3)
    test = open_dataset(npz_data, "test", 16, 1, config.data)
    from PIL import Image

    grid = np.asarray(Image.open(tmp_path / "grid.png").convert("L"))
    originals = [grid[2:18, 2 + 18 * j : 18 + 18 * j] for j in range(3)]  # first row's tiles
    for tile, index in zip(originals, (0, 4, 9), strict=True):
        np.testing.assert_array_equal(tile, test[index][0][0].numpy())


def test_metrics_log_has_train_and_val_rows(tmp_path, npz_data):
    train_vqvae(
        tiny_run_config("train.max_steps=4", "train.val_every=2"),
        npz_data,
        tmp_path / "r",
        progress=False,
    )
    rows = read_metrics(tmp_path / "r" / "metrics.csv")
    by_split = defaultdict(set)
    for row in rows:
        by_split[row["split"]].add(row["metric"])
    assert {"loss", "mse", "perplexity_top", "batch_usage_bottom"} <= by_split["train"]
    assert {"mse", "psnr", "usage_top", "usage_bottom"} <= by_split["val"]
    # Train rows at every step; validation at step 2 (step 4, the last, is the final one).
    path = tmp_path / "r" / "metrics.csv"
    assert sorted(metric_values(path, "train", "loss")) == [1, 2, 3, 4]
    assert sorted(metric_values(path, "val", "mse")) == [2, 4]


def test_prefix_decoder_losses_are_logged_and_the_decoders_come_back_with_the_run(
    tmp_path, npz_data
):
    config = tiny_run_config("train.max_steps=3", "model.prefix_decoder_weight=0.1")
    train_vqvae(config, npz_data, tmp_path / "r", progress=False)
    logged = metric_values(tmp_path / "r" / "metrics.csv", "train", "prefix_mse")
    assert sorted(logged) == [1, 2, 3] and all(value > 0 for value in logged.values())
    model = load_vqvae(tmp_path / "r")
    assert model.config.prefix_decoder_weight == 0.1 and len(model.prefix_decoders) == 1
    val = open_dataset(npz_data, "val", 16, 1, config.data)
    images = uint8_to_float(torch.stack([val[0][0], val[1][0]]))  # (2, 1, 16, 16)
    with torch.no_grad():
        top = model.quantize(images)[0].quantized  # (2, D, 2, 2)
        torch.testing.assert_close(
            model.decode_codes(model.encode(images), keep_levels=[0]),
            model.prefix_decoders[0]([top]),
        )


def test_train_log_mse_is_the_validation_measure(tmp_path, npz_data, monkeypatch):
    """The train rows' ``mse`` is measured like validation's: reconstructions clamped to the
    image range, squared error on [0, 1] pixels (not the loss's unclamped [-1, 1] error / 4)."""
    from vqvae2.metrics import squared_error_01
    from vqvae2.vqvae import VQVAE2

    forward = VQVAE2.forward
    seen = []

    def out_of_range_forward(self, images):
        # Push the reconstructions outside [-1, 1], where clamping changes the error.
        output = forward(self, images)
        reconstruction = output.reconstruction + 1.5
        seen.append((reconstruction.detach().clone(), images.detach().clone()))
        return output._replace(
            reconstruction=reconstruction,
            reconstruction_loss=torch.mean((reconstruction - images) ** 2),
        )

    monkeypatch.setattr(VQVAE2, "forward", out_of_range_forward)
    train_vqvae(
        tiny_run_config("train.max_steps=2", "train.val_every=100"),
        npz_data,
        tmp_path / "r",
        progress=False,
    )
    logged = [
        float(row["value"])
        for row in read_metrics(tmp_path / "r" / "metrics.csv")
        if row["split"] == "train" and row["metric"] == "mse"
    ]
    expected = [
        float(squared_error_01(reconstruction, images).sum() / images.numel())
        for reconstruction, images in seen[:2]  # the two training steps' batches
    ]
    assert logged == pytest.approx(expected, rel=1e-5)


def test_low_pass_keeps_coarse_content_and_drops_fine_detail():
    checkerboard = (torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2 * 2.0 - 1
    fine = checkerboard.expand(1, 1, 16, 16)
    assert torch.allclose(low_pass(fine, 4), torch.zeros(1, 1, 16, 16), atol=1e-6)
    halves = torch.cat([-torch.ones(1, 1, 16, 8), torch.ones(1, 1, 16, 8)], dim=3)
    smooth = low_pass(halves, 2)  # a 2x2 grid holds the two halves; a ramp joins them
    assert torch.equal(smooth[..., :4], halves[..., :4]) and torch.equal(
        smooth[..., 12:], halves[..., 12:]
    )
    assert bool((smooth[..., 4:12].diff(dim=-1) > 0).all())


def test_measure_levels_by_hand(tmp_path, npz_data):
    config = tiny_run_config("train.max_steps=10")
    train_vqvae(config, npz_data, tmp_path / "run", progress=False)
    model = load_vqvae(tmp_path / "run")
    test = open_dataset(npz_data, "test", 16, 1, config.data)
    result = measure_levels(model, test, batch_size=64)
    images = uint8_to_float(test.__getitems__(list(range(len(test))))[0])  # (10, 1, 16, 16)
    with torch.no_grad():
        codes = model.encode(images)
        full = model.decode_codes(codes).clamp(-1, 1)
        swapped = model.decode_codes([codes[0], codes[1].roll(1, dims=0)]).clamp(-1, 1)
        top_only = model.decode_codes(codes, keep_levels=[0]).clamp(-1, 1)
    change = (swapped - full) / 2
    bottom = result["levels"]["bottom"]
    assert bottom["swap_mse"] == pytest.approx(float(change.pow(2).mean()), rel=1e-5)
    coarse = float(low_pass(change, 2).pow(2).sum() / change.pow(2).sum())  # top map: 2x2
    assert bottom["swap_coarse_share"] == pytest.approx(coarse, rel=1e-5)
    assert bottom["bits"] == pytest.approx(math.log2(bottom["perplexity"]))
    mean_image = images.mean(0, keepdim=True)
    top = result["prefixes"]["top"]
    mse_mean = float(((top_only - mean_image) / 2).pow(2).mean())
    mse_low = float(((top_only - low_pass(images, 2)) / 2).pow(2).mean())
    assert top["psnr_vs_mean_image"] == pytest.approx(10 * math.log10(1 / mse_mean), rel=1e-5)
    assert top["psnr_vs_low_pass"] == pytest.approx(10 * math.log10(1 / mse_low), rel=1e-5)
    assert top["low_pass_side"] == 2 and set(result["prefixes"]) == {"top"}


def test_adam_in_backward_trains_the_same_weights_and_shares_checkpoints(tmp_path, npz_data):
    """Stepping each parameter inside the backward pass is Adam's own update: the same weights
    as the usual step, and checkpoints that resume in either mode."""
    usual = train_vqvae(
        tiny_run_config("train.max_steps=4"), npz_data, tmp_path / "a", progress=False
    )
    in_backward = tiny_run_config("train.max_steps=4", "train.optimizer_in_backward=true")
    stepped = train_vqvae(in_backward, npz_data, tmp_path / "b", progress=False)
    assert_states_close(stepped.model.state_dict(), usual.model.state_dict(), atol=1e-6)
    # Half the run in one mode, the rest resumed in the other, both ways round.
    half = tiny_run_config("train.max_steps=2", "train.optimizer_in_backward=true")
    train_vqvae(half, npz_data, tmp_path / "c", progress=False)
    resumed = train_vqvae(
        tiny_run_config("train.max_steps=4"), npz_data, tmp_path / "c", resume=True, progress=False
    )
    assert_states_close(resumed.model.state_dict(), usual.model.state_dict(), atol=1e-6)
    with pytest.raises(ValueError, match="needs train.grad_accum_steps=1"):
        tiny_run_config("train.optimizer_in_backward=true", "train.nonfinite=skip")


def test_adam_in_backward_frees_each_gradient_as_it_steps():
    from vqvae2.config import TrainConfig
    from vqvae2.optimizer import AdamInBackward

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    optimizer = AdamInBackward(model, TrainConfig(learning_rate=0.1))
    before = [p.detach().clone() for p in model.parameters()]
    seen = []  # gradients alive when each parameter is stepped
    for parameter in model.parameters():
        parameter.register_post_accumulate_grad_hook(
            lambda _: seen.append(sum(p.grad is not None for p in model.parameters()))
        )
    model(torch.randn(5, 3)).pow(2).sum().backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert seen == [0, 0, 0, 0]  # after each step no gradient is held (usual Adam: 1, 2, 3, 4)
    state = optimizer.state_dict()
    assert sorted(state["state"]) == [0, 1, 2, 3] and state["param_groups"][0]["params"] == [
        0,
        1,
        2,
        3,
    ]
