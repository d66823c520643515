"""The monitoring callbacks: values against direct computations, a CLI run logging every
namespace, MoE statistics, the divergence guard on an injected NaN, spike counting."""

from __future__ import annotations

import copy
import json
import math
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.throughput import measure_flops
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.utils import get_total_norm

from spannorm.analysis.scalars import read_scalars
from spannorm.callbacks.divergence import DivergenceGuard
from spannorm.callbacks.layer_stats import LayerStatsMonitor, effective_rank
from spannorm.callbacks.throughput import flops_per_token
from spannorm.cli import friendly_errors
from spannorm.cli.train import train
from spannorm.model import TransformerConfig, TransformerLM
from spannorm.training.lm import LanguageModel

from helpers import compose_config, optim_options, run_entry, tiny_model, tiny_overrides


class RecordingLogger:
    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.metrics.update(metrics)


def one_process_trainer(**fields) -> SimpleNamespace:
    """What the monitors read of a single-process Trainer (reductions over processes: as is)."""
    strategy = SimpleNamespace(
        reduce=lambda value, reduce_op: value,
        reduce_boolean_decision=lambda decision, all: decision,
        root_device=torch.device("cpu"),
    )
    defaults = {"global_rank": 0, "world_size": 1, "is_global_zero": True, "strategy": strategy}
    return SimpleNamespace(**{**defaults, **fields})


class PoisonLogits(L.Callback):
    """Test-only: makes the logits NaN at optimizer step `step` (the weights stay finite)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            pl_module.model.register_forward_hook(lambda module, args, out: out * math.nan)


@pytest.fixture
def one_thread():
    """In-process training on one thread, as the subprocess runs use (a shared CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_layer_stats_equal_a_direct_computation():
    model = tiny_model(vocab_size=32, d_model=16, n_layers=3, n_heads=2, max_seq_len=1024)
    with torch.no_grad():  # q = k = 0 in block 1: uniform causal attention, entropy log(i + 1)
        model.blocks[1].attn.qkv.weight[: 2 * 16] = 0
    reference = copy.deepcopy(model)  # the weights the monitored step starts from
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idx = torch.randint(0, 32, (2, 8))
    logger = RecordingLogger()
    trainer = one_process_trainer(global_step=0, loggers=[logger])
    module = SimpleNamespace(model=model, device=torch.device("cpu"))
    monitor = LayerStatsMonitor(every_n_steps=5, entropy_sequences=2)

    monitor.on_train_batch_start(trainer, module, None, 0)
    F.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
    monitor.on_before_optimizer_step(trainer, module, optimizer)
    optimizer.step()
    monitor.on_train_batch_end(trainer, module, None, None, 0)
    assert not any(block._forward_hooks for block in model.blocks)  # removed after the step

    x = reference.tok_emb(idx) * reference.embed_scale
    streams = []
    for block in reference.blocks:
        out = block(x)
        out.retain_grad()
        streams.append((x, out))
        x = out
    F.cross_entropy(reference.head(reference.final_norm(x)).flatten(0, 1), idx.flatten()).backward()
    for index, (x_in, out) in enumerate(streams):
        before = list(reference.blocks[index].parameters())
        after = list(model.blocks[index].parameters())
        expected = {
            "rms": out.pow(2).mean().sqrt(),
            "cos": F.cosine_similarity(x_in, out, dim=-1).mean(),
            "stream_grad_norm": out.grad.norm(),
            "param_grad_norm": get_total_norm([p.grad for p in before]),
            "update_ratio": get_total_norm([a - b for a, b in zip(after, before, strict=True)])
            / get_total_norm(before),
        }
        singular = [np.linalg.svd(seq.detach().numpy(), compute_uv=False) for seq in out]
        p = [s / s.sum() for s in singular]
        expected["erank"] = torch.tensor(np.mean([np.exp(-(q * np.log(q)).sum()) for q in p]))
        for metric, value in expected.items():
            logged = logger.metrics[f"layers/{metric}/block_{index:02d}"]
            assert logged == pytest.approx(value.item(), rel=1e-4), metric
    uniform = sum(math.log(i + 1) for i in range(8)) / 8
    assert logger.metrics["layers/attn_entropy/block_01"] == pytest.approx(uniform, rel=1e-5)
    assert logger.metrics["layers/attn_entropy/block_00"] < uniform


def test_effective_rank_counts_the_directions_the_tokens_span():
    torch.manual_seed(0)
    line = torch.randn(8, 1) * torch.randn(1, 6)  # every token a multiple of one vector
    square = torch.linalg.qr(torch.randn(6, 6)).Q  # six orthonormal tokens
    two = torch.zeros(8, 6)
    two[:4, 0], two[4:, 1] = 1.0, 1.0  # two equally strong directions
    ranks = [effective_rank(x).item() for x in (line, square, two)]
    assert ranks == pytest.approx([1.0, 6.0, 2.0], rel=1e-4)
    stacked = effective_rank(torch.stack([square, square]))  # one value per matrix
    assert stacked.tolist() == pytest.approx([6.0, 6.0], rel=1e-4)


@pytest.mark.parametrize("ffn", ["dense", "moe"])
def test_flops_per_token_matches_torch_flop_counter(ffn):
    cfg = TransformerConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, ffn=ffn, n_experts=4)
    model = TransformerLM(cfg)
    idx = torch.randint(0, 64, (2, 16))
    with sdpa_kernel(SDPBackend.MATH):  # the fused CPU kernel is not seen by the counter
        counted = measure_flops(model, lambda: model(idx), lambda logits: logits.sum())
    assert flops_per_token(model, seq_len=16) * idx.numel() == counted


def test_spikes_are_counted_against_the_moving_median():
    guard = DivergenceGuard(spike_factor=1.5, spike_window=4)
    logger = RecordingLogger()
    trainer = one_process_trainer(global_step=0, log_every_n_steps=1, loggers=[logger])
    for loss in [3.0, 3.1, 2.9, 3.0, 4.4, 4.6, 3.0, 9.0]:
        guard.on_before_backward(trainer, None, torch.tensor(loss))
        guard.on_before_optimizer_step(trainer, None, None)
        trainer.global_step += 1
    assert logger.metrics["train/loss_spikes"] == 2  # 4.6 > 1.5 * 3.05, 9.0 > 1.5 * 3.7, not 4.4


@pytest.fixture(scope="module")
def monitored_run(tiny_corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("monitored")
    overrides = tiny_overrides(tiny_corpus, "trainer.max_steps=20", "trainer.val_check_interval=10")
    run_entry(
        "train.py",
        *overrides,
        "callbacks.layer_stats.every_n_steps=5",
        f"hydra.run.dir={run_dir}",
    )
    return run_dir


@pytest.mark.slow
def test_cli_run_logs_every_namespace_an_image_and_hparams(monitored_run):
    scalars = read_scalars(monitored_run)
    for namespace in ("train/", "val/", "throughput/", "layers/"):
        assert any(tag.startswith(namespace) for tag in scalars), (namespace, sorted(scalars))
    for metric in (
        "rms",
        "stream_grad_norm",
        "param_grad_norm",
        "update_ratio",
        "cos",
        "attn_entropy",
        "erank",
    ):
        assert [step for step, _ in scalars[f"layers/{metric}/block_01"]] == [0, 5, 10, 15]
    for metric in ("tokens_per_sec", "step_time_ms", "tflops", "mfu", "peak_memory_mib"):
        assert scalars[f"throughput/{metric}"] and all(
            v > 0 for _, v in scalars[f"throughput/{metric}"]
        )
    assert scalars["throughput/torch_threads"] == [(0, 1.0)]  # run_entry sets OMP_NUM_THREADS=1
    assert scalars["train/loss_spikes"] and "train/diverged" not in scalars
    assert scalars["hp/final_val_loss"][-1][1] == pytest.approx(scalars["val/loss"][-1][1])
    events = EventAccumulator(str(monitored_run / "tb")).Reload()
    assert events.Tags()["images"] == ["layers/profile"]
    start = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    for key in ("model.norm", "model.qk_norm", "model.embed_norm", "model.alpha", "optim.lr"):
        assert key.encode() in start, key  # the HPARAMS tab's columns, in the plugin's protobuf


@pytest.mark.slow
def test_sweep_summary_keeps_what_the_grid_report_reads(monitored_run, tmp_path):
    out = tmp_path / "summary.json"
    run_entry(
        "scripts/sweep_summary.py", str(monitored_run), "--baseline", "9.0", "--out", str(out)
    )
    summary = json.loads(out.read_text())
    scalars = read_scalars(monitored_run)
    assert summary["complete"] and summary["last_step"] == 19
    assert summary["final_val_loss"] == pytest.approx(scalars["val/loss"][-1][1])
    assert summary["settings"]["trainer.max_steps"] == 20
    assert summary["torch_threads"] == [[0, 1.0]]
    assert [step for step, _ in summary["stream_grad_norm_history"]] == [0, 5, 10, 15]


def test_moe_run_logs_expert_load_and_router_entropy(tiny_corpus, tmp_path, one_thread):
    cfg = compose_config(
        [
            *tiny_overrides(tiny_corpus),
            "model.ffn=moe",
            "model.n_experts=4",
            "trainer.max_steps=6",
            "trainer.val_check_interval=6",
            "callbacks.experts.every_n_steps=5",
            "callbacks.progress=null",
            f"run_dir={tmp_path}",
        ]
    )
    train(cfg)
    scalars = read_scalars(tmp_path)
    for tag in ("moe/load_max/block_01", "moe/load_min/block_00", "moe/router_entropy/block_01"):
        assert [step for step, _ in scalars[tag]] == [0, 5]
    assert all(0.25 <= v <= 1 for _, v in scalars["moe/load_max/block_00"])
    assert all(0 < v <= math.log(4) for _, v in scalars["moe/router_entropy/block_00"])
    assert scalars["moe/load_imbalance"][0][1] >= 1


def test_nan_loss_stops_with_one_line_error_and_a_loadable_last_good_checkpoint(
    tiny_corpus, tmp_path, one_thread, capsys
):
    cfg = compose_config(
        [
            *tiny_overrides(tiny_corpus),
            "+callbacks.poison._target_=test_monitoring.PoisonLogits",
            "+callbacks.poison.step=7",
            "callbacks.progress=null",
            f"run_dir={tmp_path}",
        ]
    )
    with pytest.raises(SystemExit) as stopped:
        friendly_errors(train)(cfg)
    assert stopped.value.code == 3
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "loss is nan at step 7" in errors[0], errors
    checkpoint = tmp_path / "checkpoints" / "last-good-step000007.ckpt"
    assert str(checkpoint) in errors[0]
    saved = torch.load(checkpoint, weights_only=False)
    assert saved["global_step"] == 7 and saved["callbacks"]["DivergenceGuard"]["spikes"] == 0
    weights = LanguageModel.load_from_checkpoint(checkpoint, map_location="cpu").state_dict()
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert read_scalars(tmp_path)["train/diverged"] == [(7, 1.0)]


class StepLogger(L.pytorch.loggers.Logger):
    """Test-only: the metrics Lightning writes, by step."""

    def __init__(self) -> None:
        super().__init__()
        self.written: dict[int, dict[str, float]] = {}

    name, version = "steps", 0

    @property
    def experiment(self):
        return None

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.written.setdefault(step, {}).update(metrics)


@pytest.mark.parametrize("every", [1, 3])
def test_lr_and_grad_norm_are_written_at_every_logging_step(every):
    """train/lr and train/grad_norm are only logged at the steps the logger writes (to spare
    Lightning's per-call cost) and at the last step: each such step must carry both, with that
    step's values."""
    tokens = torch.randint(0, 60, (7, 2, 9), generator=torch.Generator().manual_seed(0))
    data = [(t[:, :-1], t[:, 1:]) for t in tokens]
    lm = LanguageModel(
        optim=optim_options(warmup_steps=4),
        vocab_size=60,
        d_model=16,
        n_layers=1,
        n_heads=2,
        max_seq_len=8,
    )
    logger, lrs = StepLogger(), []
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=7,
        log_every_n_steps=every,
        logger=logger,
        gradient_clip_val=1.0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[
            L.pytorch.callbacks.LambdaCallback(
                on_train_batch_start=lambda tr, *_: lrs.append(
                    tr.optimizers[0].param_groups[0]["lr"]
                )
            )
        ],
    )
    trainer.fit(lm, torch.utils.data.DataLoader(data, batch_size=None))
    # every `every` steps, and at the last step (a run's final train/lr and grad_norm)
    expected = [step for step in range(7) if (step + 1) % every == 0 or step == 6]
    assert sorted(logger.written) == expected
    for step in expected:
        assert logger.written[step]["train/lr"] == pytest.approx(lrs[step], rel=1e-6)
        assert logger.written[step]["train/grad_norm"] > 0


def test_on_cpu_the_layer_profile_is_drawn_in_the_training_thread(tmp_path, monkeypatch):
    """No drawing thread competes with the step's OpenMP workers for the cores and the GIL
    (docs/performance.md): every image is drawn by the training thread, and each is written."""
    import threading

    from lightning.pytorch.loggers import TensorBoardLogger

    drawn_by_main, draw = [], LayerStatsMonitor._draw

    def recorded_draw(monitor, *args) -> None:
        drawn_by_main.append(threading.current_thread() is threading.main_thread())
        draw(monitor, *args)

    monkeypatch.setattr(LayerStatsMonitor, "_draw", recorded_draw)
    threads: set[str] = set()
    tokens = torch.randint(0, 60, (6, 2, 9), generator=torch.Generator().manual_seed(0))
    lm = LanguageModel(
        optim=optim_options(), vocab_size=60, d_model=16, n_layers=2, n_heads=2, max_seq_len=8
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=6,
        limit_val_batches=0,
        log_every_n_steps=2,
        logger=TensorBoardLogger(tmp_path, name="tb", version=""),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[
            LayerStatsMonitor(every_n_steps=2),
            L.pytorch.callbacks.LambdaCallback(
                on_train_batch_end=lambda *_: threads.update(
                    thread.name for thread in threading.enumerate()
                )
            ),
        ],
    )
    loader = torch.utils.data.DataLoader([(t[:, :-1], t[:, 1:]) for t in tokens], None)
    trainer.fit(lm, loader, loader)
    assert drawn_by_main == [True, True, True]  # steps 0, 2, 4
    assert not any(name.startswith("layer-profile") for name in threads), threads
    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    assert [image.step for image in events.Images("layers/profile")] == [0, 2, 4]
