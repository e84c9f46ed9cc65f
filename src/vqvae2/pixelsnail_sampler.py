"""The incremental (cached) sampler of a PixelSNAIL prior (``pixelsnail.PixelSNAIL``).

Sampling, and the codec's entropy coding, need the prior's logits one raster position at a time.
Running the full forward pass per position costs a whole map each time; ``IncrementalSampler``
computes the same logits (up to float rounding) from a state that holds, per block, only the rows
its convolutions still read, the attention keys and values so far, and the conditioning features.
The prior is untouched: the sampler reads its weights and keeps its own state.

Each position's step runs one of three ways (``STEPS``):
  * ``eager``: PyTorch operations on views at the position (the default; fewest operations);
  * ``compiled``: the same computation with every shape fixed (the position a tensor, attention
    over the whole key cache under a mask) through ``torch.compile``, compiled once per shape and
    reused by every sampler of that shape;
  * ``cuda-graph``: that fixed-shape step captured once as a CUDA graph and replayed at every
    position (CUDA only): one launch instead of one per operation.
The row-level work (the vertical stream, once a row's codes are known) stays eager in all three.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from .pixelsnail import CausalSelfAttention, PixelSNAIL, coordinate_grid, gate

StepName = Literal["eager", "compiled", "cuda-graph"]
STEPS: tuple[StepName, ...] = ("eager", "compiled", "cuda-graph")


def _project(attention: CausalSelfAttention, token: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One position's token (B, C + 2) -> its query, key and value, each (B, heads, 1, d):
    ``attention.project``'s layers, its split into heads written as views."""
    batch, heads = token.shape[0], attention.heads
    return tuple(
        projection(token[:, None]).view(batch, 1, heads, -1).transpose(1, 2)
        for projection in (attention.query, attention.key, attention.value)
    )


def _merge_heads(attention: CausalSelfAttention, attended: Tensor) -> Tensor:
    """The attention's output layer on one position's heads: (B, heads, 1, d) -> (B, C)."""
    return attention.output(attended.transpose(1, 2).reshape(attended.shape[0], -1))


def _push_row(rows: Tensor, row: Tensor | None, margin: int) -> None:
    """Shift a window of rows (B, C, n, W + 2 * margin) up by one, in place, and put ``row``
    (B, C, 1, W) as its last row between the margins (zeros when None)."""
    rows[:, :, :-1] = rows[:, :, 1:].clone()
    rows[:, :, -1] = 0
    if row is not None:
        rows[:, :, -1:, margin : rows.shape[-1] - margin] = row


def _matrix_weights(prior: PixelSNAIL) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
    """The horizontal stream's weights as matrices for one position: the input layer's
    (C(k+1), C), and per block its convolution's (C(k+1), R) and gates' (R, 2C).

    Per-position work is tiny, so convolutions become matrix products on flat windows: a
    (out, in, 1, k) weight flattens in the same (in, k) order as a (B, in, k) window.
    """
    input_weight = prior.horizontal_input.conv.weight.flatten(1).t()  # (C(k+1), C)
    block_weights = [
        (
            block.horizontal.conv.weight.flatten(1).t(),  # (C(k+1), R)
            block.horizontal_gates.weight.flatten(1).t(),  # (R, 2C)
        )
        for block in prior.blocks
    ]
    return input_weight, block_weights


class IncrementalSampler:
    """Computes a prior's logits one raster position at a time, keeping only what later positions read.

    The horizontal stream is evaluated at the new position through every block (its convolutions
    read the current row to its left), the vertical stream one whole row at a time once the row's
    codes are known, attention appends the new key and value to its cache, and the conditioning
    features are kept once at the conditioning stack's width and projected into each block's
    gates a row at a time. The result equals the full forward pass (teacher forcing) up to float
    rounding.

    State (k = kernel_size // 2, W the map side, T = W * W positions, C hidden and R residual
    channels, L blocks, C_c conditioning channels, A attention layers with ``heads`` heads):

    ================  ==========================  ===================================================
    ``embedded``      (B, C, k + 1, W + 2k + 1)   code embeddings of rows i-k .. i (the current row
                                                  last; logical column j stored at j + k + 1)
    ``vertical[l]``   (B, C, k + 1, W + 2k)       ELU of the vertical stream entering block l, rows
                                                  i-k .. i (column j at j + k); L of them
    ``horizontal[l]`` (B, C, W + k)               ELU of the horizontal stream entering block l on
                                                  the current row (column j at j + k); L of them
    ``input_above``   (B, C, W)                   what the first horizontal layer takes from the
                                                  row above, plus that layer's bias
    ``above[l]``      (B, R, W)                   the same for block l's horizontal hidden layer
    ``gate_offsets``  (B, 2C, W) per block        the horizontal gates' bias plus the current
                                                  row's conditioning; (B, 2C, 1) for class or
                                                  augmentation conditioning only, none without
    ``condition``     (B, C_c, W, W)              the conditioning features (or (B, C_c, 1, 1))
    ``keys[a]``,      (B, heads, T, C / heads)    attention keys and values of every position so
    ``values[a]``                                 far; A layers
    ================  ==========================  ===================================================

    That is, per image, C(k+1)(W+2k+1) + L C(k+1)(W+2k) + L C(W+k) + C W + L R W elements,
    plus L 2C W + C_c W^2 with upper levels to condition on (L 2C + C_c with only a class or
    augmentation), plus 2 A C T with attention; and a (T, 2) table of coordinates shared by the
    batch. Per block it is linear in W; the terms in T = W^2 are the attention cache and the
    conditioning features, neither per block (float32, batch 1: 29 MiB for the paper's ImageNet
    bottom prior, 53 MiB for the FFHQ bottom prior; ``bench/README.md``).

    Use ``logits_at(row, col)`` then ``set_codes(row, col, codes)`` for every position in raster
    order (``ValueError`` otherwise). Inference only: no gradients flow through the state.
    ``step`` chooses how each position is computed (module docstring); a CUDA graph is captured
    here, a compiled step at the first ``logits_at`` of its shape (``compile_seconds`` then says
    how long that call took). Those two steps also hold T + k + 1 int64 indices (not counted
    above), and the CUDA graph its own intermediate buffers.
    """

    @torch.no_grad()
    def __init__(
        self,
        prior: PixelSNAIL,
        batch_size: int,
        condition: Tensor | None,
        step: StepName = "eager",
    ) -> None:
        if step not in STEPS:
            raise ValueError(f"step must be one of {list(STEPS)}, got {step!r}")
        self.prior = prior
        config = prior.config
        self.side = side = config.code_size
        self.half = half = config.kernel_size // 2
        hidden, residual = config.hidden_channels, config.residual_channels
        parameter = next(prior.parameters())

        def zeros(*size: int) -> Tensor:
            return torch.zeros(*size, device=parameter.device, dtype=parameter.dtype)

        self.embedded = zeros(batch_size, hidden, half + 1, side + 2 * half + 1)
        self.vertical = [zeros(batch_size, hidden, half + 1, side + 2 * half) for _ in prior.blocks]
        self.horizontal = [zeros(batch_size, hidden, side + half) for _ in prior.blocks]
        # Row 0 has nothing above it: the 1x1 convolutions of the (zero) shifted vertical stream
        # leave their biases, to which the horizontal convolutions' biases are added once here.
        self.input_above = zeros(batch_size, hidden, side)
        self.input_above += (
            prior.vertical_input_to_horizontal.bias + prior.horizontal_input.conv.bias
        )[:, None]
        self.above = [zeros(batch_size, residual, side) for _ in prior.blocks]
        for above, block in zip(self.above, prior.blocks, strict=True):
            above += (block.vertical_to_horizontal.bias + block.horizontal.conv.bias)[:, None]

        self.condition = condition  # (B, C_c, H, W), (B or 1, C_c, 1, 1) or None
        self.spatial = condition is not None and condition.shape[-1] > 1
        # Each block's conditioning weights, split into the vertical and horizontal gates' parts.
        self.condition_weights = [
            None
            if block.condition is None or condition is None
            else (
                block.condition.weight.split(block.gate_channels),  # (2C or 0, C_c, 1, 1), (2C, ..)
                block.condition.bias.split(block.gate_channels),
            )
            for block in prior.blocks
        ]
        first_row = self._condition_row(0)
        self.gate_offsets = [
            self._horizontal_gate_offsets(index, first_row).contiguous()
            for index in range(len(prior.blocks))
        ]  # per block (B, 2C, W) spatial, (B or 1, 2C, 1) constant, (2C, 1) bias only; contiguous
        # whatever layout the conditioning came in, so a compiled step sees one set of strides

        attention_layers = dict(prior.attention.items())
        self.attention_after = [attention_layers.get(str(i)) for i in range(len(prior.blocks))]
        self.keys: dict[int, Tensor] = {}
        self.values: dict[int, Tensor] = {}
        for index, attention in enumerate(self.attention_after):
            if attention is not None:
                cache = (batch_size, attention.heads, side * side, hidden // attention.heads)
                self.keys[index], self.values[index] = zeros(*cache), zeros(*cache)
        self.coordinates = (
            rearrange(coordinate_grid(side, side, parameter), "c h w -> (h w) c")  # (T, 2)
            if prior.attention
            else None
        )
        self.position = 0  # the next raster position to set
        self.computed = -1  # the last position whose logits (and stream values) were computed
        self._prepare_step(step)

    def _prepare_step(self, step: StepName) -> None:
        """What each position's step reads besides the state: the weights as the matrices it
        multiplies, each column's views of the state, and for the fixed-shape steps their index
        tensors (and the CUDA graph, captured here)."""
        prior, side, device = self.prior, self.side, self.embedded.device
        self.input_weight, self.block_weights = _matrix_weights(prior)
        self.output_weights = [
            (block.first.weight.flatten(1).t(), block.second.weight.flatten(1).t())
            for block in prior.output_stack
        ]  # per output-stack block, its two 1x1 convolutions as (C, R) and (R, C) matrices
        self.logits_weight = prior.output.weight.flatten(1).t()  # (C, K)
        self.columns = [self._column_views(col) for col in range(side)]
        self.step = step
        self.compile_seconds = 0.0  # the first compiled call's time (compiling included)
        if step != "eager":
            self.key_positions = torch.arange(side * side, device=device)  # (T,)
            self.positions = self.key_positions[:, None].unbind(0)  # T of (1,)
            self.window_offsets = torch.arange(self.half + 1, device=device)  # (k+1,)
        if step == "cuda-graph":
            self._capture_graph()

    # ------------------------------------------------------------------------------------------
    def state_tensors(self) -> list[Tensor]:
        """Every tensor the state holds (weights and their views excluded)."""
        tensors = [self.embedded, *self.vertical, *self.horizontal, self.input_above, *self.above]
        if self.condition is not None:
            tensors += [self.condition, *self.gate_offsets]
        tensors += [*self.keys.values(), *self.values.values()]
        if self.coordinates is not None:
            tensors.append(self.coordinates)
        return tensors

    def state_bytes(self) -> int:
        """Bytes of the state (``state_tensors``), numel x element size."""
        return sum(t.numel() * t.element_size() for t in self.state_tensors())

    def _column_views(self, col: int) -> tuple[Tensor, Tensor, list[tuple[Tensor, ...]]]:
        """The views of the state that position (i, col) reads and writes, whatever the row i:
        the input layer's window (B, C, k+1) and row-above term (B, C), then per block the slot
        of its ELU'd input (B, C), its window (B, C, k+1), its row-above term (B, R) and its
        gate offsets (B, 2C), (B or 1, 2C) or (2C,). Made once: the state changes in place."""
        half = self.half
        blocks = []
        for index, stored in enumerate(self.horizontal):
            offsets = self.gate_offsets[index]
            blocks.append(
                (
                    stored[:, :, col + half],
                    stored[:, :, col : col + half + 1],
                    self.above[index][:, :, col],
                    offsets[..., col if offsets.shape[-1] > 1 else 0],
                )
            )
        window = self.embedded[:, :, half, col : col + half + 1]  # shift_right(x)'s window
        return window, self.input_above[:, :, col], blocks

    # ------------------------------------------------------------------------------------------
    def _condition_row(self, row: int) -> Tensor | None:
        """Conditioning features of one row (B, C_c, 1, W), constant (B, C_c, 1, 1), or None."""
        if self.condition is None or not self.spatial:
            return self.condition
        return self.condition[:, :, row : row + 1]

    def _horizontal_gate_offsets(self, index: int, condition_row: Tensor | None) -> Tensor:
        """Block ``index``'s horizontal gates' bias plus the conditioning of one row.

        Returns (B, 2C, W) for spatial conditioning, (B or 1, 2C, 1) for constant, (2C, 1) none.
        """
        bias = self.prior.blocks[index].horizontal_gates.bias[:, None]  # (2C, 1)
        weights = self.condition_weights[index]
        if weights is None or condition_row is None:
            return bias
        condition = F.conv2d(condition_row, weights[0][1], weights[1][1])  # (B, 2C, 1, W or 1)
        return bias + condition[:, :, 0]  # (B, 2C, W or 1)

    def _check_position(self, row: int, col: int) -> int:
        position = row * self.side + col
        if not (0 <= row < self.side and 0 <= col < self.side) or position != self.position:
            expected = divmod(self.position, self.side)
            raise ValueError(
                f"positions go in raster order: expected {expected}, got ({row}, {col})"
            )
        return position

    def _attend(self, index: int, features: Tensor, position: int) -> Tensor:
        """Attention output (B, C) at one position from features (B, C), caching key and value."""
        attention = self.attention_after[index]
        assert attention is not None and self.coordinates is not None
        coordinates = self.coordinates[position].expand(features.shape[0], -1)  # (B, 2)
        token = torch.cat([F.elu(features), coordinates], dim=1)  # (B, C + 2)
        query, key, value = _project(attention, token)  # (B, heads, 1, d) each
        keys, values = self.keys[index], self.values[index]
        keys[:, :, position : position + 1] = key
        values[:, :, position : position + 1] = value
        attended = F.scaled_dot_product_attention(
            query, keys[:, :, : position + 1], values[:, :, : position + 1]
        )  # (B, heads, 1, d): one query sees every key so far, no mask needed
        return _merge_heads(attention, attended)  # (B, C)

    @torch.no_grad()
    def logits_at(self, row: int, col: int) -> Tensor:
        """Logits (B, K) of the code at (row, col); every earlier code must have been set."""
        position = self._check_position(row, col)
        if self.step == "eager":
            logits = self._logits_eager(position, col)
        elif self.step == "compiled" and position > 0:
            logits = _compiled_step()(self, self.positions[position])
        elif self.step == "compiled":
            logits = self._first_compiled_call()
        else:
            self._graph_position.copy_(self.positions[position])
            self._graph.replay()
            logits = self._graph_logits.clone()
        self.computed = position
        return logits

    def _first_compiled_call(self) -> Tensor:
        """The compiled step at position 0, which compiles it for this shape if no sampler has:
        timed into ``compile_seconds``; a compiler failure (no C++ compiler, say) is one line."""
        started = time.perf_counter()
        try:
            logits = _compiled_step()(self, self.positions[0])
        except (MemoryError, torch.OutOfMemoryError):
            raise
        except Exception as error:  # the compiler's own errors have no common type
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ValueError(
                f"torch.compile could not compile the sampler's step ({first_line}); sample "
                "with the eager step (sampler cached) instead"
            ) from error
        self.compile_seconds = time.perf_counter() - started
        return logits

    def _logits_eager(self, position: int, col: int) -> Tensor:
        """``logits_at`` on views at the position: (B, K)."""
        window, input_above, blocks = self.columns[col]
        horizontal = torch.addmm(input_above, window.flatten(1), self.input_weight)  # (B, C)
        for index, (slot, block_window, above, offsets) in enumerate(blocks):
            conv_weight, gates_weight = self.block_weights[index]
            slot.copy_(F.elu(horizontal))
            hidden = torch.addmm(above, block_window.flatten(1), conv_weight)  # (B, R)
            gates = torch.addmm(offsets, F.elu(hidden), gates_weight)  # (B, 2C)
            horizontal = horizontal + gate(gates)
            if self.attention_after[index] is not None:
                horizontal = horizontal + self._attend(index, horizontal, position)
        return self._output_logits(horizontal)

    def _output_logits(self, horizontal: Tensor) -> Tensor:
        """The output stack and layer on the horizontal stream at one position: (B, C) -> (B, K)."""
        for block, (first, second) in zip(
            self.prior.output_stack, self.output_weights, strict=True
        ):
            hidden = torch.addmm(block.first.bias, F.elu(horizontal), first)  # (B, R)
            horizontal = horizontal + torch.addmm(block.second.bias, F.elu(hidden), second)
        return torch.addmm(self.prior.output.bias, F.elu(horizontal), self.logits_weight)

    # ------------------------------------------------------------------------------------------
    def _logits_fixed(self, position: Tensor) -> Tensor:
        """``logits_at`` with every shape independent of the position: (1,) int64 -> (B, K).

        Columns and slots are picked with ``index_select`` / ``index_copy_`` on tensors, and
        attention reads the whole key cache with the keys after ``position`` masked out, so one
        compiled graph (or one CUDA graph) serves every position. It changes the state only in
        place, where ``_logits_eager`` writes.
        """
        half = self.half
        col = position % self.side  # (1,)
        columns = col + self.window_offsets  # (k+1,): a window's stored columns
        window = self.embedded[:, :, half].index_select(-1, columns)  # (B, C, k+1)
        horizontal = torch.addmm(
            self.input_above.index_select(-1, col)[..., 0], window.flatten(1), self.input_weight
        )  # (B, C)
        for index, (conv_weight, gates_weight) in enumerate(self.block_weights):
            stored = self.horizontal[index]  # (B, C, W + k)
            stored.index_copy_(2, col + half, F.elu(horizontal)[..., None])
            window = stored.index_select(2, columns).flatten(1)  # (B, C(k+1))
            above = self.above[index].index_select(-1, col)[..., 0]  # (B, R)
            hidden = torch.addmm(above, window, conv_weight)  # (B, R)
            offsets = self.gate_offsets[index]
            offsets = offsets.index_select(-1, col) if offsets.shape[-1] > 1 else offsets
            gates = torch.addmm(offsets[..., 0], F.elu(hidden), gates_weight)  # (B, 2C)
            horizontal = horizontal + gate(gates)
            if self.attention_after[index] is not None:
                horizontal = horizontal + self._attend_fixed(index, horizontal, position)
        return self._output_logits(horizontal)

    def _attend_fixed(self, index: int, features: Tensor, position: Tensor) -> Tensor:
        """``_attend`` over the whole cache, later keys masked: (B, C) -> (B, C)."""
        attention = self.attention_after[index]
        assert attention is not None and self.coordinates is not None
        coordinates = self.coordinates.index_select(0, position)  # (1, 2)
        token = torch.cat([F.elu(features), coordinates.expand(features.shape[0], -1)], dim=1)
        query, key, value = _project(attention, token)  # (B, heads, 1, d) each
        self.keys[index].index_copy_(2, position, key)
        self.values[index].index_copy_(2, position, value)
        visible = (self.key_positions <= position)[None]  # (1, T)
        attended = F.scaled_dot_product_attention(
            query, self.keys[index], self.values[index], attn_mask=visible
        )  # (B, heads, 1, d)
        return _merge_heads(attention, attended)  # (B, C)

    def _capture_graph(self) -> None:
        """Capture ``_logits_fixed`` as a CUDA graph reading ``_graph_position``."""
        if self.embedded.device.type != "cuda":
            raise ValueError(
                f"the cuda-graph step (sampler cached-cuda-graph) needs the prior on a CUDA "
                f"device, not {self.embedded.device}"
            )
        self._graph_position = self.positions[0].clone()
        # Warm-up runs (outside the graph, on a side stream as capture requires) compute
        # position 0 from the initial state; its writes are the ones position 0 makes again.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._logits_fixed(self._graph_position)
        torch.cuda.current_stream().wait_stream(stream)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._graph_logits = self._logits_fixed(self._graph_position)  # (B, K)

    @torch.no_grad()
    def set_codes(self, row: int, col: int, codes: Tensor) -> None:
        """Record the codes (B,) chosen at (row, col); after a row's last code, advance the
        vertical stream by that row. ``logits_at(row, col)`` must have been called first."""
        position = self._check_position(row, col)
        if self.computed != position:
            raise ValueError(f"call logits_at({row}, {col}) before set_codes({row}, {col}, ...)")
        self.embedded[:, :, self.half, col + self.half + 1] = self.prior.embedding(codes)
        self.position += 1
        if col == self.side - 1 and row < self.side - 1:  # the last row has no reader below
            self._advance_row(row)

    def _advance_row(self, row: int) -> None:
        """The vertical stream over ``row`` (all its codes known), and what row + 1 reads from it."""
        prior, half = self.prior, self.half
        # The embedded rows row-k .. row with their column margins: the input layer's window.
        vertical = prior.vertical_input.conv(self.embedded[:, :, :, 1:])  # (B, C, 1, W)
        self.input_above.copy_(
            prior.vertical_input_to_horizontal(vertical)[:, :, 0]
            + prior.horizontal_input.conv.bias[:, None]
        )  # (B, C, W)
        _push_row(self.embedded, None, half)  # the next row starts empty
        condition_row, next_condition_row = self._condition_row(row), self._condition_row(row + 1)
        for index, block in enumerate(prior.blocks):
            rows = self.vertical[index]  # (B, C, k+1, W + 2k)
            _push_row(rows, F.elu(vertical), half)
            hidden = block.vertical.conv(rows)  # (B, R, 1, W)
            self.above[index].copy_(
                block.vertical_to_horizontal(hidden)[:, :, 0] + block.horizontal.conv.bias[:, None]
            )  # (B, R, W)
            if self.spatial:
                self.gate_offsets[index].copy_(
                    self._horizontal_gate_offsets(index, next_condition_row)
                )
            if block.vertical_gates is None:
                break  # the last block leaves the vertical stream alone
            gates = block.vertical_gates(F.elu(hidden))  # (B, 2C, 1, W)
            weights = self.condition_weights[index]
            if weights is not None and condition_row is not None:
                gates = gates + F.conv2d(condition_row, weights[0][0], weights[1][0])
            vertical = vertical + gate(gates)


@functools.cache
def _compiled_step() -> Callable[[IncrementalSampler, Tensor], Tensor]:
    """``IncrementalSampler._logits_fixed`` through ``torch.compile``, built on first use.

    One compiled function for the process: dynamo compiles a graph per state shape and guards on
    shapes and dtypes, not on which sampler or prior, so later samplers of a shape reuse it.
    """
    return torch.compile(IncrementalSampler._logits_fixed, dynamic=False, fullgraph=True)
