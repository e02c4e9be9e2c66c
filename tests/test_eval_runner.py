"""The runner with a fake method backend: resumable after a crash, torn lines, the method
grammar (registry specs, @match=, sweeps), matched KV, and the report files from synthetic results."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tca_attention import registry
from tca_attention.eval.methods import EvalMethod, Outcome, expand_method, split_methods
from tca_attention.eval.report import family, markdown, summarize, write_report
from tca_attention.eval.runner import RESULTS_FILE, EvalConfig, ResultLog, evaluate, pending
from tca_attention.eval.schema import Result, Sample

TASKS = ("niah_single", "qa", "perplexity")
KEPT = {"full": 1.0, "tca": 0.3, "tca:tau=0.5": 0.2, "tca:tau=0.7": 0.25}


class Crash(RuntimeError):
    pass


class FakeBackend:
    """Answers right with full attention, wrong otherwise; can crash after N calls."""

    model_name = "fake"

    def __init__(self, tokenizer: Any, crash_after: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.crash_after = crash_after
        self.calls: list[tuple[str, str, float | None]] = []
        self.prepared = 0

    def load(self) -> Any:
        return self.tokenizer

    def prepare(self, run_dir: Path) -> None:
        self.prepared += 1

    def run(self, spec: EvalMethod, sample: Sample, ids: list[int], matched: float | None) -> Outcome:
        if self.crash_after is not None and len(self.calls) >= self.crash_after:
            raise Crash("simulated crash")
        self.calls.append((spec.label, sample.id, matched))
        # the reference budget differs by length, so matching must be per length
        kept = matched if spec.match else KEPT[spec.label] * (1.5 if sample.length == 1024 else 1.0)
        right = spec.label == "full"
        pred = " ".join(sample.answers) if right else "I do not know."
        nll = 2.0 if sample.kind == "nll" else None
        return Outcome(pred, nll, kept, int(1000 * kept), 1000, 0.01, {})


def _config(**kw) -> EvalConfig:
    base = dict(model="fake", methods=("full", "tca", "streaming@match=tca"), tasks=TASKS, lengths=(512, 1024), samples=2)
    base.update(kw)
    return EvalConfig(**base)


def test_crash_loses_no_finished_sample_and_resume_skips_them(tmp_path: Path, smol_tokenizer) -> None:
    cfg = _config()
    total = len(cfg.lengths) * len(cfg.methods) * len(cfg.tasks) * cfg.samples
    crashing = FakeBackend(smol_tokenizer, crash_after=7)
    with pytest.raises(Crash):
        evaluate(cfg, crashing, tmp_path, progress=False)
    saved = ResultLog(tmp_path / RESULTS_FILE).load()
    assert [r.key for r in saved] == [(m, s) for m, s, _ in crashing.calls]
    assert len(saved) == 7
    assert pending(cfg, tmp_path) == total - 7 and pending(cfg, tmp_path / "elsewhere") == total

    resumed = FakeBackend(smol_tokenizer)
    results = evaluate(cfg, resumed, tmp_path, progress=False)
    assert len(resumed.calls) == total - 7
    assert not {(m, s) for m, s, _ in resumed.calls} & {r.key for r in saved}
    assert len(results) == total and len({r.key for r in results}) == total

    again = FakeBackend(smol_tokenizer)
    assert len(evaluate(cfg, again, tmp_path, progress=False)) == total
    assert again.calls == [] and again.prepared == 0  # nothing left: the model is not even prepared


def test_torn_last_line_is_dropped_and_redone(tmp_path: Path, smol_tokenizer) -> None:
    cfg = _config(methods=("full",), tasks=("qa",), lengths=(512,), samples=3)
    with pytest.raises(Crash):
        evaluate(cfg, FakeBackend(smol_tokenizer, crash_after=2), tmp_path, progress=False)
    path = tmp_path / RESULTS_FILE
    with open(path, "a") as f:
        f.write('{"sample_id": "qa-512-00')  # a crash in the middle of a write
    backend = FakeBackend(smol_tokenizer)
    results = evaluate(cfg, backend, tmp_path, progress=False)
    assert [s for _, s, _ in backend.calls] == ["qa-512-0002"]
    assert sorted(r.sample_id for r in results) == ["qa-512-0000", "qa-512-0001", "qa-512-0002"]
    assert len(path.read_text().splitlines()) == 3


def test_scores_and_streaming_gets_the_tca_budget_of_its_length(tmp_path: Path, smol_tokenizer) -> None:
    cfg = _config(methods=("streaming@match=tca:tau=0.50", "full", "tca:tau=0.5"))
    backend = FakeBackend(smol_tokenizer)
    results = evaluate(cfg, backend, tmp_path, progress=False)
    # matched streaming runs after its reference at every length; labels are normalised specs
    order = [m for m, _, _ in backend.calls]
    label = "streaming@match=tca:tau=0.5"
    assert order.index(label) > max(i for i, m in enumerate(order[:12]) if m == "tca:tau=0.5")
    matched = {(s.split("-")[1], round(f, 9)) for m, s, f in backend.calls if m == label}
    assert matched == {("512", 0.2), ("1024", 0.3)}
    by = {(r.method, r.task): r for r in results}
    assert by[("full", "qa")].score == 1.0 and by[("tca:tau=0.5", "qa")].score == 0.0
    assert by[("full", "perplexity")].scorer == "nll" and by[("full", "perplexity")].score == 2.0
    assert by[("full", "niah_single")].metadata["depth"] in (0.1, 0.3)
    assert all(abs(r.prompt_tokens - r.length) <= 0.01 * r.length for r in results)


def test_resume_under_the_normalised_labels(tmp_path: Path, smol_tokenizer) -> None:
    """The same methods written otherwise (spacing, parameter order, 0.50) are the same labels:
    a rerun finds them done; a sweep adds only its new members."""
    cfg = _config(methods=("full", "tca:tau=0.5"), tasks=("qa",), lengths=(512,))
    evaluate(cfg, FakeBackend(smol_tokenizer), tmp_path, progress=False)
    same = _config(methods=(" full ", "tca: tau=0.50"), tasks=("qa",), lengths=(512,))
    assert same.run_name() == cfg.run_name()
    again = FakeBackend(smol_tokenizer)
    evaluate(same, again, tmp_path, progress=False)
    assert again.calls == [] and again.prepared == 0
    sweep = _config(methods=("full", "tca:tau=0.5|0.7", "streaming@match=tca:tau=0.5|0.7"), tasks=("qa",),
                    lengths=(512,))
    more = FakeBackend(smol_tokenizer)
    results = evaluate(sweep, more, tmp_path, progress=False)
    assert sorted({m for m, _, _ in more.calls}) == [
        "streaming@match=tca:tau=0.5", "streaming@match=tca:tau=0.7", "tca:tau=0.7"]
    kept = {r.method: r.kept_fraction for r in results}
    assert kept["streaming@match=tca:tau=0.7"] == kept["tca:tau=0.7"] == 0.25


def test_method_grammar_parsing_and_errors() -> None:
    assert split_methods(" full;tca:tau=0.7, score=observation ;; streaming:window=64 ") == [
        "full", "tca:tau=0.7, score=observation", "streaming:window=64"]
    assert expand_method("tca:score=observation, tau=0.70") == [
        EvalMethod("tca:tau=0.7,score=observation", "tca:tau=0.7,score=observation")]
    assert expand_method("streaming:block_size=16,sinks=8@match=tca:tau=0.9") == [EvalMethod(
        "streaming:sinks=8,block_size=16@match=tca:tau=0.9", "streaming:sinks=8,block_size=16", "tca:tau=0.9")]
    assert [m.label for m in expand_method("tca:tau=0.5|0.9,score=observation|column_mean")] == [
        "tca:tau=0.5,score=observation", "tca:tau=0.5,score=column_mean",
        "tca:tau=0.9,score=observation", "tca:tau=0.9,score=column_mean"]
    assert [(m.spec, m.match) for m in expand_method("streaming:sinks=2|4@match=tca:tau=0.5|0.9")] == [
        ("streaming:sinks=2", "tca:tau=0.5"), ("streaming:sinks=2", "tca:tau=0.9"),
        ("streaming:sinks=4", "tca:tau=0.5"), ("streaming:sinks=4", "tca:tau=0.9")]
    for text, error in (
        ("h2o", "method 'h2o': unknown method 'h2o'; known: .*tca methods"),
        ("full,tca", "unknown method 'full,tca'.*separate methods with ';'"),
        ("tca:tau=0.7,streaming", "should be key=value.*separate methods with ';'"),
        ("tca:tua=0.7", "unknown parameter 'tua'"),
        ("tca:tau=high", "tau='high' is not a valid float"),
        ("tca@match=streaming:window=64", "tca declares no density knob.*methods with one: streaming"),
        ("streaming:window=64@match=tca", "window is set by @match; leave it out"),
        ("streaming@match=streaming@match=tca", "not itself matched"),
        ("streaming@match=nope", "unknown method 'nope'"),
    ):
        with pytest.raises(ValueError, match=error):
            expand_method(text)


def test_config_validation_and_run_name() -> None:
    with pytest.raises(ValueError, match="not among the"):
        _config(methods=("full", "streaming@match=tca:tau=0.5"))
    with pytest.raises(ValueError, match="duplicate methods"):
        _config(methods=("tca:tau=0.5", "tca:tau=0.50"))
    with pytest.raises(ValueError, match="unknown task"):
        _config(tasks=("nope",))
    a, b = _config(), _config(samples=20, lengths=(8192,), methods=("full",))
    assert a.run_name() == b.run_name()  # more samples / lengths / methods extend one folder
    assert _config(seed=1).run_name() != a.run_name()
    assert a.run_name().startswith("fake_small-context_tau0.9_seed0_")
    assert [m.label for m in EvalConfig(model="fake").specs()] == [
        "full", "tca:last_q=16,span=7", "tca", "streaming:block_size=16@match=tca:last_q=16,span=7"]


def test_matched_window_keeps_the_target_tokens() -> None:
    for L, target in ((4096, 1200.0), (8192, 2000.0), (4000, 700.0)):
        for block in (16, 128):
            spec = registry.at_density(f"streaming:block_size={block}", target / L, L)
            w = registry.parse_spec(spec)[1]["window"]
            assert abs(4 + w + (L - w) % block - target) <= block / 2
            assert abs(registry.create(spec).kept_tokens(L) - target) <= block / 2


def _result(method: str, task: str, length: int, i: int, score: float, kept: float, depth: float | None = None) -> Result:
    return Result(
        sample_id=f"{task}-{length}-{i:04d}", task=task, length=length, method=method, model="m",
        score=score, scorer="nll" if task == "perplexity" else "contains", prediction="", answers=("1",),
        prompt_tokens=length, kept_fraction=kept, kv_bytes=int(100 * kept), dense_kv_bytes=100, seconds=1.0,
        metadata={} if depth is None else {"depth": depth},
    )


def test_report_from_synthetic_results(tmp_path: Path) -> None:
    rs = []
    for L in (4096, 8192):
        for i, d in enumerate((0.1, 0.5, 0.9, 0.1)):
            rs.append(_result("full", "niah_single", L, i, 1.0, 1.0, d))
            rs.append(_result("tca", "niah_single", L, i, float(d < 0.5), 0.3, d))
            rs.append(_result("streaming@match=tca", "niah_single", L, i, 0.0, 0.3, d))
        for i in range(2):
            rs.append(_result("full", "qa", L, i, 1.0, 1.0))
            rs.append(_result("tca", "qa", L, i, 0.5, 0.4))
            rs.append(_result("full", "perplexity", L, i, 2.0, 1.0))
    summary = summarize(rs)
    tca = summary["models"]["m"]["methods"]["tca"]["lengths"]["4096"]
    assert tca["tasks"]["niah_single"]["score"] == 0.5
    # streaming did not run qa: the headline compares methods on full attention's tasks, and a
    # method missing one of them has no headline accuracy (it does not shrink everyone's tasks)
    assert tca["accuracy_tasks"] == ["niah_single", "qa"] and tca["accuracy"] == 0.5
    stream = summary["models"]["m"]["methods"]["streaming@match=tca"]["lengths"]["4096"]
    assert stream["accuracy"] is None and stream["accuracy_missing"] == ["qa"]
    assert stream["tasks"]["niah_single"]["score"] == 0.0
    assert "streaming@match=tca at 4096 (no qa)" in markdown(summary)
    # no method ran every task (and no full attention): the tasks every method ran
    only = summarize([r for r in rs if r.method != "full"])["models"]["m"]["methods"]
    assert only["tca"]["lengths"]["4096"]["accuracy_tasks"] == ["niah_single", "qa"]
    assert only["streaming@match=tca"]["lengths"]["4096"]["accuracy"] is None
    full4 = summary["models"]["m"]["methods"]["full"]["lengths"]["4096"]
    assert full4["accuracy"] == 1.0 and full4["tasks"]["qa"]["score"] == 1.0
    assert tca["kept_fraction"] == pytest.approx((4 * 0.3 + 2 * 0.4) / 6)
    full = summary["models"]["m"]["methods"]["full"]["lengths"]["8192"]
    assert full["ppl"] == pytest.approx(7.389, rel=1e-3) and full["accuracy"] == 1.0
    assert [family(m) for m in ("tca:tau=0.7", "streaming@match=tca", "full", "tca@0.7", "streaming=tca")] == [
        "tca", "streaming", "full", "tca", "streaming"]  # labels of earlier runs too
    files = write_report(rs, tmp_path)
    for key in ("summary", "report", "needle_m", "accuracy_vs_length_m", "accuracy_vs_kept_m"):
        assert files[key].exists() and files[key].stat().st_size > 0
    assert files["needle_m"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = files["report"].read_text()
    # acc, gap to full (points) with its paired bootstrap interval (niah: 0/-1 per sample, qa -0.5), kept
    assert "| tca | 50.0 | 50.0 | -50.0 [-75.0, -25.0] | -50.0 [-75.0, -25.0] | 33.3 | 33.3 |" in md
    assert json.loads(files["summary"].read_text())["models"]["m"]["methods"]["full"]["lengths"]["4096"]["n"] == 8


def test_cli_rebuilds_a_prefixed_report_from_run_folders(tmp_path: Path) -> None:
    import argparse

    from tca_attention.eval.cli import add_eval_parser

    run = tmp_path / "run"
    run.mkdir()
    log = ResultLog(run / RESULTS_FILE)
    for i, d in enumerate((0.1, 0.5)):
        log.append(_result("full", "niah_single", 4096, i, 1.0, 1.0, d))
        log.append(_result("tca", "niah_single", 4096, i, 0.0, 0.25, d))
    parser = argparse.ArgumentParser()
    add_eval_parser(parser.add_subparsers())
    args = parser.parse_args(["eval", "--report-only", str(run), "--report-dir", str(tmp_path / "docs"),
                              "--report-prefix", "eval_"])
    assert args.func(args) == 0
    md = (tmp_path / "docs" / "eval_report.md").read_text()
    assert "| full | 100.0 | +0.0 | 100.0 | 100.0 | - |" in md and "| tca | 0.0 | -100.0 [-100.0, -100.0] | 25.0 | 25.0 | - |" in md
    assert (tmp_path / "docs" / "eval_needle_m.png").exists()


def test_budgets_calibrated_with_other_settings_are_refused(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from tca_attention.methods.tca.config import TCAConfig
    from tca_attention.eval.methods import ModelBackend

    want = TCAConfig(window=512, tau=0.9)
    backend = ModelBackend("m", tca_config=want)
    calls: list[dict] = []
    same = SimpleNamespace(config=want.with_(tau=0.5, score="observation"),
                           at=lambda **kw: calls.append(kw) or "reselected")
    assert backend._checked(same, tmp_path) == "reselected" and calls == [{"tau": 0.9, "score": want.score}]
    other = SimpleNamespace(config=want.with_(window=4096), at=lambda **kw: None)
    with pytest.raises(ValueError, match="window"):
        backend._checked(other, tmp_path)
    # the run folder is named from the resolved TCA settings, not only the preset's name
    assert _config(tca_score="observation").run_name() != _config().run_name()


def test_a_new_registry_entry_runs_in_the_eval_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    """A method the eval was never told about: one registry Entry with a density knob is enough
    to run it, sweep it and match it."""
    from tca_attention.eval.methods import ModelBackend
    from tca_attention.methods.full_budget import FullBudget

    entry = registry.Entry("toy", "a test method", {"window": int, "block_size": int},
                           lambda params, model, tokenizer, extra: FullBudget(**params),
                           registry.Density("window", lambda fraction, tokens, params: round(fraction * tokens)))
    monkeypatch.setitem(registry.ENTRIES, "toy", entry)
    cfg = _config(methods=("tca:tau=0.5", "toy:block_size=8|16@match=tca:tau=0.5"))
    [_, m8, m16] = cfg.specs()
    assert (m8.label, m16.spec) == ("toy:block_size=8@match=tca:tau=0.5", "toy:block_size=16")
    method, record = ModelBackend("m").core_method(m8, 1000, 0.25)
    assert method == FullBudget(window=250, block_size=8) and record == {"window": 250}
    method, record = ModelBackend("m").core_method(expand_method("toy:window=64")[0], 1000, None)
    assert method == FullBudget(window=64) and record == {}


def test_attended_fraction_is_the_sparsified_phase_share() -> None:
    """The report's x-axis: KV kept for eviction methods, the prefill share for a prefill-only
    method (it keeps the whole cache), the decode share for a decode-only one."""
    from tca_attention.eval.report import attended_fraction

    def res(method: str, kept: float, **meta: Any) -> Result:
        return Result("s", "niah", 4096, method, "m", 1.0, "exact", "x", ("x",), 4096, kept, 10, 10, 0.1,
                      metadata=meta)

    assert attended_fraction(res("full", 1.0)) == 1.0
    assert attended_fraction(res("tca", 0.4, prefill_kept_fraction=0.45, decode_attended_fraction=None)) == 0.4
    assert attended_fraction(res("xattention", 1.0, prefill_kept_fraction=0.3)) == 0.3
    assert attended_fraction(res("quest", 1.0, prefill_kept_fraction=1.0, decode_attended_fraction=0.2)) == 0.2
    cell = summarize([res("quest", 1.0, prefill_kept_fraction=1.0, decode_attended_fraction=0.2),
                      res("quest", 1.0, prefill_kept_fraction=1.0, decode_attended_fraction=0.4)])
    got = cell["models"]["m"]["methods"]["quest"]["lengths"]["4096"]
    assert got["kept_fraction"] == 1.0 and abs(got["attended_fraction"] - 0.3) < 1e-12


def test_archived_results_are_read_first_and_new_lines_append_to_the_plain_log(tmp_path: Path) -> None:
    """archive(): every line moves into results.jsonl.gz (the same results back, byte-identical on
    a second archive); later appends go to the plain file and load() returns both, in order; a
    torn last plain line is still dropped; the report reads archived runs."""
    from tca_attention.eval.report import load_results

    log = ResultLog(tmp_path / RESULTS_FILE)
    first = [_result("full", "niah_single", 4096, i, 1.0, 1.0, 0.5) for i in range(3)]
    for r in first:
        log.append(r)
    path = log.archive()
    assert path.name == RESULTS_FILE + ".gz" and not log.path.exists()
    assert log.load() == first
    data = path.read_bytes()
    assert log.archive().read_bytes() == data  # deterministic: nothing changed, nothing differs
    later = _result("tca", "niah_single", 4096, 0, 0.0, 0.25, 0.5)
    log.append(later)
    with open(log.path, "a", encoding="utf-8") as f:
        f.write('{"method": "tca", "tor')  # a torn last line
    assert log.load() == first + [later]
    assert load_results([tmp_path]) == first + [later]
    log.archive()
    assert not log.path.exists() and log.load() == first + [later] and path.read_bytes() != data



def test_a_sample_in_two_run_folders_counts_once_from_the_first(tmp_path: Path, caplog) -> None:
    """A group re-run at another batch size lands in its own folder: the report takes each
    (model, method, length, sample) once, from the first folder given, and warns how many it dropped;
    samples only the second folder holds still count."""
    import logging

    from tca_attention.eval.report import load_results

    a, b = ResultLog(tmp_path / "a" / RESULTS_FILE), ResultLog(tmp_path / "b" / RESULTS_FILE)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    old = [_result("tca", "niah_single", 4096, i, 1.0, 0.25, 0.5) for i in range(2)]
    rerun = [_result("tca", "niah_single", 4096, i, 0.0, 0.25, 0.5) for i in range(3)]  # 2 repeats, 1 new
    other = _result("tca", "niah_single", 8192, 0, 0.0, 0.25, 0.5)  # another length: not a repeat
    for r in old:
        a.append(r)
    for r in rerun + [other]:
        b.append(r)
    with caplog.at_level(logging.WARNING, logger="tca_attention.eval.report"):
        got = load_results([tmp_path / "a", tmp_path / "b"])
    assert got == old + [rerun[2], other]
    assert "2 results in" in caplog.text
    assert load_results([tmp_path / "b", tmp_path / "a"]) == rerun + [other]

class DenseLayersBackend(FakeBackend):
    """Records `dense` as the dense layers of every TCA row (what dense_at=auto resolved to)."""

    def __init__(self, tokenizer: Any, dense: list[int], crash_after: int | None = None) -> None:
        super().__init__(tokenizer, crash_after)
        self.dense = dense

    def run(self, spec: EvalMethod, sample: Sample, ids: list[int], matched: float | None) -> Outcome:
        out = super().run(spec, sample, ids, matched)
        return Outcome(out.prediction, out.nll, out.kept_fraction, out.kv_bytes, out.dense_kv_bytes, out.seconds,
                       {"dense_at": self.dense} if self.dense else {})


def test_resume_refuses_to_mix_two_resolutions_of_the_dense_layers(tmp_path: Path, smol_tokenizer) -> None:
    """A run folder whose dense_at=auto rows kept layers 18 dense is not resumed by a run whose
    probe now keeps 7/18 (or none): the error names both; the same layers resume."""
    cfg = _config(methods=("tca",), tasks=("qa",), lengths=(512,), samples=4)
    with pytest.raises(Crash):
        evaluate(cfg, DenseLayersBackend(smol_tokenizer, [18], crash_after=2), tmp_path, progress=False)
    for other, name in (([7, 18], "7/18"), ([], "none")):
        with pytest.raises(RuntimeError, match=f"keeps layers {name} dense, the results already .* kept 18"):
            evaluate(cfg, DenseLayersBackend(smol_tokenizer, other), tmp_path, progress=False)
    assert len(ResultLog(tmp_path / RESULTS_FILE).load()) == 2  # nothing of the refused runs was written
    assert len(evaluate(cfg, DenseLayersBackend(smol_tokenizer, [18]), tmp_path, progress=False)) == 4


def test_gap_interval_is_a_paired_bootstrap_over_the_samples() -> None:
    """The gap's interval: a constant paired difference gives exactly that constant; a task
    whose differences vary widens it around the point gap; a task without pairs is an error."""
    from tca_attention.eval.report import gap_interval

    assert gap_interval({"a": [(0.5, 1.0)] * 7, "b": [(1.0, 1.0)] * 5}) == pytest.approx((-0.25, -0.25))
    pairs = {"a": [(1.0, 0.0), (0.0, 1.0)] * 10, "b": [(1.0, 1.0)] * 20}  # point gap 0, spread in a
    lo, hi = gap_interval(pairs)
    assert -0.5 < lo < -0.05 and 0.05 < hi < 0.5
    assert gap_interval(pairs) == (lo, hi)  # a fixed seed: the report is reproducible
    with pytest.raises(ValueError, match="paired"):
        gap_interval({"a": [(1.0, 1.0)], "b": []})


def test_report_shows_the_gap_with_its_interval(tmp_path: Path, smol_tokenizer) -> None:
    cfg = _config(methods=("full", "tca"), tasks=("niah_single", "qa"), lengths=(512,), samples=3)
    results = evaluate(cfg, FakeBackend(smol_tokenizer), tmp_path, progress=False)
    summary = summarize(results)
    cell = summary["models"]["fake"]["methods"]["tca"]["lengths"]["512"]
    assert cell["gap_ci"] == pytest.approx([-1.0, -1.0])  # every answer lost on every sample
    assert "gap_ci" not in summary["models"]["fake"]["methods"]["full"]["lengths"]["512"]
    assert "| -100.0 [-100.0, -100.0] |" in markdown(summary)
