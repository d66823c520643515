"""Per-block statistics of the training step, every `every_n_steps` steps, under `layers/`.

For block l with input x_{l-1} and output x_l (x_{-1} = the scaled token embedding), on the
training batch itself: the optimizer step's whole global batch, every micro batch of every process
(rank-local sums added up across processes, sharded FSDP2 norms gathered), as one process with the
whole batch would measure it:
    rms[l]              = sqrt(mean(x_l^2))                       the stream's scale
    stream_grad_norm[l] = ||dLoss/dx_l||_F, Loss the step's       gradient reaching block l's output
                          mean loss over the global batch
    param_grad_norm[l]  = ||dLoss/dθ_l||_2                        block l's parameters, before clipping
    update_ratio[l]     = ||θ_l(after) - θ_l(before)||_2 / ||θ_l(before)||_2   across the optimizer step
    cos[l]              = mean over tokens of cos(x_{l-1}, x_l)   near 1: the block barely turns the stream
    attn_entropy[l]     = mean over heads h and queries i of -sum_j p_hij log p_hij (nats), with
                          p_h = causal softmax(q_h k_h^T / sqrt(hd)) after RoPE, on the first
                          `entropy_sequences` sequences of the global batch (at most the first
                          micro batch of each process; query i can reach at most log(i+1))
    erank[l]            = exp(-sum_i s_i log s_i), s = the singular values of one sequence's    how many
                          [T, D] block outputs, divided by their sum (Roy & Vetterli's effective    directions
                          rank), averaged over the same sequences as attn_entropy: 1 = every     the tokens
                          token on one line (representation collapse), at most min(T, D)          span
rms, stream_grad_norm and cos are `spannorm.analysis.signal`'s definitions, measured during training.
Hooks are attached only for a logging step and removed after it, so other steps run the bare model;
a compiled model runs that step eagerly (the hooks would not run in code compiled without them).
"""

from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from functools import partial

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch.nn.utils import get_total_norm

from spannorm.callbacks import (
    draw_between_steps,
    full_tensor,
    log_scalars,
    sum_over_processes,
)
from spannorm.model.layers import CausalSelfAttention, rope_tables, rotate
from spannorm.tags import LAYER_METRICS, block_tag

# panel order in the image is LAYER_METRICS; the first four span orders of magnitude, drawn as log10
LOG10_PANELS = {"rms", "stream_grad_norm", "param_grad_norm", "update_ratio"}
# what the hooks add up per block over a logging step's micro batches, then over the processes
SUMS = ("squares", "elements", "cos", "tokens", "grad_squares", "entropy", "sequences", "erank")


def effective_rank(x: torch.Tensor) -> torch.Tensor:
    """Roy & Vetterli's effective rank of each [T, D] matrix of x [..., T, D]: the exponential of
    the entropy of its singular values normalized to sum to one. The tokens are not centred, so a
    direction shared by every token counts as one of the directions they span."""
    singular = torch.linalg.svdvals(x.float())
    p = singular / singular.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.special.entr(p).sum(dim=-1).exp()


def attention_entropy(attn: CausalSelfAttention, x: torch.Tensor) -> torch.Tensor:
    """Mean over heads and queries of the entropy (nats) of `attn`'s causal attention on x [B, T, D]."""
    T = x.shape[1]
    q, k, _ = attn.heads(x)
    cos, sin = rope_tables(attn.head_dim, 0, T, attn.rope_theta, x.device)
    q, k = attn.after_rope(rotate(q, cos, sin), rotate(k, cos, sin))  # nGPT: unit norm, s_qk
    scale = attn.softmax_scale if attn.softmax_scale is not None else 1 / math.sqrt(attn.head_dim)
    scores = q @ k.transpose(-2, -1) * scale
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    probs = scores.float().masked_fill(~causal, float("-inf")).softmax(dim=-1)
    return torch.special.entr(probs).sum(dim=-1).mean()


def rgb_pixels(figure: Figure) -> np.ndarray:
    """The figure rendered as an [H, W, 3] uint8 array."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


class LayerProfilePlot:
    """One figure, a panel per metric against the block index, redrawn in place at each update.
    Text dominates the drawing cost, so the figure is built once (a new one costs several times a
    redraw), has no grid and at most 5 ticks per axis, and shows log10 of the widely ranging
    metrics on linear axes (log axes draw slower tick labels)."""

    def __init__(self, n_blocks: int):
        self.figure = Figure(figsize=(11, 4.4), dpi=72)
        self.figure.subplots_adjust(
            left=0.06, right=0.99, bottom=0.1, top=0.87, wspace=0.28, hspace=0.4
        )
        self.lines = {}
        panels = list(self.figure.subplots(2, 4, sharex=True).flat)
        for axes in panels[len(LAYER_METRICS) :]:
            axes.remove()
        for axes, metric in zip(panels, LAYER_METRICS, strict=False):
            (self.lines[metric],) = axes.plot(range(n_blocks), [0.0] * n_blocks, marker=".", lw=1)
            axes.set_title(f"log10 {metric}" if metric in LOG10_PANELS else metric, fontsize=9)
            axes.tick_params(labelsize=7)
            axes.xaxis.set_major_locator(MaxNLocator(4, integer=True))
            axes.yaxis.set_major_locator(MaxNLocator(4))
        for axes in self.figure.axes[4:]:
            axes.set_xlabel("block", fontsize=8)
        self.title = self.figure.suptitle("", fontsize=9)

    def update(self, values: dict[str, list[float]], step: int) -> Figure:
        for metric, line in self.lines.items():
            series = np.asarray(values[metric], dtype=float)
            if metric in LOG10_PANELS:
                series = np.log10(np.where(series > 0, series, np.nan))
            line.set_ydata(series)
            line.axes.relim()
            line.axes.autoscale_view()
        self.title.set_text(f"per-block statistics, step {step}")
        return self.figure


class LayerStatsMonitor(L.Callback):
    """Logs `layers/<metric>/block_<l>` for the LAYER_METRICS above every `every_n_steps` optimizer
    steps (at the step of the batch measured, like `train/loss`), and with `image` one figure
    `layers/profile` of every metric against depth."""

    def __init__(self, every_n_steps: int = 50, entropy_sequences: int = 1, image: bool = True):
        if every_n_steps < 1 or entropy_sequences < 1:
            raise ValueError(
                f"callbacks.layer_stats: every_n_steps={every_n_steps} and "
                f"entropy_sequences={entropy_sequences} must be at least 1"
            )
        self.every_n_steps = every_n_steps
        self.entropy_sequences = entropy_sequences
        self.image = image
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._eager = ExitStack()  # holds the force_eager compiler stance of a logging step
        self._sums = torch.zeros(0)  # [SUMS, blocks] of the logging step in progress
        self._seen: set[tuple[str, int]] = set()  # hooks that ran in this micro batch
        self._micro_batch = 0  # of the logging step in progress
        self._rank, self._world_size = 0, 1
        self._param_grad_norm: list[torch.Tensor] = []
        self._params_before: list[list[torch.Tensor]] | None = None
        self._step = 0
        self._plot: LayerProfilePlot | None = None  # used by the drawing thread only
        self._drawer: ThreadPoolExecutor | None = None
        self._drawing: Future | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._handles:  # the next micro batch of a logging step (gradient accumulation)
            self._micro_batch += 1
            self._seen.clear()
            return
        if trainer.global_step % self.every_n_steps:
            return
        blocks = pl_module.model.blocks
        self._step = trainer.global_step
        self._micro_batch, self._seen = 0, set()
        self._rank, self._world_size = trainer.global_rank, trainer.world_size
        self._sums = torch.zeros(len(SUMS), len(blocks), device=pl_module.device)
        # compiled blocks (model.compile=true) would not run hooks added after compiling
        self._eager.enter_context(torch.compiler.set_stance("force_eager"))
        for index, block in enumerate(blocks):
            self._handles.append(block.register_forward_hook(partial(self._record_block, index)))
            self._handles.append(
                block.attn.register_forward_hook(partial(self._record_attention, index))
            )

    def _first_call(self, key: tuple[str, int]) -> bool:
        """Whether this hook runs for the first time in this micro batch (activation
        checkpointing runs the forward again in backward)."""
        if key in self._seen:
            return False
        self._seen.add(key)
        return True

    def _add(self, index: int, **values: torch.Tensor | float) -> None:
        for name, value in values.items():
            self._sums[SUMS.index(name), index] += value

    def _record_block(self, index: int, block, args, output: torch.Tensor) -> None:
        if not self._first_call(("block", index)):
            return
        with torch.no_grad():
            stream = output.detach().float()
            cos = F.cosine_similarity(args[0].detach().float(), stream, dim=-1)
            self._add(
                index,
                squares=stream.pow(2).sum(),
                elements=stream.numel(),
                cos=cos.sum(),
                tokens=cos.numel(),
            )
        sequences = self._sequences_measured(stream.shape[0])
        if sequences:
            self._add(index, erank=effective_rank(stream[:sequences]).sum())
        if output.requires_grad:
            output.register_hook(partial(self._record_stream_grad, index))

    def _record_stream_grad(self, index: int, grad: torch.Tensor) -> None:
        self._add(index, grad_squares=grad.detach().float().pow(2).sum())

    def _sequences_measured(self, batch_size: int) -> int:
        """How many of this micro batch's first sequences the per-sequence metrics (attention
        entropy, effective rank) measure: this process's share of the global batch's first
        `entropy_sequences`, in the first micro batch only. With the interleaved order of
        spannorm.data.sampling, sequence j of the global batch is sequence j // W of process j % W."""
        if self._micro_batch:
            return 0
        wanted = -(-(self.entropy_sequences - self._rank) // self._world_size)
        return min(max(wanted, 0), batch_size)

    def _record_attention(self, index: int, attn, args, output) -> None:
        if not self._first_call(("attn", index)):
            return
        sequences = self._sequences_measured(args[0].shape[0])
        if sequences:
            with torch.no_grad():
                entropy = attention_entropy(attn, args[0][:sequences])
            self._add(index, entropy=entropy * sequences, sequences=sequences)

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._eager.close()  # back to the compiler's previous stance

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self._handles:
            return
        blocks = pl_module.model.blocks
        self._param_grad_norm = [
            full_tensor(get_total_norm([p.grad for p in block.parameters() if p.grad is not None]))
            for block in blocks
        ]
        self._params_before = [[p.detach().clone() for p in block.parameters()] for block in blocks]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._params_before is None:  # not a logging step, or still accumulating gradients
            return
        self._remove_hooks()
        with torch.no_grad():
            update_ratio = [
                full_tensor(
                    get_total_norm(
                        [
                            p.detach() - old
                            for p, old in zip(block.parameters(), before, strict=True)
                        ]
                    )
                    / get_total_norm(before)
                )
                for block, before in zip(pl_module.model.blocks, self._params_before, strict=True)
            ]
        self._params_before = None
        sums = dict(zip(SUMS, sum_over_processes(trainer, self._sums), strict=True))
        # each process's loss is the mean over its own share, W times the global batch's
        stream_grad_norm = sums["grad_squares"].sqrt() / self._world_size
        table = torch.stack(
            [
                (sums["squares"] / sums["elements"]).sqrt(),
                stream_grad_norm,
                torch.stack(self._param_grad_norm).to(stream_grad_norm),
                torch.stack(update_ratio).to(stream_grad_norm),
                sums["cos"] / sums["tokens"],
                sums["entropy"] / sums["sequences"],
                sums["erank"] / sums["sequences"],
            ]
        ).tolist()
        values = dict(zip(LAYER_METRICS, table, strict=True))
        n_blocks = len(table[0])
        log_scalars(
            trainer,
            {
                block_tag("layers", metric, block, n_blocks): value
                for metric, series in values.items()
                for block, value in enumerate(series)
            },
            self._step,
        )
        # images go to the loggers that take them: TensorBoard (a figure), W&B (`log_image`)
        writers = [
            log
            for log in trainer.loggers
            if isinstance(log, TensorBoardLogger) or hasattr(log, "log_image")
        ]
        if self.image and writers and trainer.is_global_zero:
            if draw_between_steps(trainer):
                self._draw(writers, values, self._step)
            else:
                self._draw_in_background(writers, values, self._step)

    def _draw_in_background(self, writers: list, values: dict[str, list[float]], step: int) -> None:
        """On a GPU, draw and write the image on a worker thread: matplotlib takes ~0.2-0.4 s of
        CPU, which then overlaps the next steps, while the loop mostly waits on the device with
        the GIL released. One image at a time; an error in drawing surfaces at the next image or
        at the end of training. On CPU (`draw_between_steps`) the training thread draws it."""
        if self._drawing is not None:
            self._drawing.result()
        self._drawer = self._drawer or ThreadPoolExecutor(1, thread_name_prefix="layer-profile")
        self._drawing = self._drawer.submit(self._draw, writers, values, step)

    def _draw(self, writers: list, values: dict[str, list[float]], step: int) -> None:
        self._plot = self._plot or LayerProfilePlot(len(values["rms"]))
        figure = self._plot.update(values, step)
        for writer in writers:
            if isinstance(writer, TensorBoardLogger):
                writer.experiment.add_figure("layers/profile", figure, step, close=False)
            else:
                writer.log_image("layers/profile", [rgb_pixels(figure)], step=step)

    def _finish_drawing(self) -> Future | None:
        """Wait for the image in progress, so that it is written before the loggers close."""
        if self._drawer is not None:
            self._drawer.shutdown(wait=True)
            self._drawer = None
        drawing, self._drawing = self._drawing, None
        return drawing

    def teardown(self, trainer, pl_module, stage: str) -> None:
        drawing = self._finish_drawing()
        if drawing is not None:
            drawing.result()  # raises what went wrong in drawing

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._remove_hooks()
        self._finish_drawing()  # the training error is the one to report
