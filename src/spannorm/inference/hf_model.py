"""The Hugging Face face of a TransformerLM: a `PretrainedConfig` holding the TransformerConfig and
a `PreTrainedModel` + `GenerationMixin` around the model itself.

export.py copies this file, as `modeling_spannorm.py`, into the export folder beside the model's
own source files (src/spannorm/model/*.py) with every `spannorm.model` import made relative, so
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` needs only torch and
transformers. Keep its imports to `spannorm.model.*`, torch and transformers.

Generation recomputes the whole context at each step (the model's own KV cache is not wired to
transformers' cache classes) and a batch must not be padded: the model has no padding mask.
"""

from __future__ import annotations

from dataclasses import asdict

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from spannorm.model.config import TransformerConfig
from spannorm.model.transformer import TransformerLM


class SpannormConfig(PretrainedConfig):
    """`spannorm`: the TransformerConfig's fields; the usual names (hidden_size, ...) mirror them."""

    model_type = "spannorm"

    def __init__(self, spannorm: dict | None = None, **kwargs) -> None:
        self.spannorm = dict(spannorm or {})
        cfg = TransformerConfig(**self.spannorm)
        self.vocab_size = cfg.vocab_size
        self.hidden_size = cfg.d_model
        self.num_hidden_layers = cfg.n_layers
        self.num_attention_heads = cfg.n_heads
        self.max_position_embeddings = cfg.max_seq_len
        # transformers honours the model's shared weights (`_tied_weights_keys`) only when this is
        # set; which weights are shared is the model's own business (see SpannormForCausalLM)
        kwargs["tie_word_embeddings"] = True
        super().__init__(**kwargs)

    @classmethod
    def of(cls, cfg: TransformerConfig, **kwargs) -> SpannormConfig:
        return cls(spannorm=asdict(cfg), **kwargs)


def shared_weights(module: torch.nn.Module) -> dict[str, str]:
    """{alias: first name} for every parameter reachable under several names (the LM head tied to
    the embedding, a norm registered in two places), as transformers' `_tied_weights_keys`."""
    first: dict[int, str] = {}
    aliases = {}
    for name, parameter in module.named_parameters(remove_duplicate=False):
        if id(parameter) in first:
            aliases[name] = first[id(parameter)]
        else:
            first[id(parameter)] = name
    return aliases


class SpannormForCausalLM(PreTrainedModel, GenerationMixin):
    """`model` is the TransformerLM (its state-dict keys are the package's, under `model.`); the
    weights it shares between modules are declared to transformers as tied, found at build time."""

    config_class = SpannormConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _supports_cache_class = False

    def __init__(self, config: SpannormConfig) -> None:
        super().__init__(config)
        self.model = TransformerLM(TransformerConfig(**config.spannorm))
        self._tied_weights_keys = shared_weights(self)
        self._rope_ready = False  # see forward
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Nothing: TransformerLM initializes itself by its own scheme."""

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.tok_emb

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.model.head

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutput:
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("padded batches are not supported: the model has no padding mask")
        if not self._rope_ready:  # from_pretrained builds on meta: the derived rotary tables are
            for module in self.model.modules():  # recomputed once the weights are in place
                if hasattr(module, "reset_rope"):
                    module.reset_rope()
            self._rope_ready = True
        logits = self.model(input_ids)
        loss = None
        if labels is not None:  # labels are the inputs; the model shifts them, as in transformers
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        return CausalLMOutput(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, **kwargs) -> dict:
        return {"input_ids": input_ids, "attention_mask": kwargs.get("attention_mask")}
