"""Downstream evaluation with lm-evaluation-harness (`python eval.py ckpt_path=<run> tasks=[...]`).

`SpannormLM` is an `lm_eval` model over a `TransformerLM` and its run's tokenizer:
- loglikelihood: log p(continuation | context), summed over the continuation's tokens, and
  whether greedy decoding would have produced it; requests are batched, right-padded;
- loglikelihood_rolling: the whole text's log-likelihood in disjoint windows of `max_seq_len`
  tokens (the harness's perplexity tasks), the first token predicted from EOS;
- generate_until: greedy (or sampled with `do_sample`) decoding with the KV cache of
  `spannorm.inference.generate`, stopped at the first `until` string; prompts of equal length are batched.
Contexts longer than the model's window keep their last tokens (the harness's own convention).
The class is registered as `spannorm`, so `lm_eval --model spannorm --model_args ckpt_path=<run>`
works too. eval.py's `tasks=[...]` runs it (`spannorm.cli.evaluate`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from spannorm.data.tokenizer import Tokenizer
from spannorm.inference.generate import generate
from spannorm.inference.load import load_trained
from spannorm.model import TransformerLM


@register_model("spannorm")
class SpannormLM(TemplateLM):
    """An lm-evaluation-harness model: `model` and `tokenizer`, or `ckpt_path` (a run directory
    or checkpoint, whose run gives the tokenizer)."""

    def __init__(
        self,
        model: TransformerLM | None = None,
        tokenizer: Tokenizer | None = None,
        ckpt_path: str | None = None,
        batch_size: int | str = 16,
        device: str = "cpu",
        max_gen_toks: int = 256,
        seed: int = 1234,
    ) -> None:
        super().__init__()
        if ckpt_path is not None:
            trained = load_trained(ckpt_path)
            model, tokenizer = trained.model, trained.tokenizer
        if model is None or tokenizer is None:
            raise ValueError("SpannormLM needs ckpt_path=..., or both a model and a tokenizer")
        self._device = torch.device(device)
        self.model = model.to(self._device).eval()
        self.tok = tokenizer
        self.batch_size = int(batch_size)
        self.max_length = model.cfg.max_seq_len
        self.max_gen_toks = int(max_gen_toks)
        self.generator = torch.Generator(self._device).manual_seed(seed)

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs
    ) -> list[int]:
        return self.tok.encode(string)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tok.decode(tokens)

    @torch.no_grad()
    def _log_probs(self, windows: list[list[int]]) -> list[torch.Tensor]:
        """log-softmax of the model's next-token logits for each window (right-padded batch),
        [len(window), vocab] each, in float32."""
        width = max(len(w) for w in windows)
        batch = torch.full((len(windows), width), self.eot_token_id, dtype=torch.long)
        for row, window in enumerate(windows):
            batch[row, : len(window)] = torch.tensor(window, dtype=torch.long)
        logits = self.model(batch.to(self._device)).float()
        log_probs = F.log_softmax(logits, dim=-1).cpu()
        return [log_probs[row, : len(window)] for row, window in enumerate(windows)]

    def _score(self, context: list[int], continuation: list[int]) -> list[int]:
        """The model input for scoring `continuation` after `context`: their concatenation without
        its last token, cut to the window from the left."""
        return (context + continuation)[-(self.max_length + 1) :][:-1]

    def _loglikelihood_tokens(
        self, requests, disable_tqdm: bool = False, **kwargs
    ) -> list[tuple[float, bool]]:
        def longest_first(request):
            tokens = request[1] + request[2]
            return -len(tokens), tuple(tokens)

        collator = Collator(requests, sort_fn=longest_first)
        results = []
        for chunk in collator.get_batched(n=self.batch_size):
            windows = [self._score(context, continuation) for _, context, continuation in chunk]
            for (key, _, continuation), window, log_probs in zip(
                chunk, windows, self._log_probs(windows), strict=True
            ):
                predicted = log_probs[len(window) - len(continuation) :]
                target = torch.tensor(continuation, dtype=torch.long)
                logprob = predicted.gather(1, target[:, None]).sum().item()
                greedy = bool((predicted.argmax(dim=-1) == target).all())
                results.append((logprob, greedy))
                self.cache_hook.add_partial("loglikelihood", key, (logprob, greedy))
        return collator.get_original(results)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        pieces: list[tuple[int, list[int], list[int]]] = []  # (request, context, continuation)
        for index, request in enumerate(requests):
            (text,) = request.args
            windows = get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            pieces += [(index, *make_disjoint_window(window)) for window in windows]
        scores = self._loglikelihood_tokens(
            [((None, None), context, continuation) for _, context, continuation in pieces]
        )
        totals = [0.0] * len(requests)
        for (index, _, _), (logprob, _) in zip(pieces, scores, strict=True):
            totals[index] += logprob
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        collator = Collator(
            [request.args for request in requests],  # (context, generation settings)
            sort_fn=lambda args: (-len(self.tok_encode(args[0])), args[0]),
            group_fn=lambda args: args[1],
            group_by="gen_kwargs",
        )
        results = []
        for chunk in collator.get_batched(n=self.batch_size):
            results += self._generate_chunk(chunk)
        return collator.get_original(results)

    def _generate_chunk(self, chunk: list[tuple[str, dict[str, Any]]]) -> list[str]:
        """Continue prompts that share one set of generation settings (`until`, `max_gen_toks`,
        `do_sample`, `temperature`, `top_k`); prompts of equal token length run as one batch."""
        settings = chunk[0][1]
        until = settings.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = min(int(settings.get("max_gen_toks", self.max_gen_toks)), self.max_length - 1)
        sample = bool(settings.get("do_sample", False))
        temperature = float(settings.get("temperature", 1.0)) if sample else 0.0
        top_k = settings.get("top_k")
        prompts = [self.tok_encode(context)[-(self.max_length - max_new) :] for context, _ in chunk]
        outputs: list[str | None] = [None] * len(chunk)
        by_length: dict[int, list[int]] = {}
        for index, prompt in enumerate(prompts):
            by_length.setdefault(len(prompt), []).append(index)
        for indices in by_length.values():
            idx = torch.tensor([prompts[i] for i in indices], dtype=torch.long, device=self._device)
            if idx.shape[1] == 0:  # an empty prompt starts from EOS
                idx = torch.full((len(indices), 1), self.eot_token_id, device=self._device)
            start = idx.shape[1]
            tokens = generate(
                self.model,
                idx,
                max_new,
                temperature=temperature,
                top_k=top_k,
                kv_cache=True,
                generator=self.generator,
                stop=lambda new, start=start: all(
                    self._stopped(row[start:].tolist(), until) for row in new
                ),
            )
            for row, i in enumerate(indices):
                outputs[i] = self._cut(tokens[row, start:].tolist(), until)
        return outputs

    def _stopped(self, new_tokens: list[int], until: list[str]) -> bool:
        if self.eot_token_id in new_tokens:
            return True
        text = self.tok_decode(new_tokens)
        return any(stop in text for stop in until)

    def _cut(self, new_tokens: list[int], until: list[str]) -> str:
        """The generated text up to EOS and before the first `until` string."""
        if self.eot_token_id in new_tokens:
            new_tokens = new_tokens[: new_tokens.index(self.eot_token_id)]
        text = self.tok_decode(new_tokens)
        for stop in until:
            if stop:
                text = text.split(stop)[0]
        return text


def scalars_of(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """`eval/<task>/<metric>` for each numeric metric of the harness's results (not stderrs);
    a filter other than `none` is kept as `<metric>_<filter>`."""
    scalars = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, _, filter_name = key.partition(",")
            name = metric if filter_name == "none" else f"{metric}_{filter_name}"
            scalars[f"eval/{task}/{name}"] = float(value)
    return scalars


def check_tasks(tasks: list[str], task_manager) -> None:
    """Fail in one line on task names the harness does not know (nor `include_path` adds)."""
    unknown = [task for task in tasks if not task_manager.match_tasks([task])]
    if unknown:
        raise ValueError(
            f"tasks={unknown} are not lm-eval tasks or groups; check the names "
            "(`lm_eval ls tasks`) or pass include_path=<folder of your task YAMLs>"
        )


def task_manager_for(tasks: list[str], include_path: str | None):
    """The harness's task index: only `include_path` when it holds every task asked for (indexing
    the harness's thousands of built-in tasks takes longer than a small local evaluation), else
    the built-in tasks too; fails in one line on names neither knows."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(local.match_tasks([task]) for task in tasks):
            return local
    task_manager = TaskManager(include_path=include_path)
    check_tasks(tasks, task_manager)
    return task_manager


def evaluate_with_harness(lm: SpannormLM, tasks: list[str], task_manager, cfg) -> dict:
    """The harness's `simple_evaluate` with eval.py's options."""
    import lm_eval

    return lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        num_fewshot=cfg.num_fewshot,
        limit=cfg.limit,
        task_manager=task_manager,
        log_samples=False,
        random_seed=cfg.seed,
        numpy_random_seed=cfg.seed,
        torch_random_seed=cfg.seed,
        fewshot_random_seed=cfg.seed,
        bootstrap_iters=cfg.bootstrap_iters,
    )
