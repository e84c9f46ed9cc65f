"""The incremental sampler on every prior shape the presets use: exactness and state memory.

Exactness: the cached per-position logits equal the teacher-forced forward pass up to float
rounding, and at these narrow widths the cached sampler draws the same codes as the reference
sampler from the same generator, at a temperature alone and with top-k or top-p filtering (at
the paper's widths rounding tips a near-tie about once in 800 64x64 maps:
``test_bench_sampler_agreement.py``, ``bench/README.md``). Each preset keeps its kernel size,
layers, attention layers and heads, output and conditioning stacks and its conditioning
structure (upper levels, classes); the widths shrink (16 hidden, 12 residual, 8 conditioning
channels, K = 13) and so do the paper-size maps: to an eighth of their side for the logits, a
sixteenth for the sampler (the reference sampler runs a full forward pass per position); a slow
test checks the logits at the paper's own map sizes.

The fixed-shape step behind ``cached-compiled`` and ``cached-cuda-graph`` is checked the same way
on every shape, run uncompiled (the computation both of them run); compiled, on two shapes in a
slow test (compiling takes seconds per shape); as a CUDA graph, in test_gpu.py.

Memory: the state's size is pinned by a formula, checked at the paper's sizes on the ``meta``
device (free to build), against the issue's limits of 128 MiB per image for the ImageNet bottom
prior and 256 MiB for the FFHQ bottom prior.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import pytest
import torch
from torch._dynamo.utils import counters

import vqvae2.pixelsnail_sampler as pixelsnail_sampler
from vqvae2.config import PriorRunConfig, list_presets, load_config
from vqvae2.model_configs import PixelSNAILConfig
from vqvae2.pixelsnail import PixelSNAIL
from vqvae2.pixelsnail_sampler import IncrementalSampler
from vqvae2.sampling import DrawControls, sample_level_cached, sample_level_reference

K = 13
NARROW = dict(hidden_channels=16, residual_channels=12, condition_channels=8, codebook_size=K)
# preset -> (map side, upper levels' sides top first, classes) as the paper's data give them
PRESET_SHAPES = {
    "prior-top-tiny": (4, (), 3),
    "prior-bottom-tiny": (8, (4,), 3),
    "prior-middle-tiny": (4, (2,), 3),
    "prior-top-fashion-mnist-32": (4, (), 10),
    "prior-bottom-fashion-mnist-32": (8, (4,), 10),
    "prior-top-photos-64": (8, (), 7),
    "prior-bottom-photos-64": (16, (8,), 7),
    "prior-top-photos-128-3": (8, (), 7),
    "prior-middle-photos-128-3": (16, (8,), 7),
    "prior-bottom-photos-128-3": (32, (8, 16), 7),
    "prior-top-imagenet-256": (32, (), 1000),
    "prior-bottom-imagenet-256": (64, (32,), 1000),
    "prior-top-ffhq-1024": (32, (), 0),
    "prior-middle-ffhq-1024": (64, (32,), 0),
    "prior-bottom-ffhq-1024": (128, (32, 64), 0),
}
PAPER_SIDE = 32  # the smallest paper map: presets with maps this big are shrunk in tests


def preset_config(name: str, shrink: int = 1, **changes) -> PixelSNAILConfig:
    """The preset's prior for its data; paper-size maps divided by ``shrink``."""
    side, upper, classes = PRESET_SHAPES[name]
    if side < PAPER_SIDE:
        shrink = 1
    shrink = min(shrink, *upper, side)  # every map keeps at least one position
    return dataclasses.replace(
        load_config(PriorRunConfig, name).prior,
        code_size=side // shrink,
        condition_sizes=tuple(s // shrink for s in upper),
        num_classes=classes,
        **changes,
    )


def narrow_prior(name: str, shrink: int) -> PixelSNAIL:
    torch.manual_seed(0)
    return PixelSNAIL(preset_config(name, shrink, dropout=0.0, **NARROW)).eval()


def inputs(prior: PixelSNAIL, batch: int) -> tuple[torch.Tensor | None, list | None]:
    config = prior.config
    labels = torch.arange(batch) * 7 % config.num_classes if config.num_classes else None
    upper = [torch.randint(0, K, (batch, s, s)) for s in config.condition_sizes] or None
    return labels, upper


def assert_cached_logits_match(prior: PixelSNAIL, batch: int, step: str = "eager") -> None:
    """Per-position logits of the sampler == the teacher-forced forward pass (atol 1e-4)."""
    side = prior.config.code_size
    labels, upper = inputs(prior, batch)
    codes = torch.randint(0, K, (batch, side, side))
    with torch.no_grad():
        full = prior(codes, labels, upper).logits  # (B, K, H, W)
        state = IncrementalSampler(prior, batch, prior.condition(labels, upper), step)
        cached = torch.empty_like(full)
        for row in range(side):
            for column in range(side):
                cached[:, :, row, column] = state.logits_at(row, column)
                state.set_codes(row, column, codes[:, row, column])
    torch.testing.assert_close(cached, full, rtol=0, atol=1e-4)


def test_every_prior_preset_is_covered():
    assert sorted(PRESET_SHAPES) == [name for name in list_presets() if name.startswith("prior-")]


@pytest.mark.parametrize("name", list(PRESET_SHAPES))
def test_cached_logits_match_the_forward_pass_for_every_preset_shape(name):
    assert_cached_logits_match(narrow_prior(name, shrink=8), batch=2)


# Temperature alone on every shape; each filter at another temperature (top-k 4 and top-p 0.7
# of K = 13) on every shape whose sampled map is at most 8x8 (the 16x16 ones take seconds).
FILTERS = [DrawControls(0.8, top_k=4), DrawControls(1.2, top_p=0.7)]
SAMPLER_CASES = [(name, 1.0) for name in PRESET_SHAPES] + [
    (name, controls)
    for name in PRESET_SHAPES
    if preset_config(name, shrink=16).code_size <= 8
    for controls in FILTERS
]


@pytest.mark.parametrize("name, controls", SAMPLER_CASES, ids=str)
def test_cached_sampler_draws_the_reference_codes_for_every_preset_shape(name, controls):
    prior = narrow_prior(name, shrink=16)
    labels, upper = inputs(prior, 4)
    draws = [
        sampler(prior, 4, labels, upper, controls, torch.Generator().manual_seed(11))
        for sampler in (sample_level_reference, sample_level_cached)
    ]
    assert torch.equal(draws[0], draws[1])
    # Not a degenerate draw: at least 16 codes (4 maps of 2x2 or more), of several values.
    assert len(torch.unique(draws[1])) >= 4


@pytest.fixture
def uncompiled_fixed_step(monkeypatch):
    """The ``compiled`` step without ``torch.compile``: the fixed-shape computation in eager."""
    monkeypatch.setattr(
        pixelsnail_sampler, "_compiled_step", lambda: IncrementalSampler._logits_fixed
    )


@pytest.mark.parametrize("name", list(PRESET_SHAPES))
def test_the_fixed_shape_step_gives_the_forward_pass_logits(name, uncompiled_fixed_step):
    assert_cached_logits_match(narrow_prior(name, shrink=8), batch=2, step="compiled")


@pytest.mark.parametrize("name, controls", SAMPLER_CASES, ids=str)
def test_the_fixed_shape_step_draws_the_reference_codes(name, controls, uncompiled_fixed_step):
    prior = narrow_prior(name, shrink=16)
    labels, upper = inputs(prior, 4)
    draws = [
        sampler(prior, 4, labels, upper, controls, torch.Generator().manual_seed(11))
        for sampler in (sample_level_reference, partial(sample_level_cached, step="compiled"))
    ]
    assert torch.equal(draws[0], draws[1])
    assert len(torch.unique(draws[1])) >= 4


@pytest.mark.parametrize("name", ["prior-top-photos-64", "prior-bottom-photos-64"])
def test_the_fixed_shape_step_repeats_exactly_and_writes_in_place(name, uncompiled_fixed_step):
    """What a CUDA graph's capture and replay rely on (checked here on the CPU): a step called
    again at the same position (the warm-up before capture) gives the same logits and leaves
    the state as one call does, and no step replaces a state tensor (a graph keeps addresses)."""
    prior = narrow_prior(name, shrink=16)
    labels, upper = inputs(prior, 3)
    condition = prior.condition_per_image(labels, upper)
    once = IncrementalSampler(prior, 3, condition, "compiled")
    thrice = IncrementalSampler(prior, 3, condition, "compiled")
    addresses = [t.data_ptr() for t in thrice.state_tensors()]
    side = prior.config.code_size
    codes = torch.randint(0, K, (3, side, side))
    for position in range(side * side):
        row, col = divmod(position, side)
        expected = once.logits_at(row, col)
        for _ in range(3):
            torch.testing.assert_close(
                thrice._logits_fixed(thrice.positions[position]), expected, rtol=0, atol=0
            )
        thrice.logits_at(row, col)
        for state in (once, thrice):
            state.set_codes(row, col, codes[:, row, col])
    for after, before in zip(thrice.state_tensors(), once.state_tensors(), strict=True):
        assert torch.equal(after, before)
    assert [t.data_ptr() for t in thrice.state_tensors()] == addresses


@pytest.mark.slow
@pytest.mark.parametrize("name", ["prior-top-photos-64", "prior-bottom-photos-64"])
def test_the_compiled_step_draws_the_reference_codes_and_compiles_once(name):
    """torch.compile of the fixed-shape step (seconds per shape): logits of the forward pass,
    the reference sampler's draws, and one graph for two samplers of the same shape."""
    prior = narrow_prior(name, shrink=16)
    torch._dynamo.reset()
    counters.clear()
    assert_cached_logits_match(prior, batch=4, step="compiled")
    labels, upper = inputs(prior, 4)
    draws = [
        sampler(prior, 4, labels, upper, 1.0, torch.Generator().manual_seed(11))
        for sampler in (sample_level_reference, partial(sample_level_cached, step="compiled"))
    ]
    assert torch.equal(draws[0], draws[1])
    assert len(torch.unique(draws[1])) >= 4
    assert counters["stats"]["unique_graphs"] == 1


def test_a_compiler_failure_is_one_line(monkeypatch):
    def failing(*_):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\n  (details)")

    monkeypatch.setattr(pixelsnail_sampler, "_compiled_step", lambda: failing)
    prior = narrow_prior("prior-top-tiny", shrink=1)
    state = IncrementalSampler(prior, 2, None, "compiled")
    with pytest.raises(
        ValueError,
        match=r"^torch.compile could not compile the sampler's step "
        r"\(InvalidCxxCompiler: No working C\+\+ compiler found\); sample with",
    ):
        state.logits_at(0, 0)


def test_the_step_is_checked():
    prior = narrow_prior("prior-top-tiny", shrink=1)
    with pytest.raises(
        ValueError, match=r"step must be one of \['eager', 'compiled', 'cuda-graph'\]"
    ):
        IncrementalSampler(prior, 2, None, "fast")
    if not torch.cuda.is_available():
        with pytest.raises(
            ValueError,
            match=r"the cuda-graph step \(sampler cached-cuda-graph\) needs the prior on a CUDA",
        ):
            IncrementalSampler(prior, 2, None, "cuda-graph")


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", [name for name, (side, _, _) in PRESET_SHAPES.items() if side >= PAPER_SIDE]
)
def test_cached_logits_match_at_the_paper_map_sizes(name):
    """The paper presets at their own map sizes, narrowed (about 2.5 minutes on 2 cores)."""
    assert_cached_logits_match(narrow_prior(name, shrink=1), batch=1)


# ----------------------------------------------------------------------------------------------
# State memory


def state_elements_per_image(config: PixelSNAILConfig, spatial: bool, constant: bool) -> int:
    """The state's size per image, from the layout in ``IncrementalSampler``'s docstring."""
    k, side = config.kernel_size // 2, config.code_size
    hidden, residual, layers = config.hidden_channels, config.residual_channels, config.num_layers
    elements = hidden * (k + 1) * (side + 2 * k + 1)  # embedded rows
    elements += layers * hidden * (k + 1) * (side + 2 * k)  # vertical stream rows
    elements += layers * hidden * (side + k)  # horizontal stream, current row
    elements += hidden * side + layers * residual * side  # what each row takes from above
    if spatial:  # gate offsets of the current row and the conditioning features
        elements += layers * 2 * hidden * side + config.condition_channels * side * side
    elif constant:  # class (and augmentation) conditioning: one gate offset per block
        elements += layers * 2 * hidden + config.condition_channels
    elements += config.attention_layers * 2 * hidden * side * side  # keys and values
    return elements


def meta_state(config: PixelSNAILConfig, batch: int) -> IncrementalSampler:
    """A sampler state of ``config`` on the meta device: sizes without memory."""
    with torch.device("meta"):
        prior = PixelSNAIL(config).eval()
        labels = torch.zeros(batch, dtype=torch.long) if config.num_classes else None
        upper = [torch.zeros(batch, s, s, dtype=torch.long) for s in config.condition_sizes]
        return IncrementalSampler(prior, batch, prior.condition(labels, upper or None))


@pytest.mark.parametrize("name", list(PRESET_SHAPES))
def test_state_size_follows_the_formula_at_the_paper_sizes(name):
    config = preset_config(name)
    per_image = state_elements_per_image(
        config, spatial=bool(config.condition_sizes), constant=config.num_classes > 0
    )
    shared = 2 * config.code_size**2 if config.attention_layers else 0  # (T, 2) coordinates
    for batch in (1, 3):
        state = meta_state(config, batch)
        assert sum(t.numel() for t in state.state_tensors()) == batch * per_image + shared
        assert all(t.dtype == torch.float32 for t in state.state_tensors())


def test_paper_bottom_priors_fit_the_issue_limits():
    mib = 2**20
    imagenet = meta_state(preset_config("prior-bottom-imagenet-256"), 1).state_bytes() / mib
    ffhq = meta_state(preset_config("prior-bottom-ffhq-1024"), 1).state_bytes() / mib
    assert imagenet <= 128 and ffhq <= 256
    # The figures the bench README reports (float32, batch 1).
    assert round(imagenet, 1) == 29.1 and round(ffhq, 1) == 53.3


def test_state_grows_linearly_in_the_side_per_block():
    """Doubling the blocks adds O(W) per block (stream rows), not O(W^2) maps as before; only
    the conditioning features and the attention cache grow with W^2, and they do not grow with
    the blocks (the cache grows with attention layers, not blocks)."""
    base = dict(NARROW, kernel_size=5, attention_layers=1, attention_heads=2)
    base.update(condition_sizes=(4,), condition_res_blocks=1, num_classes=0)

    def elements(layers: int, side: int) -> int:
        config = PixelSNAILConfig(code_size=side, num_layers=layers, **base)
        return sum(t.numel() for t in meta_state(config, 1).state_tensors())

    for side in (8, 16, 32):
        per_block = elements(6, side) - elements(3, side)
        k, hidden, residual = 2, 16, 12
        assert per_block == 3 * (
            hidden * (k + 1) * (side + 2 * k)
            + hidden * (side + k)
            + residual * side
            + 2 * hidden * side
        )
    # The W^2 terms: attention keys and values (2C), conditioning features (C_c), coordinates
    # (2); the second difference at equal steps of W cancels the terms linear in W.
    quadratic = elements(3, 48) - 2 * elements(3, 32) + elements(3, 16)
    assert quadratic == (2 * 16 + 8 + 2) * (48**2 - 2 * 32**2 + 16**2)


# ----------------------------------------------------------------------------------------------
# Interface


def test_positions_must_come_in_raster_order():
    prior = narrow_prior("prior-top-tiny", shrink=1)
    labels, _ = inputs(prior, 2)
    state = IncrementalSampler(prior, 2, prior.condition(labels, None))
    codes = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"expected \(0, 0\), got \(0, 1\)"):
        state.logits_at(0, 1)
    with pytest.raises(ValueError, match=r"call logits_at\(0, 0\) before"):
        state.set_codes(0, 0, codes)
    state.logits_at(0, 0)
    state.set_codes(0, 0, codes)
    with pytest.raises(ValueError, match=r"expected \(0, 1\), got \(0, 0\)"):
        state.logits_at(0, 0)
