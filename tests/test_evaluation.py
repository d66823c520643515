"""eval.py tasks=[...]: lm-evaluation-harness through SpannormLM on local task files, checked
against log-probabilities computed here from the model itself."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from torch.nn.functional import log_softmax

from spannorm.analysis.compare import compare
from spannorm.analysis.local_tasks import write_local_tasks
from spannorm.analysis.scalars import read_scalars
from spannorm.cli.evaluate import evaluate
from spannorm.inference.generate import generate
from spannorm.inference.load import load_trained

from helpers import compose_config

QUESTIONS = [  # (context, choices, answer): some easy for the tiny model, some not
    ("ROMEO:\nlove night", ["light moon.", "zzkq xv."], 0),
    ("JULIET:\nthou art", ["qqq.", "fair sweet."], 1),
    ("NURSE:\nsweet", ["death life.", "9 8 7."], 0),
    ("FRIAR:\ndoth", ["art thee rose.", "art."], 1),
    ("ROMEO:\nmoon", ["sword.", "light love night fair."], 1),
    ("JULIET:\nrose", ["thee.", "xylophone."], 1),
]
TEXTS = [
    "ROMEO:\nlove night light moon sword.\n",
    "FRIAR:\nthee thou doth art fair sweet death life rose.\n",
    "NURSE:\n" + " ".join(["sweet rose"] * 140) + ".\n",  # 1.5 windows of the 1024-token model
]


def write_task(folder, name: str, rows: list[dict], **spec: str) -> None:
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    lines = [
        f"task: {name}",
        "dataset_path: json",
        f"dataset_kwargs: {{data_files: {{test: {data}}}, cache_dir: {folder / 'hf_cache'}}}",
        "test_split: test",
        *(f"{key}: {value}" for key, value in spec.items()),
    ]
    (folder / f"{name}.yaml").write_text("\n".join(lines) + "\n")


def log_likelihood(model, context: list[int], continuation: list[int]) -> float:
    """log p(continuation | context), one forward pass over both."""
    tokens = torch.tensor([context + continuation])
    with torch.no_grad():
        log_probs = log_softmax(model(tokens[:, :-1]).float(), dim=-1)[0]
    targets = tokens[0, len(context) :]
    return log_probs[len(context) - 1 :].gather(1, targets[:, None]).sum().item()


def rolling_log_likelihood(model, tokens: list[int], eos: int) -> float:
    """The text's log-likelihood predicted `max_seq_len` tokens at a time, each window's tokens
    seeing the `max_seq_len` tokens before them in EOS + text (the harness's rolling windows)."""
    window, stream = model.cfg.max_seq_len, [eos, *tokens]
    total = 0.0
    for start in range(0, len(tokens), window):
        end = min(len(tokens), start + window)
        inputs = torch.tensor([stream[max(0, end - window) : end]])
        with torch.no_grad():
            log_probs = log_softmax(model(inputs).float(), dim=-1)[0, -(end - start) :]
        targets = torch.tensor(tokens[start:end])
        total += log_probs.gather(1, targets[:, None]).sum().item()
    return total


@pytest.fixture(scope="module")
def evaluated(trained_run, tmp_path_factory):
    trained = load_trained(trained_run)
    model, tokenizer = trained.model, trained.tokenizer
    greedy = generate(model, torch.tensor([tokenizer.encode("ROMEO:\n")]), 6, temperature=0)
    greedy_text = tokenizer.decode(greedy[0, 7:].tolist()).split("\n")[0]
    tasks = tmp_path_factory.mktemp("tasks")
    write_task(
        tasks,
        "tiny_mc",
        [{"q": q, "choices": c, "answer": a} for q, c, a in QUESTIONS],
        output_type="multiple_choice",
        doc_to_text="'{{q}}'",
        doc_to_choice="'{{choices}}'",
        doc_to_target="'{{answer}}'",
        metric_list="[{metric: acc}, {metric: acc_norm}]",
    )
    write_task(
        tasks,
        "tiny_ppl",
        [{"text": text} for text in TEXTS],
        output_type="loglikelihood_rolling",
        doc_to_text="''",
        doc_to_target="'{{text}}'",
        metric_list="[{metric: word_perplexity}, {metric: byte_perplexity}, "
        "{metric: bits_per_byte}]",
    )
    write_task(  # the model's own greedy continuation is right, the other one is not
        tasks,
        "tiny_gen",
        [{"prompt": "ROMEO:\n", "target": greedy_text}, {"prompt": "JULIET:\n", "target": "@@"}],
        output_type="generate_until",
        doc_to_text="'{{prompt}}'",
        doc_to_target="'{{target}}'",
        generation_kwargs="{until: ['\\n'], max_gen_toks: 6, do_sample: false}",
        metric_list="[{metric: exact_match}]",
    )
    # what eval.py runs, in this process (the harness is slow to import), on the composed config
    cfg = compose_config(
        [
            f"ckpt_path={trained_run}",
            "tasks=[tiny_mc,tiny_ppl,tiny_gen]",
            f"include_path={tasks}",
            "batch_size=4",
        ],
        config="eval",
    )
    evaluate(cfg)
    (report,) = (trained_run / "eval").glob("*.json")
    return trained, json.loads(report.read_text())


def test_multiple_choice_accuracy_equals_the_models_own_log_probabilities(evaluated):
    trained, report = evaluated
    model, tokenizer = trained.model, trained.tokenizer
    correct = correct_norm = 0
    for question, choices, answer in QUESTIONS:
        context = tokenizer.encode(question)
        scores = [log_likelihood(model, context, tokenizer.encode(" " + c)) for c in choices]
        correct += max(range(len(choices)), key=scores.__getitem__) == answer
        normalized = [s / len(c) for s, c in zip(scores, choices, strict=True)]  # characters
        correct_norm += max(range(len(choices)), key=normalized.__getitem__) == answer
    results = report["results"]["tiny_mc"]
    assert results["acc,none"] == pytest.approx(correct / len(QUESTIONS))
    assert results["acc_norm,none"] == pytest.approx(correct_norm / len(QUESTIONS))


def test_perplexity_equals_the_models_own_log_probabilities(evaluated):
    trained, report = evaluated
    model, tokenizer = trained.model, trained.tokenizer
    total = sum(rolling_log_likelihood(model, tokenizer.encode(t), tokenizer.eos_id) for t in TEXTS)
    words = sum(len(re.split(r"\s+", text)) for text in TEXTS)
    n_bytes = sum(len(text.encode()) for text in TEXTS)
    results = report["results"]["tiny_ppl"]
    assert results["word_perplexity,none"] == pytest.approx(math.exp(-total / words), rel=1e-5)
    assert results["byte_perplexity,none"] == pytest.approx(math.exp(-total / n_bytes), rel=1e-5)
    assert results["bits_per_byte,none"] == pytest.approx(-total / n_bytes / math.log(2), rel=1e-5)


def test_generate_until_matches_greedy_decoding(evaluated):
    _, report = evaluated
    assert report["n_samples"]["tiny_gen"]["effective"] == 2
    assert report["results"]["tiny_gen"]["exact_match,none"] == 0.5  # the greedy target only


def test_results_reach_tensorboard_and_compare_runs(evaluated, trained_run, tmp_path):
    trained, report = evaluated
    scalars = read_scalars(trained_run / "eval")
    ((step, accuracy),) = scalars["eval/tiny_mc/acc"]  # TensorBoard keeps float32
    assert step == trained.step
    assert accuracy == pytest.approx(report["results"]["tiny_mc"]["acc,none"], rel=1e-6)
    assert "eval/tiny_ppl/bits_per_byte" in scalars
    table = compare([trained_run], "model.norm", tmp_path)[0].read_text()
    assert "tiny_mc/acc" in table and "## Downstream tasks" in table


def test_local_tasks_from_held_out_text_ask_for_the_true_next_line(tiny_corpus, tmp_path):
    text = tiny_corpus["validation"].read_text()
    names = write_local_tasks(text, tmp_path, "play", n=20, seed=3)
    assert names == ["play_next_line", "play_ppl"]
    rows = [
        json.loads(line) for line in (tmp_path / "play_next_line.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 20
    for row in rows:
        assert len(set(row["choices"])) == 4
        true_line = row["choices"][row["answer"]]
        assert row["context"] + true_line in text  # the context is followed by that very line
    assert {row["answer"] for row in rows} == {0, 1, 2, 3}
