"""`leukedge infer --ray local` (a Ray Data job on a local Ray instance, loopback only) gives exactly the rows
of plain `leukedge infer`: same files in the same order, same labels and errors, probabilities to 1e-6."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

pytest.importorskip("onnxruntime")
pytest.importorskip("leukedge._native", reason="the Rust extension is not built (pip install -e .)")
pytest.importorskip("ray.data", reason='Ray Data is not installed (pip install "leukedge[ray]")')

from leukedge.cli.infer import infer_cmd  # noqa: E402
from leukedge.infer import default_model_path  # noqa: E402
from leukedge.infer.ray import RayProgress, _Classify, run_ray_inference, write_parquet  # noqa: E402


@pytest.fixture(scope="module")
def cells(infer_cells):
    return infer_cells


def _jsonl(p: Path) -> list[dict]:
    return [json.loads(line) for line in p.read_text().splitlines()]


def _same_rows(a: list[dict], b: list[dict]) -> None:
    assert [r["path"] for r in a] == [r["path"] for r in b]
    for x, y in zip(a, b):
        for k in x:
            if k == "probability" and x[k] is not None and y[k] is not None:
                assert abs(x[k] - y[k]) <= 1e-6, (x, y)
            else:
                assert x[k] == y[k], (k, x, y)


@pytest.mark.timeout(240)
def test_ray_local_gives_the_rows_of_plain_infer(cells, cnmc_sample, tmp_path):
    sources = [str(cells), str(cnmc_sample)]
    plain, ray_out = tmp_path / "plain.jsonl", tmp_path / "ray.jsonl"
    r = CliRunner().invoke(infer_cmd, [*sources, "-o", str(plain), "--backend", "onnxruntime"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(infer_cmd, [*sources, "--ray", "local", "-o", str(ray_out), "--backend", "onnxruntime"])
    assert r.exit_code == 0, r.output
    assert "files/s" in r.output and "75 ok, 0 rejected, 3 failed" in " ".join(r.output.split())
    a, b = _jsonl(plain), _jsonl(ray_out)
    assert len(a) == 23 + 3 + 52 == len(b)
    assert sum(row["status"] != "ok" for row in b) == 3
    assert {row["true_label"] for row in b if "cnmc" in row["path"]} == {"all", "hem"}
    _same_rows(a, b)
    stats = json.loads((tmp_path / "ray.jsonl.stats.json").read_text())
    assert stats["n_files"] == 78 and stats["n_error"] == 3 and stats["ray"]["actors"] >= 1
    assert stats["preprocess_hash"] == json.loads((plain.parent / "plain.jsonl.stats.json").read_text())["preprocess_hash"]

    # The same from Python, into Parquet, with progress (files/s, failed count).
    seen: list[RayProgress] = []
    pq_out = tmp_path / "ray.parquet"
    res = run_ray_inference(None, sources, pq_out, address="local", backend="onnxruntime", progress=seen.append)
    assert seen and seen[-1].done == seen[-1].total == 78 and seen[-1].failed == 3 and seen[-1].files_per_s > 0
    assert all(p.done <= q.done for p, q in zip(seen, seen[1:]))
    import pyarrow.parquet as pq

    _same_rows(a, pq.read_table(pq_out).to_pylist())
    _same_rows(a, [x.to_dict() for x in res.results])


def test_parquet_and_csv_writers_agree(tmp_path):
    from leukedge.infer import FileResult, write_results

    rows = [FileResult("a.png", 0.25, "hem", "ok", None, "UID_1", "hem", False),
            FileResult("b.png", None, None, "error", "b.png: not an image", None, None, False)]
    import pyarrow.parquet as pq

    got = pq.read_table(write_parquet(rows, tmp_path / "r.parquet")).to_pylist()
    assert got == [r.to_dict() for r in rows]
    with write_results(rows, tmp_path / "r.csv").open() as fh:
        assert [d["path"] for d in csv.DictReader(fh)] == [g["path"] for g in got]


def test_actor_refuses_a_model_with_other_preprocessing():
    with pytest.raises(RuntimeError, match="different files"):
        _Classify(str(default_model_path()), None, "onnxruntime", "cpu", "auto", 1, "0" * 64, 8)


def test_bad_output_suffix_refused_before_the_job(cells, tmp_path):
    with pytest.raises(ValueError, match="csv, .jsonl or .parquet"):
        run_ray_inference(None, [str(cells)], tmp_path / "out.txt", address="local")
