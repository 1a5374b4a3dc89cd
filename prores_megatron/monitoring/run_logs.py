"""Read one training run's logs: the ProRes monitor JSONL and/or Megatron's TensorBoard events.

Contract: ``load_run(label, paths)`` searches each path (a directory, searched recursively, or a
``prores_monitor.jsonl`` / ``events.out.tfevents.*`` file) and returns a ``RunLog``:

- ``steps``: ``lm_loss``, ``grad_norm``, ``lr`` as ``Series`` (sorted, one value per iteration),
  from the monitor's ``step`` records when there are any (every iteration, float64), else from
  TensorBoard's ``lm loss`` / ``grad-norm`` / ``learning-rate`` (every ``--log-interval``, float32);
- ``validation``: TensorBoard's ``lm loss validation`` (None if absent);
- ``layers``: per monitored iteration, the monitor's per-layer arrays (``alpha``, ``attn_rms``,
  ``mlp_rms``, ``resid_rms``, ``resid_norm``, ``grad_norm``) as ``LayerSeries`` [n, L];
- ``settings``: schedule, warmup_steps, num_layers, train_iters (+ arch, init, ...) from the last
  monitor ``run`` record, else from the arguments Megatron writes to TensorBoard;
- ``online_spikes``: the monitor's last ``spikes`` record (None if absent);
- ``not_trained``: the iterations the monitor recorded as skipped by Megatron (``--iterations-to-skip``),
  whose step values are missing (NaN in ``steps``).

An iteration logged twice (a resumed run repeats the steps after its last checkpoint) keeps the
value logged last; several paths under one label are read in order, later ones winning. Malformed
input raises ``RunLogError`` naming the file and line. Reading TensorBoard needs the
``tensorboard`` package (imported only then).
"""

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

MONITOR_FILE = "prores_monitor.jsonl"
EVENTS_PREFIX = "events.out.tfevents."
LAYER_FIELDS = ("alpha", "attn_rms", "mlp_rms", "resid_rms", "resid_norm", "grad_norm")
STEP_FIELDS = ("lm_loss", "grad_norm", "lr")
TB_STEP_TAGS = {"lm loss": "lm_loss", "grad-norm": "grad_norm", "learning-rate": "lr"}
TB_VALIDATION_TAG = "lm loss validation"
_REQUIRED = {
    "run": ("schedule", "num_layers"),
    "step": ("iteration", "lm_loss"),
    "layers": ("iteration",) + LAYER_FIELDS,
    "spikes": ("iteration", "loss_score", "grad_norm_score"),
}


class RunLogError(ValueError):
    """A run's logs are missing or malformed; the message names the path."""


@dataclass
class Series:
    iterations: np.ndarray  # int64, strictly increasing
    values: np.ndarray  # float64; NaN where a value was null / non-finite

    @classmethod
    def from_dict(cls, by_iteration: Dict[int, float]) -> "Series":
        its = sorted(by_iteration)
        return cls(np.asarray(its, dtype=np.int64),
                   np.asarray([math.nan if by_iteration[i] is None else by_iteration[i] for i in its],
                              dtype=np.float64))

    def gaps(self) -> List[int]:
        """Iterations missing between the first and the last one logged."""
        if len(self.iterations) < 2:
            return []
        present = set(self.iterations.tolist())
        return [i for i in range(int(self.iterations[0]), int(self.iterations[-1]) + 1) if i not in present]


@dataclass
class LayerSeries:
    iterations: np.ndarray  # int64 [n]
    values: np.ndarray  # float64 [n, L]


@dataclass
class RunLog:
    label: str
    sources: List[str] = field(default_factory=list)
    settings: Dict = field(default_factory=dict)
    settings_source: Optional[str] = None
    steps: Dict[str, Series] = field(default_factory=dict)
    steps_source: Optional[str] = None
    validation: Optional[Series] = None
    layers: Dict[str, LayerSeries] = field(default_factory=dict)
    online_spikes: Optional[dict] = None
    notes: List[str] = field(default_factory=list)
    not_trained: set = field(default_factory=set)


def find_sources(path) -> tuple:
    """(monitor JSONL files, TensorBoard event directories) under ``path``, sorted."""
    path = Path(path)
    if not path.exists():
        raise RunLogError(f"{path}: no such file or directory")
    if path.is_file():
        if path.name == MONITOR_FILE or path.suffix == ".jsonl":
            return [path], []
        if path.name.startswith(EVENTS_PREFIX):
            return [], [path.parent]
        raise RunLogError(f"{path}: neither a monitor JSONL ({MONITOR_FILE}) nor a TensorBoard event file")
    jsonl, tb = [], set()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in files:
            if name == MONITOR_FILE:
                jsonl.append(Path(root) / name)
            elif name.startswith(EVENTS_PREFIX):
                tb.add(Path(root))
    return sorted(jsonl), sorted(tb)


def read_monitor(path: Path) -> Dict[str, list]:
    """The records of one monitor JSONL file by kind, in file order (each with its line number)."""
    records = {kind: [] for kind in _REQUIRED}
    unknown = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)  # accepts NaN/Infinity, as Python's json.dumps writes them
            except json.JSONDecodeError as err:
                raise RunLogError(f"{path}:{lineno}: not a JSON object ({err.msg})") from None
            kind = rec.get("kind") if isinstance(rec, dict) else None
            if kind not in _REQUIRED:
                unknown[kind] = unknown.get(kind, 0) + 1  # newer monitor versions may add kinds
                continue
            missing = [k for k in _REQUIRED[kind] if k not in rec]
            if missing:
                raise RunLogError(f"{path}:{lineno}: '{kind}' record without {', '.join(missing)}")
            records[kind].append((lineno, rec))
    records["_unknown"] = unknown
    return records


def read_tensorboard(directory: Path) -> tuple:
    """(scalars {tag: {step: value}}, Megatron args {name: text}) of one event directory."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError as err:
        raise RunLogError(f"{directory}: reading TensorBoard events needs the 'tensorboard' package ({err})") from None
    acc = EventAccumulator(str(directory), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    scalars = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in tags.get("scalars", [])}
    args = {}
    for tag in tags.get("tensors", []):
        if tag.endswith("/text_summary"):  # Megatron writes every argument as a text summary
            from tensorboard.util.tensor_util import make_ndarray

            value = make_ndarray(acc.Tensors(tag)[-1].tensor_proto).ravel()
            if value.size:
                text = value[0]
                args[tag[: -len("/text_summary")]] = text.decode() if isinstance(text, bytes) else str(text)
    return scalars, args


def _tb_settings(args: dict) -> Optional[dict]:
    def number(name, kind):
        text = args.get(name)
        if text in (None, "None"):
            return None
        try:
            return kind(float(text))
        except ValueError:
            return None

    if "num_layers" not in args:
        return None
    return dict(schedule=args.get("prores_schedule"), warmup_steps=number("prores_warmup_steps", float),
                num_layers=number("num_layers", int), train_iters=number("train_iters", int),
                arch=args.get("prores_arch"), init=args.get("prores_init"))


def _merge_monitor(run: RunLog, path: Path, steps: dict, layers: dict):
    recs = read_monitor(path)
    for kind, count in recs.pop("_unknown").items():
        run.notes.append(f"{path}: ignored {count} record(s) of unknown kind {kind!r}")
    launches = [r for _, r in recs["run"]]
    if launches:
        keys = ("schedule", "warmup_steps", "num_layers", "train_iters")
        changed = [k for k in keys if len({json.dumps(r.get(k)) for r in launches}) > 1]
        if changed:
            run.notes.append(f"{path}: {', '.join(changed)} changed between launches; the last launch's is used")
        run.settings, run.settings_source = dict(launches[-1]), str(path)
    num_layers = run.settings.get("num_layers")
    if not num_layers and recs["layers"]:
        first = recs["layers"][0][1]["alpha"]
        num_layers = len(first) if isinstance(first, list) else None
    for lineno, rec in recs["step"]:
        iteration = int(rec["iteration"])
        for name in STEP_FIELDS:
            steps.setdefault(name, {})[iteration] = rec.get(name)
        (run.not_trained.add if rec.get("not_trained") else run.not_trained.discard)(iteration)
    for lineno, rec in recs["layers"]:
        for name in LAYER_FIELDS:
            values = rec[name]
            if values is None:  # not measured that iteration (e.g. grad norms under distopt)
                continue
            if not isinstance(values, list) or (num_layers and len(values) != num_layers):
                raise RunLogError(f"{path}:{lineno}: 'layers' record's {name} has "
                                  f"{len(values) if isinstance(values, list) else 'no'} entries, "
                                  f"expected num_layers = {num_layers}")
            layers.setdefault(name, {})[int(rec["iteration"])] = values
    if recs["spikes"]:
        run.online_spikes = recs["spikes"][-1][1]


def load_run(label: str, paths: List) -> RunLog:
    run = RunLog(label=label)
    monitor_steps, layers, tb_scalars, tb_settings = {}, {}, {}, None
    for path in paths:
        jsonl, tb_dirs = find_sources(path)
        if len(jsonl) > 1:
            raise RunLogError(f"{path}: {len(jsonl)} monitor files ({', '.join(map(str, jsonl))}); point "
                              "--run at one run's directory, or give each as --run LABEL=FILE")
        if len(tb_dirs) > 1:
            raise RunLogError(f"{path}: TensorBoard events in {len(tb_dirs)} directories ({', '.join(map(str, tb_dirs))}); "
                              f"point --run at one, or repeat --run {label}=DIR to merge them in order")
        if not jsonl and not tb_dirs:
            raise RunLogError(f"{path}: no {MONITOR_FILE} and no TensorBoard event files ({EVENTS_PREFIX}*) found")
        for file in jsonl:
            _merge_monitor(run, file, monitor_steps, layers)
            run.sources.append(str(file))
        for directory in tb_dirs:
            scalars, args = read_tensorboard(directory)
            for tag, values in scalars.items():
                tb_scalars.setdefault(tag, {}).update(values)
            tb_settings = _tb_settings(args) or tb_settings
            run.sources.append(str(directory))
    if monitor_steps:
        run.steps = {k: Series.from_dict(v) for k, v in monitor_steps.items() if any(x is not None for x in v.values())}
        run.steps_source = "monitor"
    else:
        run.steps = {name: Series.from_dict(tb_scalars[tag]) for tag, name in TB_STEP_TAGS.items() if tag in tb_scalars}
        run.steps_source = "tensorboard" if run.steps else None
    if TB_VALIDATION_TAG in tb_scalars:
        run.validation = Series.from_dict(tb_scalars[TB_VALIDATION_TAG])
    for name, by_iteration in layers.items():
        its = sorted(by_iteration)
        run.layers[name] = LayerSeries(np.asarray(its, dtype=np.int64),
                                       np.asarray([[math.nan if v is None else v for v in by_iteration[i]]
                                                   for i in its], dtype=np.float64))
    if not run.settings and tb_settings:
        run.settings, run.settings_source = tb_settings, "tensorboard arguments"
    return run
