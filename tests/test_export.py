"""export.py: every placement (and an MoE model) loads with transformers alone, in a process where
spannorm cannot be imported, and computes our logits; the exported tokenizers give our ids."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from spannorm.cli.export import run_export
from spannorm.data.tokenizer import BPETokenizer, ByteTokenizer
from spannorm.errors import UsageError
from spannorm.inference.export import export_model, self_contained
from spannorm.inference.generate import generate
from spannorm.inference.load import load_trained
from spannorm.model import PLACEMENTS, TransformerLM

from helpers import tiny_model

DRIVER = Path(__file__).with_name("hf_load_driver.py")
SENTENCE = "ROMEO: thou art fair, sweet — ünïcode!\n\nJULIET:  love"
TINY = {"d_model": 32, "n_layers": 3, "n_heads": 2, "max_seq_len": 64, "mixln_ratio": 0.34}


def save_expected(folder: Path, model: TransformerLM, tokenizer, seed: int) -> None:
    """What the driver compares against: our logits on random tokens, our greedy continuation
    and our tokenizer's ids."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 24), generator=generator)
    prompt = tokens[:1, :5]
    with torch.no_grad():
        logits = model(tokens)
    torch.save(
        {
            "tokens": tokens,
            "logits": logits,
            "prompt": prompt,
            "generated": generate(model, prompt, 5, temperature=0),
            "sentence": SENTENCE,
            "ids": tokenizer.encode(SENTENCE),
        },
        folder / "expected.pt",
    )


def random_model(seed: int, **options) -> TransformerLM:
    """A model whose every parameter (norm gains and biases included) is perturbed off its init,
    so a weight loaded into the wrong place changes the logits."""
    model = tiny_model(seed, **{**TINY, **options}).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_corpus, trained_run) -> dict[str, dict]:
    """Export the nine placements (one with a BPE tokenizer), an MoE model and the trained run
    (what export.py runs), then load them all in one transformers-only process."""
    root = tmp_path_factory.mktemp("exported")
    bpe = BPETokenizer.train([tiny_corpus["train"].read_text()], vocab_size=300)
    folders = []
    for seed, norm in enumerate(PLACEMENTS):
        tokenizer = bpe if norm == "spannorm" else ByteTokenizer()
        model = random_model(seed, norm=norm, vocab_size=tokenizer.vocab_size, bias=seed % 2 == 1)
        folders.append(export_model(model, tokenizer, root / norm))
        save_expected(folders[-1], model, tokenizer, seed)
    moe = random_model(
        99, norm="sandwich", ffn="moe", n_experts=4, top_k=2, moe_bias_balance=True, vocab_size=257
    )
    with torch.no_grad():  # a trained balancing bias
        for name, buffer in moe.named_buffers():
            if name.endswith("expert_bias"):
                buffer.copy_(torch.randn(4))
    folders.append(export_model(moe, ByteTokenizer(), root / "moe"))
    save_expected(folders[-1], moe, ByteTokenizer(), 99)
    run_export(OmegaConf.create({"ckpt_path": str(trained_run), "out": str(root / "trained")}))
    trained = load_trained(trained_run)
    folders.append(root / "trained")
    save_expected(folders[-1], trained.model, trained.tokenizer, 7)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_MODULES_CACHE": str(root / "hf_modules")}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, str(DRIVER), *map(str, folders)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    reports = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return {Path(report["folder"]).name: report for report in reports}


@pytest.mark.parametrize("name", [*PLACEMENTS, "moe", "trained"])
def test_exported_model_loads_without_spannorm_and_matches_our_logits(exported, name):
    report = exported[name]
    assert report["model_class"] == "SpannormForCausalLM"
    assert not report["spannorm_loaded"]
    assert report["max_abs_diff"] <= 1e-5
    assert report["generate_matches"]
    assert report["tokenizer_matches"] and report["decode_matches"]


def test_the_export_folder_holds_weights_config_tokenizer_and_code(exported, tmp_path_factory):
    folder = Path(exported["trained"]["folder"])
    expected = {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"}
    assert expected <= {path.name for path in folder.iterdir()}
    code = [path for path in folder.glob("*.py")]
    assert {"modeling_spannorm.py", "spannorm_transformer.py"} <= {p.name for p in code}
    assert not any(
        "import spannorm" in p.read_text() or "from spannorm" in p.read_text() for p in code
    )


def test_model_code_importing_more_of_the_package_is_refused():
    with pytest.raises(RuntimeError, match="may import only spannorm.model"):
        self_contained("from spannorm.data import tokenizer\n", "layers.py")
    assert self_contained("from spannorm.model.norms import make_norm\n", "x") == (
        "from .spannorm_norms import make_norm\n"
    )


def test_a_non_empty_output_folder_is_refused_before_anything_is_written(trained_run, tmp_path):
    (tmp_path / "keep.txt").write_text("user data")
    cfg = OmegaConf.create(
        {"ckpt_path": str(trained_run), "out": str(tmp_path), "overwrite": False}
    )
    with pytest.raises(UsageError, match="is not empty"):
        run_export(cfg)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_a_sharded_checkpoint_folder_exports_like_the_plain_checkpoint(trained_run, tmp_path):
    """A folder in the layout ModelParallelStrategy writes (torch.distributed.checkpoint shards of
    the state dict + meta.pt with the rest) is consolidated and exports the same weights."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file

    checkpoint = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=False)
    run = tmp_path / "run"
    shutil.copytree(trained_run / ".hydra", run / ".hydra")
    sharded = run / "checkpoints" / "last.ckpt"
    dcp.save({"state_dict": checkpoint.pop("state_dict")}, checkpoint_id=sharded)
    torch.save(checkpoint, sharded / "meta.pt")
    for source, out in ((trained_run, "plain"), (sharded, "sharded")):
        run_export(OmegaConf.create({"ckpt_path": str(source), "out": str(tmp_path / out)}))
    plain, from_shards = (
        load_file(tmp_path / out / "model.safetensors") for out in ("plain", "sharded")
    )
    assert plain.keys() == from_shards.keys()
    assert all(torch.equal(plain[key], from_shards[key]) for key in plain)
