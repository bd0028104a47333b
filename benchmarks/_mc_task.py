"""A zero-shot multiple-choice task built from local text and run through lm-evaluation-harness (offline).

Cloze questions: the context is `context_words` words of a prose paragraph, the right choice its next
`continuation_words` words, and the wrong choices are spans of the same length from other paragraphs. lm-eval
scores each choice by its log-likelihood after the context (`acc`; `acc_norm` divides by the choice's length in
bytes). Chance is 1 / `num_choices`. The task is a YAML file and a JSONL data file written to a folder, and it runs
through `lm_eval.simple_evaluate` with that folder as `include_path`, on a saved model folder
(`trust_remote_code=True`, so pruned folders load through their own modeling code).

    paragraphs = prose_paragraphs(texts, min_words=60)
    task = build_cloze_task(paragraphs, Path("tasks"), "gitdoc_cloze", num_questions=200)
    scores = run_lm_eval("my-pruned-model", task)    # {"acc": ..., "acc_stderr": ..., "acc_norm": ..., ...}
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path


# A line that is markup, code or a list item in AsciiDoc / reStructuredText, not running prose.
_MARKUP = re.compile(r"^(\s|[-=+*.#:|\[\]'`$<>/_~]|\d+\.|[A-Za-z-]+::|\S+\(\d\))")
_WORD = re.compile(r"^[A-Za-z][A-Za-z'-]*[.,;:!?)]?$|^\(?[A-Za-z][A-Za-z'-]*$")


@dataclass
class ClozeTask:
    name: str
    folder: Path
    num_questions: int
    num_choices: int

    @classmethod
    def load(cls, folder: Path, name: str) -> ClozeTask:
        """A task `build_cloze_task` wrote earlier (e.g. in a parent process)."""
        rows = [json.loads(line) for line in (Path(folder) / f"{name}.jsonl").read_text().splitlines()]
        return cls(name, Path(folder), len(rows), len(rows[0]["choices"]))


def prose_paragraphs(texts: list[str], min_words: int) -> list[list[str]]:
    """Paragraphs (as word lists) of running prose: blank-line separated blocks with no markup lines, mostly made
    of plain words, at least `min_words` long."""
    paragraphs = []
    for text in texts:
        for block in re.split(r"\n\s*\n", text):
            lines = [line for line in block.splitlines() if line.strip()]
            if not lines or any(_MARKUP.match(line) for line in lines):
                continue
            words = " ".join(lines).split()
            if len(words) >= min_words and sum(bool(_WORD.match(w)) for w in words) >= 0.9 * len(words):
                paragraphs.append(words)
    return paragraphs


def build_cloze_task(
    paragraphs: list[list[str]],
    folder: Path,
    name: str,
    num_questions: int,
    context_words: int = 40,
    continuation_words: int = 8,
    num_choices: int = 4,
    seed: int = 0,
) -> ClozeTask:
    """Write `name.yaml` and `name.jsonl` into `folder`: one question per paragraph (the first `num_questions`
    after a seeded shuffle), distractors drawn from the other paragraphs."""
    if len(paragraphs) < max(num_choices, 2):
        raise ValueError(f"{len(paragraphs)} paragraphs: too few to build {num_choices}-way questions.")
    rng = random.Random(seed)
    order = list(range(len(paragraphs)))
    rng.shuffle(order)
    rows = []
    for index in order[:num_questions]:
        words = paragraphs[index]
        start = rng.randrange(0, len(words) - context_words - continuation_words + 1)
        context = words[start : start + context_words]
        answer = words[start + context_words : start + context_words + continuation_words]
        choices = [answer]
        while len(choices) < num_choices:
            other = paragraphs[rng.choice([i for i in order if i != index])]
            at = rng.randrange(0, len(other) - continuation_words + 1)
            span = other[at : at + continuation_words]
            if span not in choices:
                choices.append(span)
        rng.shuffle(choices)
        rows.append({"context": " ".join(context), "choices": [" ".join(c) for c in choices],
                     "answer": choices.index(answer)})  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data.resolve()}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return ClozeTask(name, folder, len(rows), num_choices)


def run_lm_eval(model_dir: str | os.PathLike, task: ClozeTask, batch_size: int = 8) -> dict[str, float]:
    """Zero-shot accuracy of the saved model in `model_dir` on `task` (lm-eval's Python API, offline)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={model_dir},trust_remote_code=True,device=cpu,dtype=float32",
        tasks=[task.name],
        task_manager=TaskManager(include_path=str(task.folder), include_defaults=False),  # only this task: fast
        batch_size=batch_size,
        num_fewshot=0,
    )
    scores = results["results"][task.name]
    return {
        "acc": scores["acc,none"],
        "acc_stderr": scores["acc_stderr,none"],
        "acc_norm": scores["acc_norm,none"],
        "acc_norm_stderr": scores["acc_norm_stderr,none"],
        "questions": task.num_questions,
        "chance": 1 / task.num_choices,
    }
