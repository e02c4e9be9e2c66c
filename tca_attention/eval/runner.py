"""Resumable evaluation runs: every finished sample is one fsynced JSONL line.

Order of work: for each length, for each method (methods matched to another method's kept
fraction run after the others), for each task, for each sample. A restart reads the JSONL, skips every
(method, sample id) already there and tolerates a torn last line.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

from tqdm.auto import tqdm

from .. import registry
from .methods import DEFAULT_METHODS, SDPA_BACKENDS, Backend, EvalMethod, expand_method, resolve_tca_config
from .prompt import PromptFormat
from .schema import Result, Sample
from .scorers import score
from .tasks import TASKS, TaskContext, generate

log = logging.getLogger(__name__)
RESULTS_FILE = "results.jsonl"


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation: a model, methods, tasks, target lengths and samples per (task, length).
    methods: registry specs, with `@match=` and value lists (eval.methods)."""

    model: str
    methods: tuple[str, ...] = DEFAULT_METHODS
    tasks: tuple[str, ...] = tuple(TASKS.names())
    lengths: tuple[int, ...] = (4096,)
    samples: int = 20
    seed: int = 0
    chat_template: bool = True
    tca_preset: str = "small-context"
    tca_score: str | None = None
    tca_tau: float = 0.9
    dtype: str | None = None
    batch_size: int = 1  # samples of one (task, length, method) run together, left-padded
    sdpa_backend: str = "auto"  # torch SDPA kernel for the layers transformers runs (auto = torch's choice)
    sliding_kernel: bool = False  # sliding-window layers' prompts through the engine's windowed kernel

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in TASKS.names()]
        if unknown:  # a usage error: the CLI prints it without a traceback
            raise ValueError(f"unknown task(s) {', '.join(map(repr, unknown))}; known: {', '.join(TASKS.names())}")
        specs = [m for text in self.methods for m in expand_method(text)]
        labels = [s.label for s in specs]
        if len(set(labels)) != len(labels):
            raise ValueError(f"duplicate methods: {labels}")
        for s in specs:
            if s.match is not None and s.match not in labels:
                raise ValueError(f"{s.label} matches {s.match}, which is not among the methods {labels}")
        if self.samples < 1 or not self.lengths or min(self.lengths) < 64:
            raise ValueError("need samples >= 1 and lengths >= 64 tokens")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.sdpa_backend not in SDPA_BACKENDS:
            raise ValueError(f"sdpa_backend must be one of {SDPA_BACKENDS}, got {self.sdpa_backend!r}")

    def specs(self) -> list[EvalMethod]:
        """Methods in run order (sweeps expanded): those matched to another method's kept fraction last."""
        specs = [m for text in self.methods for m in expand_method(text)]
        return [s for s in specs if s.match is None] + [s for s in specs if s.match is not None]

    def identity(self) -> dict:
        """The settings that change a (method, sample) result; they name the run folder.
        The TCA preset is resolved, so a preset whose values change names a new folder. A batch
        size above 1 is part of it: padding shifts TCA's block grid, so results may differ."""
        ident = {"model": self.model, "seed": self.seed, "chat_template": self.chat_template,
                 "tca_preset": self.tca_preset, "tca": resolve_tca_config(self.tca_preset, self.tca_score, self.tca_tau),
                 "dtype": self.dtype}
        if self.batch_size > 1:
            ident["batch_size"] = self.batch_size
        if self.sdpa_backend != "auto":
            ident["sdpa_backend"] = self.sdpa_backend
        if self.sliding_kernel:  # exact, but bf16 sums in another order: a folder of its own
            ident["sliding_kernel"] = True
        return ident

    def run_name(self) -> str:
        """Readable and unique per identity; more methods, tasks, lengths or samples reuse it."""
        digest = hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:8]
        model = re.sub(r"[^A-Za-z0-9.]+", "-", Path(self.model).name if "/" in self.model else self.model)
        batch = f"_batch{self.batch_size}" if self.batch_size > 1 else ""
        sdpa = f"_sdpa-{self.sdpa_backend}" if self.sdpa_backend != "auto" else ""
        sdpa += "_sliding-kernel" if self.sliding_kernel else ""
        return f"{model}_{self.tca_preset}_tau{self.tca_tau:g}_seed{self.seed}{batch}{sdpa}_{digest}"


class ResultLog:
    """Append-only JSONL of Results, fsynced line by line. A run's earlier lines may sit gzip'd
    next to it (`results.jsonl.gz`, written by archive(): large runs are committed that way); they
    are read first, new lines still go to the plain file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.archive_path = path.with_name(path.name + ".gz")

    def _archived_lines(self) -> list[str]:
        if not self.archive_path.exists():
            return []
        return [l for l in gzip.decompress(self.archive_path.read_bytes()).decode("utf-8").splitlines() if l.strip()]

    def load(self) -> list[Result]:
        out = [Result.from_json(line) for line in self._archived_lines()]
        if not self.path.exists():
            return out
        lines = self.path.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                out.append(Result.from_json(line))
            except (json.JSONDecodeError, TypeError, KeyError):
                if i == len(lines) - 1:
                    log.warning("ignoring a torn last line in %s", self.path)
                    self._truncate_torn_tail()
                else:
                    raise
        return out

    def _truncate_torn_tail(self) -> None:
        data = self.path.read_bytes()
        cut = data.rstrip(b"\n").rfind(b"\n") + 1
        with open(self.path, "r+b") as f:
            f.truncate(cut)

    def archive(self) -> Path:
        """Move every line (archived and plain, in order) into the gzip archive and remove the plain
        file. The bytes depend only on the lines (no file name, mtime 0), so re-archiving what did
        not change changes nothing."""
        self.load()  # validates every line (and drops a torn last one)
        plain = self.path.read_text(encoding="utf-8").splitlines() if self.path.exists() else []
        lines = self._archived_lines() + [l for l in plain if l.strip()]
        tmp = self.archive_path.with_name(self.archive_path.name + ".tmp")
        with open(tmp, "wb") as f:
            with gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0) as z:
                z.write(("\n".join(lines) + "\n").encode("utf-8") if lines else b"")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.archive_path)
        self.path.unlink(missing_ok=True)
        return self.archive_path

    def append(self, result: Result) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(result.to_json() + "\n")
            f.flush()
            os.fsync(f.fileno())


def mean_kept_fraction(results: Iterable[Result], method: str, length: int) -> float | None:
    vals = [r.kept_fraction for r in results if r.method == method and r.length == length]
    return sum(vals) / len(vals) if vals else None


def _sample_meta(sample: Sample) -> dict:
    keep = ("depth", "attribute", "key")
    return {k: sample.metadata[k] for k in keep if k in sample.metadata}


def applies(spec: EvalMethod, task: str) -> bool:
    """Whether a task applies to a method: one that only answers questions about a context
    (InfiniRetri) has nothing to read in a perplexity sample."""
    return not (TASKS.get(task).scorer == "nll" and registry.questions_only(spec.spec))


def _todo_keys(config: EvalConfig) -> list[tuple[str, str]]:
    """Every (method label, sample id) the configuration asks for (tasks that do not apply left out;
    a method that no task applies to is an error, not an empty row)."""
    specs = config.specs()
    for s in specs:
        if not any(applies(s, t) for t in config.tasks):
            raise ValueError(f"{s.label}: none of the tasks {', '.join(config.tasks)} applies to it (it answers "
                             "questions about a context; add a question task such as niah_single or qa)")
    return [(s.label, f"{t}-{L}-{i:04d}") for L in config.lengths for s in specs
            for t in config.tasks if applies(s, t) for i in range(config.samples)]


def pending(config: EvalConfig, run_dir: Path) -> int:
    """How many of the configuration's samples run_dir does not hold yet (no model is loaded)."""
    done = {r.key for r in ResultLog(run_dir / RESULTS_FILE).load()}
    return sum(k not in done for k in _todo_keys(config))


def evaluate(config: EvalConfig, backend: Backend, run_dir: Path, progress: bool = True) -> list[Result]:
    """Run (or resume) `config` into run_dir; returns every result of the run folder."""
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_config(run_dir, config)
    results_log = ResultLog(run_dir / RESULTS_FILE)
    results = results_log.load()
    done = {r.key for r in results}
    specs = config.specs()
    todo_keys = _todo_keys(config)
    remaining = sum(k not in done for k in todo_keys)
    log.info("%s: %d of %d samples already done", run_dir, len(todo_keys) - remaining, len(todo_keys))
    dense_layers = {}  # (method, length) -> the dense layers its recorded rows ran with
    for r in results:
        dense_layers.setdefault((r.method, r.length), _dense_at(r))
    for spec in specs:
        skipped = [t for t in config.tasks if not applies(spec, t)]
        if skipped:
            log.info("%s: %s skipped (it answers questions about a context; these samples have none)",
                     spec.label, ", ".join(skipped))
    if remaining == 0:
        return results
    tokenizer = backend.load()
    backend.prepare(run_dir)
    fmt = PromptFormat(tokenizer, use_chat_template=config.chat_template)
    ctx = TaskContext(fmt, seed=config.seed)
    bar = tqdm(total=len(todo_keys), initial=len(todo_keys) - remaining, disable=not progress,
               desc=f"eval {config.model}", unit="sample", dynamic_ncols=True)
    try:
        for length in config.lengths:
            samples: dict[str, tuple[Sample, list[int]]] = {}

            def sample_of(task: str, i: int) -> tuple[Sample, list[int]]:
                sid = f"{task}-{length}-{i:04d}"
                if sid not in samples:
                    s = generate(ctx, task, length, i)
                    samples[sid] = (s, fmt.encode(s))
                return samples[sid]

            for spec in specs:
                matched = spec.kept if spec.kept is not None else (
                    mean_kept_fraction(results, spec.match, length) if spec.match else None)
                for task in [t for t in config.tasks if applies(spec, t)]:
                    # fixed chunks of sample indices, so a resumed run batches the same samples
                    for lo in range(0, config.samples, config.batch_size):
                        chunk = list(range(lo, min(lo + config.batch_size, config.samples)))
                        missing = [i for i in chunk if (spec.label, f"{task}-{length}-{i:04d}") not in done]
                        if not missing:
                            continue
                        bar.set_postfix_str(f"{spec.label} {task} {length}", refresh=False)
                        pairs = [sample_of(task, i) for i in chunk]
                        for result in _run_chunk(config, backend, spec, pairs, matched):
                            if result.key in done:
                                continue
                            _check_same_dense_layers(dense_layers, result, run_dir)
                            results_log.append(result)
                            results.append(result)
                            done.add(result.key)
                            bar.update(1)
    finally:
        bar.close()
    return results


def _dense_at(result: Result) -> tuple[int, ...]:
    return tuple((result.metadata or {}).get("dense_at") or ())


def _check_same_dense_layers(seen: dict[tuple[str, int], tuple[int, ...]], result: Result, run_dir: Path) -> None:
    """A spec whose dense layers are resolved at run time (TCA's dense_at=auto) must not mix two
    resolutions in one run folder (the probe's rule or cache changed between runs): refuse."""
    now, before = _dense_at(result), seen.setdefault((result.method, result.length), _dense_at(result))
    if now != before:
        def name(layers: tuple[int, ...]) -> str:
            return "/".join(map(str, layers)) or "none"
        raise RuntimeError(
            f"{result.method} at {result.length} tokens: this run keeps layers {name(now)} dense, the results already "
            f"in {run_dir} kept {name(before)} (the layer probe's choice changed since); resuming would mix the two. "
            "Use another --results-dir, or name the layers (dense_at=...) or the rule (probe_min=, probe_max_kl=) "
            "in the spec")


def _run_chunk(config: EvalConfig, backend: Backend, spec: EvalMethod, pairs: list[tuple[Sample, list[int]]],
               matched: float | None) -> list[Result]:
    """The chunk's samples as one batch; a batch that runs out of GPU memory runs again as two
    halves (down to single samples, whose out-of-memory error is raised): a row's answer does not
    depend on its batch neighbours, so the results are those of the whole batch."""
    if len(pairs) == 1 or not hasattr(backend, "run_batch"):
        return [_result(config, spec, s, ids, backend.run(spec, s, ids, matched)) for s, ids in pairs]
    import torch  # here: the command line's parser is built without torch

    try:
        outs = backend.run_batch(spec, [s for s, _ in pairs], [ids for _, ids in pairs], matched)
    except torch.OutOfMemoryError:
        _release_gpu_memory()
        half = len(pairs) // 2
        log.warning("%s, %s: out of GPU memory on a batch of %d (%d tokens); running it as batches of %d and %d",
                    spec.label, pairs[0][0].task, len(pairs), max(len(ids) for _, ids in pairs), half,
                    len(pairs) - half)
        return (_run_chunk(config, backend, spec, pairs[:half], matched)
                + _run_chunk(config, backend, spec, pairs[half:], matched))
    return [_result(config, spec, s, ids, out) for (s, ids), out in zip(pairs, outs, strict=True)]


def _release_gpu_memory() -> None:
    """What the failed batch left cached, back to the allocator (its tensors are gone with its frames)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _result(config: EvalConfig, spec: EvalMethod, sample: Sample, ids: list[int], out: Any) -> Result:
    if sample.kind == "nll":
        value, scorer = float(out.nll if out.nll is not None else float("nan")), "nll"
    else:
        scorer = TASKS.get(sample.task).scorer
        value = score(scorer, out.prediction, sample.answers)
    return Result(
        sample_id=sample.id, task=sample.task, length=sample.length, method=spec.label, model=config.model,
        score=value, scorer=scorer, prediction=out.prediction, answers=sample.answers,
        prompt_tokens=len(ids), kept_fraction=out.kept_fraction, kv_bytes=out.kv_bytes,
        dense_kv_bytes=out.dense_kv_bytes, seconds=round(out.seconds, 4), nll=out.nll,
        metadata={**_sample_meta(sample), **out.extra},
    )


def _write_config(run_dir: Path, config: EvalConfig) -> None:
    """config.json: the identity plus every invocation's methods/tasks/lengths/samples."""
    path = run_dir / "config.json"
    data = json.loads(path.read_text()) if path.exists() else {"identity": config.identity(), "invocations": []}
    if data["identity"] != json.loads(json.dumps(config.identity())):
        raise ValueError(f"{run_dir} holds a run with different settings: {data['identity']}")
    ident = config.identity()
    inv = {k: v for k, v in asdict(config).items() if k not in ident and not k.startswith("tca_")}
    inv = json.loads(json.dumps(inv))
    if not data["invocations"] or data["invocations"][-1] != inv:
        data["invocations"].append(inv)
    path.write_text(json.dumps(data, indent=2) + "\n")
