"""`tca leaderboard`: the matched-fraction selection on hand-built points and results (nearest
point, ties, no point near a target, best method and margin, where TCA loses), timings from a
`tca bench methods` JSON, and the command end to end on a tiny random model (resume does no work,
bad specs are clear errors)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tca_attention import registry
from tca_attention.cli import main
from tca_attention.eval.leaderboard import report
from tca_attention.eval.leaderboard.cli import leaderboard_methods
from tca_attention.eval.leaderboard.matching import Point, match_at, nearest, pareto
from tca_attention.eval.leaderboard.timings import load_timings, summarize_timings
from tca_attention.eval.methods import EvalMethod, ModelBackend, expand_method
from tca_attention.eval.schema import Result


def P(method: str, fraction: float, value: float) -> Point:
    return Point(method, method.partition(":")[0], fraction, value)


def test_nearest_point_within_tolerance_and_ties() -> None:
    pts = [P("tca:tau=0.5", 0.22, 0.1), P("tca:tau=0.7", 0.31, 0.5), P("tca:tau=0.9", 0.58, 0.9)]
    assert nearest(pts, 0.25, 0.1).method == "tca:tau=0.5"  # 0.03 away, not 0.06
    assert nearest(pts, 0.40, 0.1).method == "tca:tau=0.7"
    assert nearest(pts, 0.60, 0.1).method == "tca:tau=0.9"
    assert nearest(pts, 0.45, 0.1) is None  # 0.14 and 0.13 away: none within 0.1
    assert nearest(pts, 0.45, 0.13).method == "tca:tau=0.9"  # the tolerance bound is inclusive
    # a tie in distance goes to the smaller fraction, whatever the accuracy
    tie = [P("x:threshold=0.9", 0.5, 1.0), P("x:threshold=0.5", 0.3, 0.0)]
    assert nearest(tie, 0.4, 0.1).method == "x:threshold=0.5"
    assert nearest(list(reversed(tie)), 0.4, 0.1).method == "x:threshold=0.5"
    # the same fraction twice: the label decides, so the choice is deterministic
    same = [P("x:b", 0.4, 0.2), P("x:a", 0.4, 0.9)]
    assert nearest(same, 0.4, 0.1).method == "x:a" and nearest(same[::-1], 0.4, 0.1).method == "x:a"
    assert nearest([], 0.4, 0.1) is None


def test_best_method_margin_ties_and_missing() -> None:
    pts = [P("tca:tau=0.7", 0.26, 0.50), P("streaming:w=1", 0.25, 0.70), P("xattention:t=0.5", 0.24, 0.60),
           P("quest:b=9", 0.80, 1.0)]
    m = match_at(pts, 0.25, 0.1, families=["tca", "streaming", "xattention", "quest", "head-split"])
    assert m.best == ("streaming",) and m.margin == pytest.approx(0.10) and m.runner_up == ("xattention",)
    assert m.chosen["quest"] is None and m.chosen["head-split"] is None
    assert m.missing == ("quest", "head-split")
    assert m.behind("tca") == [("streaming", pytest.approx(0.2)), ("xattention", pytest.approx(0.1))]
    assert m.behind("streaming") == [] and m.behind("quest") == []
    # a tie for the best: both named, the margin is over the next value
    tie = match_at([P("a:x", 0.4, 0.8), P("b:x", 0.41, 0.8), P("c:x", 0.39, 0.5)], 0.4, 0.1)
    assert tie.best == ("a", "b") and tie.margin == pytest.approx(0.3) and tie.runner_up == ("c",)
    assert tie.behind("a") == []
    alone = match_at([P("a:x", 0.4, 0.8)], 0.4, 0.1)
    assert alone.best == ("a",) and alone.margin is None
    nobody = match_at([P("a:x", 0.9, 0.8)], 0.4, 0.1)
    assert nobody.best == () and nobody.margin is None and nobody.missing == ("a",)
    # timings: lower is better
    fast = match_at([P("a:x", 0.4, 2.0), P("b:x", 0.4, 1.5)], 0.4, 0.1, higher_is_better=False)
    assert fast.best == ("b",) and fast.margin == pytest.approx(0.5) and fast.behind("a") == [("b", pytest.approx(0.5))]


def test_pareto_front() -> None:
    pts = [P("a:1", 0.2, 0.3), P("a:2", 0.5, 0.6), P("b:1", 0.3, 0.2), P("b:2", 0.4, 0.6), P("c:1", 0.4, 0.7)]
    assert [p.method for p in pareto(pts)] == ["a:1", "c:1"]


def _res(method: str, task: str, length: int, i: int, score: float, attended: float, model: str = "m") -> Result:
    return Result(sample_id=f"{task}-{length}-{i:04d}", task=task, length=length, method=method, model=model,
                  score=score, scorer="contains", prediction="", answers=("1",), prompt_tokens=length,
                  kept_fraction=attended, kv_bytes=1, dense_kv_bytes=1, seconds=0.1)


# (method, attended fraction, niah score, qa score) at 4096 tokens, two samples each
ROWS = [("full", 1.0, 1.0, 1.0), ("tca:tau=0.5", 0.24, 0.5, 0.5), ("tca:tau=0.9", 0.62, 1.0, 0.5),
        ("streaming:block_size=16@kept=0.25", 0.25, 1.0, 1.0), ("streaming:block_size=16@kept=0.6", 0.6, 1.0, 0.5),
        ("xattention:threshold=0.9", 0.9, 1.0, 1.0)]


def _synthetic() -> list[Result]:
    out = []
    for method, frac, niah, qa in ROWS:
        for i in range(2):
            out += [_res(method, "niah_single", 4096, i, niah, frac), _res(method, "qa", 4096, i, qa, frac)]
    return out


def test_board_states_best_margin_and_where_tca_loses(tmp_path: Path) -> None:
    board = report.build(_synthetic(), targets=[0.25, 0.4, 0.6], tolerance=0.1)
    cell = board["models"]["m"]["lengths"]["4096"]
    assert cell["full"]["accuracy"] == 1.0
    at25, at40, at60 = cell["matched"]
    assert at25["chosen"]["tca"]["method"] == "tca:tau=0.5"
    assert at25["best"] == ["streaming"] and at25["margin"] == pytest.approx(0.5) and at25["runner_up"] == ["tca"]
    assert at25["chosen"]["xattention"] is None and "xattention" in at25["no_point_near"]
    # streaming answers every sample tca:tau=0.5 misses (a constant paired difference): a tight interval
    assert at25["tca_behind"] == [{"family": "streaming", "points": pytest.approx(50.0),
                                   "points_ci": pytest.approx([50.0, 50.0])}]
    assert at25["margin_ci"] == pytest.approx([0.5, 0.5])
    assert at40["best"] == [] and sorted(at40["no_point_near"]) == ["streaming", "tca", "xattention"]
    assert at60["best"] == ["streaming", "tca"] and at60["margin"] is None  # a tie, nobody else near
    # per task family: niah and qa separately
    tca9 = next(r for r in cell["points"] if r["method"] == "tca:tau=0.9")
    assert tca9["task_families"] == {"niah": 1.0, "qa": 0.5} and tca9["accuracy"] == 0.75
    # xattention 0.9 ties streaming@0.25 on accuracy at a larger fraction: dominated
    assert cell["pareto"]["all"] == ["tca:tau=0.5", "streaming:block_size=16@kept=0.25"]
    assert any("tca loses to streaming by 50.0 points [+50.0, +50.0]" in f and "25% kept" in f for f in board["findings"])
    assert any("40% kept: tca has no sweep point within ±10" in f for f in board["findings"])
    assert not any("60% kept: tca loses" in f for f in board["findings"])  # a tie is no loss
    files = report.write(board, tmp_path, note="synthetic")
    md = files["md"].read_text()
    assert "> synthetic" in md and "| 4096 | 25% | 100.0 | streaming | +50.0 [+50.0, +50.0] over tca |" in md
    assert "no point near" in md and "tca loses to streaming" in md and "No timings given" in md
    assert json.loads(files["json"].read_text())["findings"] == board["findings"]
    assert (tmp_path / "leaderboard_pareto_m.png").exists()


def _bench_json(path: Path) -> Path:
    rows = []
    for L, dense in ((32768, 1.0), (65536, 3.0), (131072, 10.0)):
        # the bench writes "error": null on rows that ran
        # decode: 100 tokens/s dense; tca reads less and decodes faster, xattention keeps (and reads) all
        rows += [{"tokens": L, "method": "full", "ttft_s": dense, "prefill_attended_fraction": 1.0, "error": None,
                  "decode_tokens_per_s": 100.0},
                 {"tokens": L, "method": "tca:tau=0.5", "ttft_s": dense / 4, "prefill_attended_fraction": 0.3,
                  "decode_attended_fraction": 0.27, "error": None, "decode_tokens_per_s": 300.0},
                 {"tokens": L, "method": "tca:tau=0.9", "ttft_s": dense / 2, "prefill_attended_fraction": 0.62,
                  "decode_attended_fraction": 0.6, "decode_tokens_per_s": 150.0},
                 {"tokens": L, "method": "tca:tau=0.9,last_q=16", "ttft_s": dense / 1.5, "prefill_attended_fraction": 0.62,
                  "decode_attended_fraction": 0.6, "decode_tokens_per_s": 150.0},
                 {"tokens": L, "method": "xattention:threshold=0.9", "ttft_s": dense / 3,
                  "prefill_attended_fraction": 0.41, "decode_tokens_per_s": 99.0},
                 {"tokens": L, "method": "xattention:threshold=0.5", "ttft_s": dense / 5,
                  "prefill_attended_fraction": 0.24, "decode_tokens_per_s": 98.0},
                 {"tokens": L, "method": "quest:budget=4096", "ttft_s": dense, "prefill_attended_fraction": 1.0,
                  "decode_attended_fraction": 0.24, "decode_tokens_per_s": 120.0}]
    rows[-1] = {"tokens": 131072, "method": "quest:budget=4096", "error": "OOM: out of memory"}
    path.write_text(json.dumps({"meta": {"device": "NVIDIA H100", "model": {"shape": "Llama-3.1-8B"},
                                         "command": "tca bench methods ..."}, "rows": rows}))
    return path


def test_timings_matched_to_the_targets(tmp_path: Path) -> None:
    """Prefill time is matched on the prefill fraction (lower is better), decode speed on the decode
    fraction (bytes read; higher is better); a method's options name their own row (tca[last_q=16])."""
    data = load_timings(_bench_json(tmp_path / "bench.json"))
    t = summarize_timings(data, [0.25, 0.4, 0.6], 0.1, source="bench.json")
    assert t["matched_on"] == "prefill_attended_fraction" and not t["higher_is_better"]
    c = t["lengths"]["131072"]
    assert c["dense_s"] == c["dense"] == 10.0 and c["errors"] == {"quest:budget=4096": "OOM: out of memory"}
    at25, at40, at60 = c["matched"]
    assert at25["chosen"]["tca"]["method"] == "tca:tau=0.5"  # prefill attended 0.3
    assert at25["chosen"]["tca"]["speedup"] == pytest.approx(4.0) and at25["fastest"] == ["xattention"]
    assert at25["chosen"]["xattention"]["method"] == "xattention:threshold=0.5"
    assert at40["chosen"]["xattention"]["speedup"] == pytest.approx(3.0)
    assert at40["chosen"]["tca"]["method"] == "tca:tau=0.5"  # 0.3 is 0.1 from 0.4: within the tolerance
    assert at60["chosen"]["tca"]["method"] == "tca:tau=0.9" and at60["fastest"] == ["tca"]
    assert at60["chosen"]["tca[last_q=16]"]["speedup"] == pytest.approx(1.5)
    assert at25["chosen"]["quest"] is None  # only an error row at 128K
    assert t["lengths"]["32768"]["matched"][0]["chosen"]["quest"] is None  # it prefills densely: 100%
    assert t["findings"] == [f"{k}K tokens, 25% attended: tca {250 * d:.1f} ms (tca:tau=0.5, 30.0%) vs xattention "
                             f"{200 * d:.1f} ms (xattention:threshold=0.5, 24.0%)" for k, d in ((32, 1), (64, 3), (128, 10))]
    d = summarize_timings(data, [0.25, 0.4, 0.6], 0.1, key="decode_tokens_per_s")
    assert d["matched_on"] == "decode_attended_fraction" and d["higher_is_better"]
    d25 = d["lengths"]["32768"]["matched"][0]
    assert d25["chosen"]["quest"]["speedup"] == pytest.approx(1.2) and d25["fastest"] == ["tca"]
    assert d25["chosen"]["tca"]["value"] == 300.0 and d25["chosen"]["xattention"] is None  # it reads everything
    assert d["findings"] == []  # tca decodes fastest at every matched fraction here
    with pytest.raises(ValueError, match="no row of the timings has it"):
        summarize_timings(data, [0.25], 0.1, key="attention_s")
    bad = tmp_path / "bad.json"
    for content, error in (("[1, 2]", "expected the JSON of `tca bench methods`"), ("{", "not JSON"),
                           (json.dumps({"meta": {}, "rows": [{"tokens": 8, "method": "tca"}]}), "no dense"),
                           (json.dumps({"meta": {}, "rows": [{"method": "full"}]}), "row 0 has no integer")):
        bad.write_text(content)
        with pytest.raises(ValueError, match=error):
            load_timings(bad)


def test_timings_of_the_committed_gpu_bench_run() -> None:
    """The real `tca bench methods` JSON of an H100 run (docs/results/gpu_2026-12-06)."""
    path = Path(__file__).resolve().parent.parent / "docs/results/gpu_2026-12-06/methods_8b.json"
    data = load_timings(path)
    t = summarize_timings(data, [0.25, 0.4, 0.6], 0.1)
    c = t["lengths"]["131072"]
    assert c["dense_s"] == pytest.approx(11.71, abs=0.01) and c["errors"] == {}
    at25 = c["matched"][0]["chosen"]
    assert at25["head-split"]["method"] == "head-split:retrieval_fraction=0.25"
    assert at25["head-split"]["speedup"] == pytest.approx(11.7127 / 6.0004, rel=1e-3)
    assert at25["tca"] is None  # tca attended 12.7% there: 12.3 points from 25%
    assert at25["quest"] is None  # quest prefills densely (100%)
    d = summarize_timings(data, [0.25, 0.4, 0.6], 0.1, key="decode_tokens_per_s")
    assert d["lengths"]["131072"]["matched"][0]["chosen"]["quest"]["method"] == "quest:budget=4096"  # reads 15.9%
    assert len(t["rows"]) == 18


def test_kept_fraction_specs() -> None:
    """NAME@kept=F: the density knob set to keep F of each prompt (no reference method needed)."""
    [a, b] = expand_method("streaming:block_size=16@kept=0.25|0.5")
    assert a == EvalMethod("streaming:block_size=16@kept=0.25", "streaming:block_size=16", kept=0.25) and a.matched
    assert b.kept == 0.5 and not expand_method("streaming")[0].matched
    method, record = ModelBackend("m").core_method(a, 4096, None)
    assert record["window"] == registry.parse_spec(registry.at_density("streaming:block_size=16", 0.25, 4096))[1]["window"]
    assert abs(method.kept_tokens(4096) / 4096 - 0.25) < 16 / 4096
    assert leaderboard_methods("full; streaming@kept ;tca:tau=0.5|0.9", [0.25, 0.4]) == [
        "full", "streaming@kept=0.25|0.4", "tca:tau=0.5|0.9"]
    for text, error in (("tca@kept=0.3", "tca declares no density knob"), ("streaming@kept=0", r"in \(0, 1\]"),
                        ("streaming@kept=x", r"in \(0, 1\]"), ("streaming:window=9@kept=0.3", "window is set by @kept"),
                        ("streaming@kept", "needs a fraction"), ("streaming@kept=0.3@match=tca", "exclude each other")):
        with pytest.raises(ValueError, match=error):
            expand_method(text)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smol_tokenizer) -> Path:
    cfg = LlamaConfig(vocab_size=len(smol_tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny")
    LlamaForCausalLM(cfg).save_pretrained(path)
    smol_tokenizer.save_pretrained(path)
    return path


def test_leaderboard_end_to_end_resumes_without_work(tiny_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("TCA_CACHE_DIR", str(tmp_path / "cache"))
    out, runs = tmp_path / "board", tmp_path / "runs"
    argv = ["leaderboard", "--model", str(tiny_dir), "--methods", "full; tca:tau=0.5|0.9; streaming:block_size=16@kept",
            "--tasks", "niah_single", "--lengths", "1024", "--samples", "1", "--calibration-length", "1024",
            "--targets", "0.25,0.6", "--tolerance", "0.2", "--results-dir", str(runs), "--out", str(out),
            "--timings", str(_bench_json(tmp_path / "bench.json")), "--no-progress", "--note", "tiny test"]
    assert main(argv) == 0
    board = json.loads((out / "leaderboard.json").read_text())
    [model] = board["models"]
    cell = board["models"][model]["lengths"]["1024"]
    labels = {r["method"] for r in cell["points"]}
    assert labels == {"full", "tca:tau=0.5", "tca:tau=0.9", "streaming:block_size=16@kept=0.25",
                      "streaming:block_size=16@kept=0.6"}
    kept = {r["method"]: r["attended_fraction"] for r in cell["points"]}
    assert abs(kept["streaming:block_size=16@kept=0.25"] - 0.25) < 0.05  # the knob was set to the target
    assert abs(kept["streaming:block_size=16@kept=0.6"] - 0.6) < 0.05
    at25 = cell["matched"][0]
    assert at25["chosen"]["streaming"]["method"] == "streaming:block_size=16@kept=0.25"
    assert set(at25["chosen"]) == {"tca", "streaming"}
    assert [t["key"] for t in board["timings"]] == ["ttft_s", "decode_tokens_per_s"]
    assert board["timings"][0]["lengths"]["131072"]["dense_s"] == 10.0
    for name in ("leaderboard.md", f"leaderboard_pareto_{Path(model).name}.png", "leaderboard_prefill_time.png",
                 "leaderboard_decode_speed.png"):
        assert (out / name).exists(), name
    assert "> tiny test" in (out / "leaderboard.md").read_text()
    [run_dir] = list(runs.iterdir())
    lines = (run_dir / "results.jsonl").read_text()
    assert len(lines.splitlines()) == 5  # 5 methods x 1 task x 1 sample

    # the second run finds everything done: no model load, no method run, the same report
    def fail(*args, **kwargs):
        raise AssertionError("a resumed run did work")

    monkeypatch.setattr(ModelBackend, "load", fail)
    monkeypatch.setattr(ModelBackend, "run_batch", fail)
    (out / "leaderboard.json").unlink()
    assert main(argv) == 0
    assert (run_dir / "results.jsonl").read_text() == lines
    assert json.loads((out / "leaderboard.json").read_text())["models"] == board["models"]
    # rebuilt from the run folder alone
    assert main(["leaderboard", "--report-only", str(run_dir), "--out", str(tmp_path / "again"),
                 "--targets", "0.25,0.6", "--tolerance", "0.2"]) == 0
    again = json.loads((tmp_path / "again" / "leaderboard.json").read_text())
    assert again["models"] == board["models"] and again["timings"] is None


@pytest.mark.parametrize("extra, error", [
    (["--methods", "full; tca@kept"], "tca declares no density knob"),
    (["--methods", "full; h2o:x=1"], "unknown method 'h2o'"),
    (["--methods", "full; streaming:window=64@kept"], "window is set by @kept"),
    (["--methods", "full, tca"], "separate methods with ';'"),
    (["--targets", "0.25,1.5"], "--targets"),
    (["--tolerance", "0"], "--tolerance"),
    (["--timings", "/nonexistent/bench.json"], "No such file"),
])
def test_bad_input_is_a_clear_error_before_any_work(extra, error, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(ModelBackend, "load", lambda self: pytest.fail("loaded a model"))
    rc = main(["leaderboard", "--model", "nope", "--results-dir", str(tmp_path), "--out", str(tmp_path), *extra])
    assert rc != 0 and error in capsys.readouterr().err


def test_variants_name_a_methods_options_but_not_its_sweep_knob() -> None:
    from tca_attention.eval.leaderboard.variants import variants

    labels = ["full", "tca:tau=0.5", "tca:tau=0.9", "tca:tau=0.9,last_q=16", "tca:tau=0.7,gqa=union",
              "tca:tau=0.7+zerotuning", "streaming:block_size=16@kept=0.25", "streaming:block_size=16@kept=0.6",
              "hip@kept=0.4", "xattention:threshold=0.5", "xattention:threshold=0.9,stride=16", "tca@0.7"]
    assert variants(labels) == {
        "full": "full", "tca:tau=0.5": "tca", "tca:tau=0.9": "tca", "tca:tau=0.9,last_q=16": "tca[last_q=16]",
        "tca:tau=0.7,gqa=union": "tca[gqa=union]", "tca:tau=0.7+zerotuning": "tca+zerotuning",
        "streaming:block_size=16@kept=0.25": "streaming", "streaming:block_size=16@kept=0.6": "streaming",
        "hip@kept=0.4": "hip", "xattention:threshold=0.5": "xattention",
        "xattention:threshold=0.9,stride=16": "xattention[stride=16]", "tca@0.7": "tca"}
    assert registry.sweep_param("tca") == "tau" and registry.sweep_param("hip") == "k"
    assert registry.sweep_param("full") is None


def test_timings_baseline_is_the_better_dense_row(tmp_path: Path) -> None:
    """With a keep-all row (the engine's dense graph decode), speed-ups are over the better dense row."""
    path = _bench_json(tmp_path / "bench.json")
    data = json.loads(path.read_text())
    data["rows"].append({"tokens": 32768, "method": "full-budget", "ttft_s": 1.2, "prefill_attended_fraction": 1.0,
                         "decode_attended_fraction": 1.0, "decode_tokens_per_s": 200.0})
    path.write_text(json.dumps(data))
    data = load_timings(path)
    d = summarize_timings(data, [0.25], 0.1, key="decode_tokens_per_s")["lengths"]["32768"]
    assert d["dense"] == 200.0 and d["dense_method"] == "full-budget"
    assert d["matched"][0]["chosen"]["tca"]["speedup"] == pytest.approx(1.5)  # 300 / 200, not 300 / 100
    assert "full-budget" not in d["matched"][0]["chosen"]  # a baseline, not a contender
    t = summarize_timings(data, [0.25], 0.1)["lengths"]["32768"]
    assert t["dense_s"] == 1.0 and t["dense_method"] == "full"  # SDPA's prefill is the faster one


def test_least_kv_within_a_bound_of_full(tmp_path: Path) -> None:
    board = report.build(_synthetic(), targets=[0.25], tolerance=0.1, within=[0.01, 0.3])
    w1, w30 = board["models"]["m"]["lengths"]["4096"]["least_kv_within"]
    assert w1["bound"] == 0.01 and w1["families"]["tca"] is None  # tca's best (0.75) is 25 points below
    s = w1["families"]["streaming"]
    assert s["method"] == "streaming:block_size=16@kept=0.25" and s["gap"] == 0.0 and s["gap_ci"] == [0.0, 0.0]
    t = w30["families"]["tca"]
    assert t["method"] == "tca:tau=0.9" and t["gap"] == pytest.approx(-0.25)
    assert w30["families"]["streaming"]["method"] == "streaming:block_size=16@kept=0.25"  # the least KV, not the best
    assert w30["families"]["xattention"]["method"] == "xattention:threshold=0.9"
    md = report.write(board, tmp_path)["md"].read_text()
    assert "### Least KV within a few points of full attention" in md and "| within 1 point | within 30 points |" in md
    assert "| 4096 | tca | none | 62.0% KV, 62.0% attended (tca:tau=0.9, -25.0" in md
    lines = report.least_kv_lines(board)
    assert lines[0] == "m, 4096 tokens, within 1 point of full: no tca run"
    assert lines[1].startswith("m, 4096 tokens, within 30 points of full: least KV of a tca run 62.0% (tca:tau=0.9, -25.0")
    # no full attention at a length: no section rather than a wrong one
    nofull = report.build([r for r in _synthetic() if r.method != "full"], targets=[0.25], tolerance=0.1)
    assert nofull["models"]["m"]["lengths"]["4096"]["least_kv_within"] == []


@pytest.mark.parametrize("text", ["", "a", "-1", "100", "1;2"])
def test_within_option_refuses_bad_bounds(text: str) -> None:
    from tca_attention.eval.leaderboard.cli import parse_within

    with pytest.raises(ValueError, match="--within"):
        parse_within(text)
    assert parse_within("1, 2.5") == [0.01, 0.025]
