"""Training speed, model FLOPs utilization and peak memory, under `throughput/`.

Model FLOPs per token at sequence length T (PaLM, Chowdhery et al. 2022, appendix B):
    F(T) = 6 N + 12 L d T
N = the matrix weights each token is multiplied by (the LM head, tied or not, counts; the
embedding lookup, norms and biases do not; MoE expert matrices count at the share top_k /
n_experts a token uses); 6 N = forward (2N) + backward (4N) of the matmuls; 12 L d T = the scores
q k^T and the weighted sum p v over all T keys (the causal half is not subtracted), forward and
backward. MFU = tokens/s * F(T) / peak, with peak from `peak_flops`, else PEAK_BF16_FLOPS for a
known GPU, else a matmul probe at train start (CPU: what this machine actually reaches).

Rates are averaged over windows of `every_n_steps` optimizer steps, opened after `warmup_steps`
steps; validation time inside a window is subtracted. CUDA is synchronized only at window edges.
(Lightning's own ThroughputMonitor synchronizes every batch and needs a full window first.)
Under data parallelism the tokens are those of every process (summed at window edges, so every
micro batch of the global batch counts); tflops and mfu are per device (the total over the
`world_size` processes divided by it), peak memory the highest of any process.
"""

from __future__ import annotations

import time

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from spannorm.callbacks import log_scalars, sum_over_processes
from spannorm.memory import peak_rss_mib
from spannorm.model.moe import MoE

# dense bf16 tensor-core peak per GPU, FLOP/s (NVIDIA datasheets; H100/H200: SXM)
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def matmul_params(model: torch.nn.Module) -> float:
    """N of the module docstring: the weights of every nn.Linear (LM head included), plus per MoE
    layer its router and top_k / n_experts of its expert matrices."""
    n = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        experts = moe.w_in.numel() + moe.w_out.numel()
        n += moe.router_weight.numel() + experts * moe.top_k / moe.n_experts
    return n


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """F(T) = 6 N + 12 L d T (module docstring)."""
    return 6 * matmul_params(model) + 12 * model.cfg.n_layers * model.cfg.d_model * seq_len


def synchronized_clock(device: torch.device) -> float:
    """time.perf_counter() after the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def measure_matmul_flops(device: torch.device, size: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of the fastest of `repeats` float32 [size x size] @ [size x size] (2 size^3 FLOPs)."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    a @ b  # first call: allocation and kernel selection
    fastest = float("inf")
    for _ in range(repeats):
        start = synchronized_clock(device)
        a @ b
        fastest = min(fastest, synchronized_clock(device) - start)
    return 2 * size**3 / fastest


def peak_flops(device: torch.device, configured: float | None) -> tuple[float, str]:
    """The MFU denominator and where it came from: configured, the GPU table, or a probe."""
    if configured is not None:
        return float(configured), "configured"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).upper()
        for chip, flops in PEAK_BF16_FLOPS.items():
            if chip in name:
                return flops, f"{chip} bf16 table"
    return measure_matmul_flops(device), "matmul probe"


def peak_memory_mib(device: torch.device) -> float:
    """Peak allocated CUDA memory on GPU, else the process's peak resident set size, in MiB (read
    as spannorm.memory says why)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mib()


class ThroughputMonitor(L.Callback):
    """Every `every_n_steps` optimizer steps: throughput/tokens_per_sec (all processes),
    tokens_per_sec_per_device, step_time_ms, tflops (achieved model TFLOP/s per device), mfu,
    peak_tflops (the MFU denominator, per device) and peak_memory_mib (the highest process).
    At every start (a resumed run too): throughput/torch_threads, torch's intra-op thread count
    (on CPU it sets the speed, and float rounding: the same seed on 1 and on 2 threads differs
    by 1e-6 in the loss after 20 steps, which the unigram plateau can amplify)."""

    def __init__(
        self, every_n_steps: int = 10, warmup_steps: int = 2, peak_flops: float | None = None
    ):
        if every_n_steps < 1 or warmup_steps < 1:
            raise ValueError(
                f"callbacks.throughput: every_n_steps={every_n_steps} and "
                f"warmup_steps={warmup_steps} must be at least 1"
            )
        self.every_n_steps = every_n_steps
        self.warmup_steps = warmup_steps
        self.configured_peak = peak_flops
        self.peak = float("nan")
        self._first_step = 0
        self._window_step: int | None = None  # optimizer step that opened the window
        self._window_time = 0.0
        self._tokens = 0
        self._validation_start = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self.peak, source = peak_flops(pl_module.device, self.configured_peak)
        rank_zero_info(f"MFU peak: {self.peak / 1e12:.3g} TFLOP/s ({source})")
        threads = float(torch.get_num_threads())
        log_scalars(trainer, {"throughput/torch_threads": threads}, trainer.global_step)
        self._first_step = trainer.global_step
        self._window_step = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        self._tokens += batch[0].numel()
        if self._window_step is None:
            if step - self._first_step >= self.warmup_steps:
                self._open_window(step, pl_module.device)
            return
        if step % self.every_n_steps or step == self._window_step:
            return
        elapsed = synchronized_clock(pl_module.device) - self._window_time
        tokens = float(sum_over_processes(trainer, torch.tensor(float(self._tokens))))
        memory = torch.tensor(peak_memory_mib(pl_module.device))
        memory = float(trainer.strategy.reduce(memory.to(pl_module.device), reduce_op="max"))
        tokens_per_sec = tokens / elapsed
        devices = trainer.world_size
        flops_per_sec = tokens_per_sec * flops_per_token(pl_module.model, batch[0].shape[1])
        metrics = {
            "throughput/tokens_per_sec": tokens_per_sec,
            "throughput/tokens_per_sec_per_device": tokens_per_sec / devices,
            "throughput/step_time_ms": 1e3 * elapsed / (step - self._window_step),
            "throughput/tflops": flops_per_sec / devices / 1e12,
            "throughput/mfu": flops_per_sec / devices / self.peak,
            "throughput/peak_tflops": self.peak / 1e12,
            "throughput/peak_memory_mib": memory,
        }
        log_scalars(trainer, metrics, step - 1)  # the last batch's step, as `train/loss` uses
        self._open_window(step, pl_module.device)

    def _open_window(self, step: int, device: torch.device) -> None:
        self._window_step = step
        self._window_time = synchronized_clock(device)
        self._tokens = 0

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._validation_start = synchronized_clock(pl_module.device)

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:  # leave validation out of the training window
            self._window_time += synchronized_clock(pl_module.device) - self._validation_start
