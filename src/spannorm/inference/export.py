"""Export a trained model as a Hugging Face folder (`python export.py ckpt_path=<run> out=<dir>`).

The folder holds `model.safetensors`, `config.json`, `generation_config.json`, the tokenizer
(`tokenizer.json`, `tokenizer_config.json`) and the model's code: the package's own model source
files (every `spannorm/model/*.py`, as `spannorm_<name>.py`) and `spannorm/inference/hf_model.py` (as
`modeling_spannorm.py`), their `spannorm.model` imports made relative. So
`AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)` needs torch and transformers,
not this package, and the exported code is always the code that trained the weights.
"""

from __future__ import annotations

import re
from pathlib import Path

import spannorm.inference.hf_model
import spannorm.model
from spannorm.data.tokenizer import EOS_TOKEN, ByteTokenizer, HFTokenizer, Tokenizer
from spannorm.model import TransformerLM

WRAPPER_FILE = "modeling_spannorm.py"
PACKAGE_IMPORT = re.compile(r"^(\s*)from spannorm\.model(?:\.(\w+))? import ", re.MULTILINE)
ANY_PACKAGE_IMPORT = re.compile(r"^\s*(from|import) spannorm\b", re.MULTILINE)


def bundled_name(module: str | None) -> str:
    """The export folder's module for `spannorm.model.<module>` (None: the package itself)."""
    return f"spannorm_{module or 'model'}"


def self_contained(source: str, origin: str) -> str:
    """`source` with `from spannorm.model[.x] import` made `from .spannorm_<x> import`; any other
    import of the package is an error (the export folder could not satisfy it)."""
    rewritten = PACKAGE_IMPORT.sub(
        lambda m: f"{m.group(1)}from .{bundled_name(m.group(2))} import ", source
    )
    leftover = ANY_PACKAGE_IMPORT.search(rewritten)
    if leftover:
        raise RuntimeError(
            f"{origin} imports {leftover.group(0).strip()!r}: the exported model code may import "
            "only spannorm.model.*, torch and transformers"
        )
    return rewritten


def write_model_code(out: Path) -> list[Path]:
    """The model's source files and the transformers wrapper, self-contained, into `out`."""
    sources = {
        f"{bundled_name(None if path.stem == '__init__' else path.stem)}.py": path
        for path in sorted(Path(spannorm.model.__file__).parent.glob("*.py"))
    }
    sources[WRAPPER_FILE] = Path(spannorm.inference.hf_model.__file__)
    written = []
    for name, path in sources.items():
        target = out / name
        target.write_text(self_contained(path.read_text(encoding="utf-8"), str(path)), "utf-8")
        written.append(target)
    return written


def huggingface_tokenizer(tokenizer: Tokenizer, max_length: int):
    """A `PreTrainedTokenizerFast` giving the same ids: the BPE's (or a `tokenizers` file's) own
    `tokenizers` object, or for the byte tokenizer a byte-level vocabulary of the 256 bytes
    (id = byte value) with no merges."""
    from tokenizers import Tokenizer as TokenizersFile
    from tokenizers import decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if isinstance(tokenizer, HFTokenizer):
        backend = TokenizersFile.from_str(tokenizer._tokenizer.to_str())
    elif isinstance(tokenizer, ByteTokenizer):
        vocab = {byte_level_char(b): b for b in range(256)}
        vocab[EOS_TOKEN] = tokenizer.eos_id
        backend = TokenizersFile(models.BPE(vocab=vocab, merges=[]))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens([EOS_TOKEN])
    else:
        raise TypeError(f"no Hugging Face tokenizer for {type(tokenizer).__name__}")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=max_length,
    )


def byte_level_char(byte: int) -> str:
    """GPT-2's printable stand-in for a byte, as the ByteLevel pre-tokenizer writes it."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    if byte in printable:
        return chr(byte)
    return chr(256 + sum(1 for b in range(byte) if b not in printable))


def export_model(model: TransformerLM, tokenizer: Tokenizer, out: str | Path) -> Path:
    """Write `model` and `tokenizer` as a Hugging Face folder `out` (see the module's docstring)."""
    from spannorm.inference.hf_model import SpannormConfig, SpannormForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_model_code(out)
    module = WRAPPER_FILE.removesuffix(".py")
    config = SpannormConfig.of(
        model.cfg,
        eos_token_id=tokenizer.eos_id,
        bos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.eos_id,
        auto_map={
            "AutoConfig": f"{module}.SpannormConfig",
            "AutoModelForCausalLM": f"{module}.SpannormForCausalLM",
        },
    )
    hf_model = SpannormForCausalLM(config)
    hf_model.model.load_state_dict(model.state_dict())
    hf_model.generation_config.use_cache = False
    hf_model.save_pretrained(out)
    huggingface_tokenizer(tokenizer, model.cfg.max_seq_len).save_pretrained(out)
    return out
