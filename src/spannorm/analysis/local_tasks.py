"""Two lm-evaluation-harness tasks built from held-out text (`scripts/make_local_tasks.py`), for
evaluating offline when the benchmark datasets cannot be downloaded:

- `<name>_next_line` (multiple choice, 4 options, chance 25%): a speech's opening lines (up to
  `context_lines`), then which line comes next: the true one, or one of three lines drawn at
  random from other speeches of the same text;
- `<name>_ppl` (rolling log-likelihood): whole speeches; word and byte perplexity, bits per byte.

A speech is a paragraph (blocks separated by a blank line) of at least three lines.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path


def speeches(text: str) -> list[list[str]]:
    blocks = (block.strip("\n").split("\n") for block in re.split(r"\n[ \t]*\n", text))
    return [lines for lines in blocks if len(lines) >= 3 and all(line.strip() for line in lines)]


def write_task(out: Path, name: str, rows: list[dict], spec: dict) -> None:
    data = out / f"{name}.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    header = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},
        "test_split": "test",
    }
    # JSON is YAML: one line per key keeps the file readable without a YAML writer
    lines = [f"{key}: {json.dumps(value)}" for key, value in {**header, **spec}.items()]
    (out / f"{name}.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_local_tasks(
    text: str,
    out: Path,
    name: str,
    n: int = 500,
    context_lines: int = 3,
    seed: int = 0,
    overwrite: bool = False,
) -> list[str]:
    """Write the two tasks' YAML + JSONL into `out`; return the task names. FileExistsError, before
    anything is written, if one of those files exists already (unless `overwrite`): a folder of
    task files may hold the user's own tasks of the same name."""
    out = Path(out)
    names = [f"{name}_next_line", f"{name}_ppl"]
    existing = [
        str(out / f"{task}{suffix}")
        for task in names
        for suffix in (".yaml", ".jsonl")
        if (out / f"{task}{suffix}").exists()
    ]
    if existing and not overwrite:
        raise FileExistsError(
            f"{', '.join(existing)} {'exists' if len(existing) == 1 else 'exist'} already; "
            "choose another folder or --name, "
            "or pass --overwrite to replace them"
        )
    rng = random.Random(seed)
    found = speeches(text)
    if len(found) < 2:
        raise ValueError("the text has fewer than two speeches (paragraphs of 3+ lines)")
    chosen = rng.sample(found, min(n, len(found)))
    rows = []
    for lines in chosen:
        cut = rng.randint(1, min(context_lines, len(lines) - 1))
        true_line = lines[cut]
        distractors = []
        while len(distractors) < 3:
            other = rng.choice(found)
            candidate = rng.choice(other[1:])  # a line of another speech, not a speaker's name
            if other is not lines and candidate != true_line and candidate not in distractors:
                distractors.append(candidate)
        choices = [true_line, *distractors]
        rng.shuffle(choices)
        context = "\n".join(lines[:cut]) + "\n"
        rows.append({"context": context, "choices": choices, "answer": choices.index(true_line)})
    out.mkdir(parents=True, exist_ok=True)
    write_task(
        out,
        f"{name}_next_line",
        rows,
        {
            "output_type": "multiple_choice",
            "doc_to_text": "{{context}}",
            "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{answer}}",
            "target_delimiter": "",
            "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
        },
    )
    write_task(
        out,
        f"{name}_ppl",
        [{"text": "\n".join(lines) + "\n"} for lines in chosen],
        {
            "output_type": "loglikelihood_rolling",
            "doc_to_text": "",
            "doc_to_target": "{{text}}",
            "metric_list": [
                {"metric": "word_perplexity"},
                {"metric": "byte_perplexity"},
                {"metric": "bits_per_byte"},
            ],
        },
    )
    return [f"{name}_next_line", f"{name}_ppl"]
