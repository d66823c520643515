"""Load exported models with transformers alone (spannorm made unimportable) and check them
against what the test saved beside each export: `python hf_load_driver.py <export dir>...`.

Each `<export dir>/expected.pt` holds `tokens` [B, T], our `logits`, our greedy continuation
`generated` of `prompt` and, optionally, `sentence` and its `ids`. Prints one JSON line per
folder: max |logit difference|, whether greedy generation and the tokenizer's ids agree, and
whether `spannorm` was importable (it must not be).
"""

import importlib.abc
import json
import sys

import torch


class BlockSpannorm(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "spannorm" or name.startswith("spannorm."):
            raise ImportError(f"{name} is blocked: the export must load without spannorm")
        return None


sys.meta_path.insert(0, BlockSpannorm())

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402


def check(folder: str) -> dict:
    expected = torch.load(f"{folder}/expected.pt")
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        logits = model(expected["tokens"]).logits
    prompt = expected["prompt"]
    generated = model.generate(
        prompt, max_new_tokens=expected["generated"].shape[1] - prompt.shape[1], do_sample=False
    )
    result = {
        "folder": folder,
        "max_abs_diff": (logits - expected["logits"]).abs().max().item(),
        "generate_matches": torch.equal(generated, expected["generated"]),
        "spannorm_loaded": any(name.split(".")[0] == "spannorm" for name in sys.modules),
        "model_class": type(model).__name__,
    }
    if "sentence" in expected:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        ids = tokenizer(expected["sentence"])["input_ids"]
        result["tokenizer_matches"] = ids == expected["ids"]
        result["decode_matches"] = tokenizer.decode(ids) == expected["sentence"]
    return result


if __name__ == "__main__":
    for folder in sys.argv[1:]:
        print(json.dumps(check(folder)), flush=True)
