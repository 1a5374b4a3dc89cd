"""Loader for the local smoke-test tasks in this folder (lm-evaluation-harness `custom_dataset`).

Contract: ``load_jsonl(jsonl="data/NAME.jsonl", **_)`` reads a JSON-lines file, path relative to this
folder (or absolute), and returns ``datasets.DatasetDict({"test": Dataset})`` with one row per line.
It never touches the network or the Hugging Face cache, so the tasks run with
``HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1``. A missing file, an empty file or a line that is not a
JSON object raises ``ValueError`` naming the file and line.
"""

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def load_jsonl(jsonl=None, **_):
    # lm-eval calls custom_dataset(**metadata, **dataset_kwargs): the task's `metadata` (version, and
    # whatever --metadata adds) arrives here too, hence **_. Paths are resolved against this folder,
    # not the working directory, so `--include_path examples/lm_eval` works from anywhere.
    import datasets

    if not jsonl:
        raise ValueError("prores smoke task: dataset_kwargs.jsonl (the data file) is not set in its YAML")
    path = Path(jsonl) if Path(jsonl).is_absolute() else HERE / jsonl
    if not path.is_file():
        raise ValueError(f"prores smoke task: data file {path} not found")
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
