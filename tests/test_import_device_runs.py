"""scripts/import_device_runs.py: device run folders merge into committed ones without losing rows."""
from __future__ import annotations

import importlib.util
import json
import tarfile
from pathlib import Path

import pytest

from tca_attention.eval.runner import RESULTS_FILE, ResultLog
from tca_attention.eval.schema import Result

_SPEC = importlib.util.spec_from_file_location(
    "import_device_runs", Path(__file__).resolve().parents[1] / "scripts" / "import_device_runs.py")
imp = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(imp)


def _res(method: str, i: int, score: float = 1.0) -> Result:
    return Result(f"niah_single-4096-{i:04d}", "niah_single", 4096, method, "m", score, "contains", "x", ("x",),
                  4096, 1.0, 10, 10, 0.1)


def _folder(path: Path, archived: list[Result], plain: list[Result], invocations: list) -> None:
    path.mkdir(parents=True)
    log = ResultLog(path / RESULTS_FILE)
    for r in archived:
        log.append(r)
    if archived:
        log.archive()
    for r in plain:
        log.append(r)
    (path / "config.json").write_text(json.dumps({"identity": {"model": "m"}, "invocations": invocations}))


def test_seeded_device_folder_adds_only_its_new_rows_and_is_idempotent(tmp_path: Path) -> None:
    committed = [_res("full", i) for i in range(3)]
    new = [_res("tokenselect@kept=0.25", i, 0.0) for i in range(2)]
    dest = tmp_path / "runs"
    _folder(dest / "run_a", committed, [], [{"methods": ["full"]}])
    # the device's copy: the committed archive seeded in, its new rows in the plain file (and one
    # committed row again, as a resumed queue may hold)
    dev = tmp_path / "dev"
    _folder(dev / "x" / "run_a", committed, new + committed[:1], [{"methods": ["full"]}, {"methods": ["ts"]}])
    tar = tmp_path / "leaderboard_runs.tar.gz"
    with tarfile.open(tar, "w:gz") as tf:
        tf.add(dev / "x", arcname=".")
    assert imp.import_runs(tar, dest) == 2
    got = ResultLog(dest / "run_a" / RESULTS_FILE).load()
    assert got == committed + new  # nothing lost, nothing twice, committed order first
    assert not (dest / "run_a" / RESULTS_FILE).exists()  # archived
    assert len(json.loads((dest / "run_a" / "config.json").read_text())["invocations"]) == 2
    data = (dest / "run_a" / (RESULTS_FILE + ".gz")).read_bytes()
    assert imp.import_runs(tar, dest) == 0
    assert (dest / "run_a" / (RESULTS_FILE + ".gz")).read_bytes() == data


def test_unknown_folders_need_new_and_identity_must_match(tmp_path: Path) -> None:
    dest = tmp_path / "runs"
    dest.mkdir()
    _folder(tmp_path / "dev" / "run_b", [], [_res("full", 0)], [{"methods": ["full"]}])
    assert imp.import_runs(tmp_path / "dev", dest) == 0 and not (dest / "run_b").exists()
    assert imp.import_runs(tmp_path / "dev", dest, create=True) == 1
    with pytest.raises(SystemExit, match="not in"):
        imp.import_runs(tmp_path / "dev", dest, only=["run_c"])
    other = tmp_path / "dev2" / "run_b"
    _folder(other, [], [_res("full", 1)], [])
    (other / "config.json").write_text(json.dumps({"identity": {"model": "other"}, "invocations": []}))
    before = (dest / "run_b" / (RESULTS_FILE + ".gz")).read_bytes()
    with pytest.raises(SystemExit, match="another identity"):
        imp.import_runs(tmp_path / "dev2", dest)
    assert (dest / "run_b" / (RESULTS_FILE + ".gz")).read_bytes() == before  # refused before writing
