"""The station's screen (`leukedge station serve`): JSON API, page, thumbnails, reviews, /metrics,
/healthz, safety (escaping, token, paths from URLs), read-only database access while the station
writes, the review export round trip through `leukedge preprocess`, one real socket, and -- where
Debian's chromium and chromium-driver are installed -- a real browser.

The database is filled by a real station run (Rust preprocessing + the packaged default model on
ONNX Runtime, no PyTorch) over synthetic cells and, where present, real C-NMC sample cells.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import shutil
import socket
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("starlette")
pytest.importorskip("prometheus_client")
pytest.importorskip("httpx")
pytest.importorskip("leukedge._native", reason="Rust core leukedge._native is not built")

from click.testing import CliRunner  # noqa: E402
from conftest import sample_cell_paths  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from leukedge.cli.station import open_predictor, predict_fn, station_group  # noqa: E402
from leukedge.station import Station, StationSettings  # noqa: E402
from leukedge.station import dashboard as dash  # noqa: E402
from leukedge.station import reviews as rv  # noqa: E402
from leukedge.station.web import WebSettings, create_app  # noqa: E402
from leukedge.synth import make_cell, write_bmp, write_png  # noqa: E402

XSS_SAMPLE = "<img src=x onerror=alert(1)>&amp;"
ODD_NAME = 'cell "quoted" <b>bold</b\x08 & \u00fc.png'.replace("/", "")  # HTML, a control character, non-ASCII
BASE = "http://127.0.0.1"


# -- a database filled by a real station run ---------------------------------------------------------------
@pytest.fixture(scope="module")
def predictor():
    from rich.console import Console

    pred, info = open_predictor(None, "onnxruntime", fallback=False, device="cpu", threads=2, batch_size=16,
                                console=Console(stderr=True, quiet=True))
    yield pred, info
    pred.close()


def fill_folder(watch: Path, n_synthetic: int = 6, n_real: int = 8) -> None:
    """Two samples: ``slide_A`` (real sample cells where present, else synthetic) and one whose folder
    name is HTML, with an odd file name and a corrupt file."""
    a = watch / "slide_A"
    b = watch / XSS_SAMPLE
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    real = sample_cell_paths()[:n_real]
    for p in real:
        shutil.copyfile(p, a / p.name)
    for i in range(n_synthetic + (n_real - len(real))):
        write_bmp(a / f"syn_{i:02d}.bmp", make_cell(i % 2, seed=10 + i, size=160))
    for i in range(4):
        write_png(b / f"cell_{i}.png", make_cell(i % 2, seed=50 + i, size=120))
    write_png(b / ODD_NAME, make_cell(1, seed=99, size=120))
    (b / "broken.bmp").write_bytes(b"BM this is not an image")


def run_station(watch: Path, predictor, **kw) -> Station:
    pred, info = predictor
    base = dict(watch_dir=watch, db_path=watch / ".leukedge-station.sqlite", batch_size=8, max_wait_ms=100,
                settle_ms=150, poll_ms=25, heartbeat_s=0.2, once=True)
    base.update(kw)
    st = Station(StationSettings(**base), predict_fn(pred), info, install_signal_handlers=False)
    st.run()
    return st


@pytest.fixture(scope="module")
def filled(tmp_path_factory, predictor) -> Path:
    watch = tmp_path_factory.mktemp("web_station") / "incoming"
    fill_folder(watch)
    run_station(watch, predictor)
    return watch


def make_client(db: Path, token: str | None = None, reviews: Path | None = None) -> TestClient:
    s = WebSettings(db_path=db, reviews_path=reviews or rv.default_reviews_path(db), token=token)
    return TestClient(create_app(s), base_url=BASE)


def db_rows(db: Path, table: str = "results") -> list[tuple]:
    c = sqlite3.connect(db)
    try:
        return c.execute(f"SELECT * FROM {table} ORDER BY id").fetchall()
    except sqlite3.OperationalError:  # not created yet
        return []
    finally:
        c.close()


@pytest.fixture()
def fresh(tmp_path, filled) -> Path:
    """A copy of the filled station (database + folder) that a test may review or tamper with."""
    watch = tmp_path / "incoming"
    shutil.copytree(filled, watch)
    db = watch / ".leukedge-station.sqlite"
    c = sqlite3.connect(db)  # the copied rows name the original folder: point them at the copy
    c.execute("UPDATE results SET path = replace(path, ?, ?)", (str(filled), str(watch)))
    if any(r[1] == "path_bytes" for r in c.execute("PRAGMA table_info(results)")):  # exact name bytes, where kept
        old, new = os.fsencode(filled), os.fsencode(watch)
        for rid, raw in c.execute("SELECT id, path_bytes FROM results WHERE path_bytes IS NOT NULL").fetchall():
            c.execute("UPDATE results SET path_bytes = ? WHERE id = ?", (bytes(raw).replace(old, new, 1), rid))
    c.execute("UPDATE runs SET watch_dir = ?", (str(watch),))
    c.commit()
    c.close()
    return watch


# -- API ------------------------------------------------------------------------------------------------------
def test_samples_counts_blast_fraction_and_wilson_interval(filled):
    db = filled / ".leukedge-station.sqlite"
    client = make_client(db)
    d = client.get("/api/samples").json()
    by = {s["sample_id"]: s for s in d["samples"]}
    assert set(by) == {"slide_A", XSS_SAMPLE}
    truth = sqlite3.connect(db)
    for sid, s in by.items():
        ok, blasts, err = truth.execute(
            "SELECT SUM(status='ok'), SUM(status='ok' AND is_blast=1), SUM(status='error') FROM results "
            "WHERE sample_id = ? AND superseded = 0", (sid,)).fetchone()
        assert (s["n_ok"], s["n_blasts"], s["n_error"]) == (ok, blasts, err or 0)
        assert s["blast_fraction"] == pytest.approx(blasts / ok)
        lo, hi = s["blast_ci95"]
        assert lo <= s["blast_fraction"] <= hi
        # Wilson by its textbook formula
        z, p = 1.959963984540054, blasts / ok
        c = (p + z * z / (2 * ok)) / (1 + z * z / ok)
        h = z * math.sqrt(p * (1 - p) / ok + z * z / (4 * ok * ok)) / (1 + z * z / ok)
        assert (lo, hi) == pytest.approx((max(0, c - h), min(1, c + h)))
        assert s["last_result_at"] > time.time() - 600
    truth.close()
    assert by[XSS_SAMPLE]["n_error"] == 1 and by[XSS_SAMPLE]["n_ok"] + by[XSS_SAMPLE]["n_rejected"] == 5


def test_wilson_interval_known_values():
    assert dash.wilson_interval(0, 0) is None
    lo, hi = dash.wilson_interval(0, 10)
    assert lo == 0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = dash.wilson_interval(50, 100)
    assert (lo, hi) == pytest.approx((0.4038, 0.5962), abs=1e-4)


def test_status_values_are_counted_generically(fresh):
    """A status the page does not know (the quality gate's ``rejected``) is counted, not dropped."""
    db = fresh / ".leukedge-station.sqlite"
    c = sqlite3.connect(db)
    # the current schema only allows ok/error: rebuild it without the CHECK, as a later schema may
    sql = c.execute("SELECT sql FROM sqlite_master WHERE name = 'results'").fetchone()[0]
    c.executescript("PRAGMA foreign_keys=OFF; ALTER TABLE results RENAME TO r_old;"
                    + sql.replace("CHECK (status IN ('ok', 'error'))", "")
                    + "; INSERT INTO results SELECT * FROM r_old; DROP TABLE r_old;")
    c.execute("UPDATE results SET status = 'rejected', probability = NULL, is_blast = NULL "
              "WHERE id = (SELECT MIN(id) FROM results WHERE status = 'ok' AND sample_id = 'slide_A')")
    c.commit()
    c.close()
    d = make_client(db).get("/api/overview").json()
    a = next(s for s in d["samples"] if s["sample_id"] == "slide_A")
    assert a["n_rejected"] == 1 and a["counts"]["rejected"] == 1
    assert d["status_counts"]["rejected"] == 1


def _schema_with_issue25_columns(db: Path) -> None:
    """Make the database look like the station's later schema: status ``rejected`` allowed, and the
    columns ``reason``, ``stain_fallback``, ``ood_score``, ``path_bytes`` (the page reads them where present)."""
    c = sqlite3.connect(db)
    sql = c.execute("SELECT sql FROM sqlite_master WHERE name = 'results'").fetchone()[0]
    c.executescript("PRAGMA foreign_keys=OFF; ALTER TABLE results RENAME TO r_old;"
                    + sql.replace("CHECK (status IN ('ok', 'error'))", "")
                    + "; INSERT INTO results SELECT * FROM r_old; DROP TABLE r_old;")
    have = {r[1] for r in c.execute("PRAGMA table_info(results)")}
    for col in ("reason TEXT", "stain_fallback INTEGER", "ood_score REAL", "path_bytes BLOB"):
        if col.split()[0] not in have:  # a station of that schema has them already
            c.execute(f"ALTER TABLE results ADD COLUMN {col}")
    c.commit()
    c.close()


def test_later_schema_rejected_ood_first_and_exact_name_bytes(fresh, native):
    """With the quality gate's columns: a cell rejected as out of distribution comes first with its
    reason; a file whose name is not UTF-8 (kept as ``path_bytes``, ``path`` escaped) still has its
    thumbnail and is exported by its real name."""
    db = fresh / ".leukedge-station.sqlite"
    _schema_with_issue25_columns(db)
    c = sqlite3.connect(db)
    ok = [r for r in c.execute("SELECT id, path FROM results WHERE status = 'ok' AND sample_id = 'slide_A' ORDER BY id")]
    ood_id, bytes_id, stain_id = ok[0][0], ok[1][0], ok[2][0]
    c.execute("UPDATE results SET status = 'rejected', probability = NULL, label = NULL, is_blast = NULL, "
              "reason = 'out of distribution: energy -1.2 is above the threshold', ood_score = -1.2 WHERE id = ?", (ood_id,))
    c.execute("UPDATE results SET stain_fallback = 1 WHERE id = ?", (stain_id,))
    raw = os.fsencode(ok[1][1]).replace(b".bmp", b"_\xff.bmp").replace(b".png", b"_\xff.png")
    os.rename(ok[1][1], raw)
    c.execute("UPDATE results SET path = ?, path_bytes = ? WHERE id = ?",
              (raw.decode("utf-8", "backslashreplace"), raw, bytes_id))
    c.commit()
    c.close()
    client = make_client(db)
    cells = client.get("/api/cells", params={"limit": 100}).json()["cells"]
    assert cells[0]["id"] == ood_id and cells[0]["ood"] and cells[0]["reason"].startswith("out of distribution")
    by = {x["id"]: x for x in cells}
    assert by[stain_id]["stain_fallback"] and not by[bytes_id]["ood"]
    assert by[bytes_id]["name"].endswith("_\\xff" + Path(ok[1][1]).suffix)
    r = client.get(f"/api/cells/{bytes_id}/thumbnail.png")
    assert r.status_code == 200 and native.decode(r.content).shape[2] == 3
    d = client.get("/api/overview").json()
    assert d["status_counts"]["rejected"] == 1
    assert next(s for s in d["samples"] if s["sample_id"] == "slide_A")["n_rejected"] == 1
    assert post_review(client, bytes_id, "hem").status_code == 201
    out = fresh.parent / "reviewed"
    res = CliRunner().invoke(station_group, ["export-reviews", "--db", str(db), "-o", str(out)])
    assert res.exit_code == 0, res.output
    (copied,) = list((out / "training_data" / "fold_0" / "hem").iterdir())
    assert copied.read_bytes() == Path(os.fsdecode(raw)).read_bytes()


def test_live_panel_of_a_stopped_station(filled):
    d = make_client(filled / ".leukedge-station.sqlite").get("/api/live").json()
    st = d["station"]
    assert st["running"] is False and st["state"] == "stopped"
    assert st["backend"].startswith("onnxruntime") and st["model_id"]
    assert st["latency_p50_ms"] > 0 and st["latency_p95_ms"] >= st["latency_p50_ms"]
    assert st["uptime_s"] is None and st["heartbeat_age_s"] >= 0


def test_cells_ood_and_borderline_first_and_filter(fresh):
    db = fresh / ".leukedge-station.sqlite"
    c = sqlite3.connect(db)
    c.execute("ALTER TABLE results ADD COLUMN ood INTEGER")  # the issue-25 flag, as an optional column
    ids = [r[0] for r in c.execute("SELECT id FROM results WHERE status = 'ok' ORDER BY id")]
    c.execute("UPDATE results SET probability = 0.99 WHERE status = 'ok'")
    c.execute("UPDATE results SET probability = 0.52 WHERE id = ?", (ids[3],))
    c.execute("UPDATE results SET ood = 1 WHERE id = ?", (ids[5],))
    c.commit()
    c.close()
    client = make_client(db)
    cells = client.get("/api/cells").json()["cells"]
    assert [x["id"] for x in cells[:2]] == [ids[5], ids[3]]
    assert cells[0]["ood"] and cells[1]["borderline"] and not cells[2]["borderline"]
    only = client.get("/api/cells", params={"sample": XSS_SAMPLE}).json()["cells"]
    assert only and {x["sample_id"] for x in only} == {XSS_SAMPLE}
    # shown as stored: as is, or with the control character escaped where the station escapes names
    assert {ODD_NAME, ODD_NAME.replace("\x08", "\\x08")} & {x["name"] for x in only}
    assert client.get("/api/cells", params={"limit": "x"}).status_code == 400
    newest = client.get("/api/cells", params={"order": "newest", "limit": 100}).json()["cells"]
    assert [x["done_at"] for x in newest] == sorted((x["done_at"] for x in newest), reverse=True)
    assert client.get("/api/cells", params={"order": "random"}).status_code == 400


# -- thumbnails and paths from URLs ------------------------------------------------------------------------------
def test_thumbnail_by_result_id(filled, native):
    client = make_client(filled / ".leukedge-station.sqlite")
    cells = client.get("/api/cells", params={"limit": 100}).json()["cells"]
    ok = next(x for x in cells if x["status"] == "ok")
    r = client.get(f"/api/cells/{ok['id']}/thumbnail.png")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    img = native.decode(r.content)
    assert max(img.shape[:2]) <= 128 and img.mean() > 0
    bad = next(x for x in cells if x["status"] == "error")
    assert client.get(f"/api/cells/{bad['id']}/thumbnail.png").status_code == 404
    assert client.get("/api/cells/999999/thumbnail.png").status_code == 404


@pytest.mark.parametrize("url", [
    "/static/..%2F..%2Fpyproject.toml", "/static/%2Fetc%2Fpasswd", "/static/../../pyproject.toml",
    "/api/cells/..%2F..%2Fetc%2Fpasswd/thumbnail.png", "/api/cells/%2Fetc%2Fpasswd/thumbnail.png",
    "/etc/passwd", "/static/index.html/..", "/api/cells/1/../../../etc/passwd", "/..%2F..%2Fetc%2Fpasswd",
])
def test_paths_in_urls_get_404(filled, url):
    r = make_client(filled / ".leukedge-station.sqlite").get(url)
    assert r.status_code == 404
    assert b"root:" not in r.content and b"[project]" not in r.content


def test_a_tampered_path_outside_the_watch_folder_is_not_served(fresh):
    """Even the database cannot make the server read outside the folders the station watched."""
    db = fresh / ".leukedge-station.sqlite"
    outside = fresh.parent / "secret.png"
    write_png(outside, make_cell(1, seed=1, size=64))
    digest = hashlib.sha256(outside.read_bytes()).hexdigest()
    c = sqlite3.connect(db)
    rid = c.execute("SELECT MIN(id) FROM results WHERE status = 'ok'").fetchone()[0]
    c.execute("UPDATE results SET path = ?, sha256 = ? WHERE id = ?", (str(outside), digest, rid))
    c.commit()
    c.close()
    assert make_client(db).get(f"/api/cells/{rid}/thumbnail.png").status_code == 404


def test_a_file_replaced_after_classification_has_no_thumbnail(fresh):
    db = fresh / ".leukedge-station.sqlite"
    client = make_client(db)
    cell = next(x for x in client.get("/api/cells", params={"limit": 100}).json()["cells"] if x["status"] == "ok")
    path = sqlite3.connect(db).execute("SELECT path FROM results WHERE id = ?", (cell["id"],)).fetchone()[0]
    write_png(path, make_cell(0, seed=1234, size=90))
    assert client.get(f"/api/cells/{cell['id']}/thumbnail.png").status_code == 404


# -- escaping ------------------------------------------------------------------------------------------------
def test_html_in_sample_ids_and_file_names_is_data_not_markup(filled):
    client = make_client(filled / ".leukedge-station.sqlite")
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "default-src 'none'" in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    assert b"onerror" not in page.content  # the page is static: data only arrives as JSON
    r = client.get("/api/overview")
    assert r.headers["content-type"].startswith("application/json")
    assert r.content.isascii()  # odd characters travel as \u escapes
    assert XSS_SAMPLE in {s["sample_id"] for s in r.json()["samples"]}
    # the script never feeds data to innerHTML / document.write
    js = client.get("/static/app.js").text
    assert "innerHTML" not in js and "document.write" not in js and "insertAdjacentHTML" not in js
    assert "textContent" in js


def test_display_text_of_undecodable_names():
    raw = os.fsdecode(b"cell_\xff\xfe.bmp")
    assert dash.display_text(raw) == "cell_\\xff\\xfe.bmp"
    assert dash.display_text(b"cell_\xff.bmp") == "cell_\\xff.bmp"
    assert dash.display_text("ü<>") == "ü<>"


# -- reviews -----------------------------------------------------------------------------------------------------
def post_review(client, rid, label, reviewer="Dr. Test", token=None, **kw):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    headers.update(kw.pop("headers", {}))
    return client.post("/api/reviews", json={"result_id": rid, "label": label, "reviewer": reviewer},
                       headers=headers, **kw)


def test_reviews_go_to_their_own_table_and_never_touch_results(fresh):
    db = fresh / ".leukedge-station.sqlite"
    client = make_client(db)
    before = db_rows(db)
    cells = [x for x in client.get("/api/cells", params={"limit": 100}).json()["cells"] if x["status"] == "ok"]
    a, b, c = cells[:3]
    assert post_review(client, a["id"], "all" if a["is_blast"] else "hem").status_code == 201      # agrees
    assert post_review(client, b["id"], "hem" if b["is_blast"] else "all").status_code == 201      # disagrees
    assert post_review(client, c["id"], "not a cell", reviewer="<script>x</script>").status_code == 201
    assert post_review(client, c["id"], "maybe").status_code == 400
    assert post_review(client, c["id"], "all", reviewer="   ").status_code == 400
    assert post_review(client, 999999, "all").status_code == 404
    assert db_rows(db) == before  # the model's results are untouched
    assert not [r for r in sqlite3.connect(db).execute("SELECT name FROM sqlite_master WHERE name = 'reviews'")]
    reviews = db_rows(rv.default_reviews_path(db), "reviews")
    assert len(reviews) == 3
    d = client.get("/api/overview").json()["agreement"]
    assert d == {"reviewed": 3, "compared": 2, "agree": 1, "not_a_cell": 1, "agreement": 0.5,
                 "confusion": d["confusion"]}
    assert sum(d["confusion"].values()) == 2
    # a second opinion is appended; the newest one counts
    assert post_review(client, a["id"], "hem" if a["is_blast"] else "all", reviewer="Dr. Two").status_code == 201
    assert len(db_rows(rv.default_reviews_path(db), "reviews")) == 4
    assert client.get("/api/overview").json()["agreement"]["agree"] == 0
    listed = client.get("/api/reviews").json()
    assert listed["count"] == 4 and listed["reviews"][0]["reviewer"] == "Dr. Two"
    unreviewed = client.get("/api/cells", params={"unreviewed": "1", "limit": 100}).json()["cells"]
    assert {x["id"] for x in unreviewed}.isdisjoint({a["id"], b["id"], c["id"]})
    # export --cells carries the reviewed label beside the model's
    out = fresh.parent / "cells.json"
    res = CliRunner().invoke(station_group, ["export", "--db", str(db), "-o", str(out), "--cells"])
    assert res.exit_code == 0, res.output
    rows = {r["sha256"]: r for r in json.loads(out.read_text())}
    assert sum(r["review_label"] is not None for r in rows.values()) == 3
    assert {r["review_label"] for r in rows.values()} == {None, "all", "hem", "not_a_cell"}
    assert all(r["label"] in ("all", "hem", None) for r in rows.values())


def test_writes_need_the_token_json_and_same_origin(fresh):
    db = fresh / ".leukedge-station.sqlite"
    client = make_client(db, token="s3cret")
    assert client.get("/api/config").json()["token_required"] is True
    rid = next(x["id"] for x in client.get("/api/cells").json()["cells"] if x["status"] == "ok")
    assert post_review(client, rid, "all").status_code == 401
    assert post_review(client, rid, "all", token="wrong").status_code == 401
    r = client.post("/api/reviews", data={"result_id": str(rid), "label": "all", "reviewer": "x"},
                    headers={"Authorization": "Bearer s3cret"})
    assert r.status_code == 415  # a cross-site HTML form cannot post JSON
    assert post_review(client, rid, "all", token="s3cret",
                       headers={"Origin": "http://evil.example"}).status_code == 403
    assert not rv.default_reviews_path(db).exists()  # nothing was written
    assert post_review(client, rid, "all", token="s3cret", headers={"Origin": BASE}).status_code == 201
    # reads stay open; a foreign Host header (DNS rebinding) is refused
    assert client.get("/api/samples").status_code == 200
    assert client.get("/api/samples", headers={"Host": "evil.example"}).status_code == 400


# -- metrics and health ----------------------------------------------------------------------------------------
def test_metrics_in_prometheus_format(filled):
    from prometheus_client.parser import text_string_to_metric_families

    db = filled / ".leukedge-station.sqlite"
    r = make_client(db).get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    fams = {f.name: f for f in text_string_to_metric_families(r.text)}
    n, n_err = sqlite3.connect(db).execute("SELECT COUNT(*), SUM(status='error') FROM results").fetchone()
    cells = fams["leukedge_station_cells"].samples
    assert sum(s.value for s in cells) == n
    assert sum(s.value for s in cells if s.labels["status"] == "error") == n_err
    assert {s.labels["label"] for s in cells if s.labels["status"] == "ok"} <= {"all", "hem"}
    model_id = cells[0].labels["model_id"]
    assert model_id and all(s.labels["model_id"] == model_id for s in cells)
    lat = {s.name: s for s in fams["leukedge_station_latency_seconds"].samples if s.name.endswith("_count")}
    assert lat["leukedge_station_latency_seconds_count"].value == n
    assert lat["leukedge_station_latency_seconds_count"].labels["model_id"] == model_id
    batch = [s for s in fams["leukedge_station_batch_size"].samples if s.name.endswith("_count")]
    assert batch[0].value >= 1
    assert fams["leukedge_station_up"].samples[0].value == 0   # the run is over
    assert fams["leukedge_station_queue_length"].samples[0].value == 0
    assert fams["leukedge_station_database_readable"].samples[0].value == 1
    assert fams["leukedge_station_info"].samples[0].labels["backend"].startswith("onnxruntime")


def test_healthz_and_a_missing_or_damaged_database(tmp_path, filled):
    ok = make_client(filled / ".leukedge-station.sqlite").get("/healthz")
    assert ok.status_code == 200 and ok.json()["station"] == "down"
    missing = make_client(tmp_path / "nope.sqlite")
    r = missing.get("/api/overview")
    assert r.status_code == 503 and "does not exist" in r.json()["error"]
    assert missing.get("/healthz").status_code == 503
    assert missing.get("/").status_code == 200  # the page itself loads and says so
    m = missing.get("/metrics")
    assert m.status_code == 200 and "leukedge_station_database_readable 0.0" in m.text
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database at all" * 100)
    r = make_client(junk).get("/api/samples")
    assert r.status_code == 503 and "damaged" in r.json()["error"]


# -- read-only while the station writes ---------------------------------------------------------------------------
def test_the_page_reads_read_only_while_the_station_writes(tmp_path, predictor):
    """A station classifies a folder that keeps filling while the API and /metrics are polled without
    pause: every response succeeds, counts only grow, the station finishes every file, and the
    server's connections cannot write."""
    watch = tmp_path / "live"
    (watch / "s1").mkdir(parents=True)
    db = watch / ".leukedge-station.sqlite"
    for i in range(8):
        write_png(watch / "s1" / f"c{i}.png", make_cell(i % 2, seed=i, size=96))
    pred, info = predictor
    st = Station(StationSettings(watch_dir=watch, db_path=db, batch_size=4, max_wait_ms=50, settle_ms=100,
                                 poll_ms=20, heartbeat_s=0.1, max_files=24), predict_fn(pred), info,
                 install_signal_handlers=False)
    t = threading.Thread(target=st.run)
    t.start()

    def writer() -> None:  # 16 more cells arrive while the page is being read
        for i in range(8, 24):
            write_png(watch / "s1" / f"c{i}.png", make_cell(i % 2, seed=i, size=96))
            time.sleep(0.05)

    w = threading.Thread(target=writer)
    w.start()
    client = make_client(db)
    seen, errors = [], []
    t_end = time.time() + 120
    while t.is_alive() and time.time() < t_end:
        for url in ("/api/overview", "/metrics", "/api/cells"):
            r = client.get(url)
            starting = r.status_code == 503 and (not db.exists() or "being created" in r.text)
            if r.status_code != 200 and not starting:
                errors.append((url, r.status_code, r.text[:200]))
            if url == "/api/overview" and r.status_code == 200:
                seen.append(sum(r.json()["status_counts"].values()))
    st.request_stop("test over")  # only matters if the 120 s guard ran out
    w.join(timeout=30)
    t.join(timeout=30)
    assert not t.is_alive()
    assert not errors, errors
    assert seen == sorted(seen) and st.summary is not None and st.summary.processed == 24
    assert client.get("/api/overview").json()["status_counts"]["ok"] == 24
    web = client.app.state.web
    with web.reading() as conn, pytest.raises(sqlite3.OperationalError, match="readonly"):
        conn.execute("DELETE FROM results")


# -- review export round trip -------------------------------------------------------------------------------------
def test_reviewed_cells_export_as_a_cnmc_folder_that_preprocess_reads(fresh, tmp_path):
    from leukedge.cli import main as cli_main
    from leukedge.data import discover

    db = fresh / ".leukedge-station.sqlite"
    client = make_client(db)
    cells = [x for x in client.get("/api/cells", params={"limit": 100}).json()["cells"] if x["status"] == "ok"]
    labels = {}
    for k, x in enumerate(cells[:7]):
        lab = ("all", "hem", "not_a_cell")[k % 3]
        assert post_review(client, x["id"], lab).status_code == 201
        labels[x["id"]] = lab
    out = tmp_path / "reviewed"
    res = CliRunner().invoke(station_group, ["export-reviews", "--db", str(db), "-o", str(out)])
    assert res.exit_code == 0, res.output
    n_all = sum(v == "all" for v in labels.values())
    n_hem = sum(v == "hem" for v in labels.values())
    recs = discover(out)
    assert len(recs) == n_all + n_hem
    assert sum(r.label == 1 for r in recs) == n_all and sum(r.label == 0 for r in recs) == n_hem
    assert all(r.subject and r.subject.startswith("S") and r.fold == 0 for r in recs)
    manifest = (out / rv.MANIFEST_NAME).read_text()
    assert "Dr. Test" in manifest
    # byte-identical copies of the reviewed files
    for r in recs:
        src = next(row[1] for row in csv.reader(io.StringIO(manifest)) if row and row[0] == str(r.path.relative_to(out)))
        assert r.path.read_bytes() == Path(src).read_bytes()
    cache = tmp_path / "cache"
    res = CliRunner().invoke(cli_main, ["preprocess", str(out), "-o", str(cache), "--size", "64", "--stain", "none"])
    assert res.exit_code == 0, res.output
    images = np.load(cache / "images.npy")
    assert images.shape[0] == n_all + n_hem

    rows = list(csv.DictReader((cache / "manifest.csv").open()))
    assert sorted(int(r["label"]) for r in rows) == sorted([1] * n_all + [0] * n_hem)


def test_export_reviews_without_reviews_says_so(filled):
    res = CliRunner().invoke(station_group, ["export-reviews", "--db", str(filled / ".leukedge-station.sqlite"),
                                             "-o", str(filled.parent / "x")])
    assert res.exit_code == 1 and "no reviews" in res.output


# -- serving -----------------------------------------------------------------------------------------------------
def test_serve_refuses_other_interfaces_without_the_flag(filled):
    res = CliRunner().invoke(station_group, ["serve", "--db", str(filled / ".leukedge-station.sqlite"),
                                             "--host", "0.0.0.0"])
    assert res.exit_code == 2 and "--allow-remote" in res.output


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """The app on a real socket (uvicorn in a thread)."""

    def __init__(self, settings: WebSettings) -> None:
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=self.port,
                                                    log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        t_end = time.time() + 20
        while not self.server.started:
            assert time.time() < t_end and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def test_real_socket(filled):
    import urllib.request

    pytest.importorskip("uvicorn")
    db = filled / ".leukedge-station.sqlite"
    with Served(WebSettings(db_path=db, reviews_path=rv.default_reviews_path(db))) as url:
        with urllib.request.urlopen(url + "/healthz", timeout=10) as r:
            assert r.status == 200 and json.loads(r.read())["ok"] is True
        with urllib.request.urlopen(url + "/", timeout=10) as r:
            assert b'<script src="/static/app.js"' in r.read()
        with urllib.request.urlopen(url + "/api/samples", timeout=10) as r:
            assert len(json.loads(r.read())["samples"]) == 2


# -- a real browser ----------------------------------------------------------------------------------------------
def _browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,800"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(driver), options=opts)


def test_page_in_a_real_browser_while_the_station_classifies(tmp_path, predictor):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = _browser()
    watch = tmp_path / "incoming"
    fill_folder(watch, n_synthetic=4, n_real=4)
    db = watch / ".leukedge-station.sqlite"
    pred, info = predictor
    st = Station(StationSettings(watch_dir=watch, db_path=db, batch_size=4, max_wait_ms=50, settle_ms=100,
                                 poll_ms=20, heartbeat_s=0.2), predict_fn(pred), info, install_signal_handlers=False)
    t = threading.Thread(target=st.run)
    t.start()
    shots = Path(os.environ.get("LEUKEDGE_SCREENSHOT_DIR") or tmp_path)
    try:
        with Served(WebSettings(db_path=db, reviews_path=rv.default_reviews_path(db))) as url:
            browser.get(url + "/")
            wait = WebDriverWait(browser, 30)

            def ok_count(sample: str) -> int:
                # read in one script: the page replaces its rows on every poll
                rows = browser.execute_script(
                    "return Array.from(document.querySelectorAll('#samples tbody tr'))"
                    ".map(tr => Array.from(tr.cells).map(td => td.textContent))")
                for cells in rows:  # ok + rejected (a quality gate may set a cell aside): every image read
                    if cells and cells[0] == sample:
                        return sum(int(cells[k].replace(",", "") or 0) for k in (1, 2))
                return -1

            wait.until(lambda b: ok_count("slide_A") == 8 and ok_count(XSS_SAMPLE) == 5)
            assert browser.find_element(By.ID, "state").text == "running"
            # the HTML sample id is shown as text, and no element was injected
            assert browser.execute_script("return document.querySelectorAll('img[src=\"x\"]').length") == 0
            assert XSS_SAMPLE in browser.find_element(By.ID, "samples").text
            # the page updates by itself when new cells arrive
            for i in range(3):
                write_png(watch / "slide_A" / f"late_{i}.png", make_cell(1, seed=300 + i, size=100))
            wait.until(lambda b: ok_count("slide_A") == 11)
            wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".cell img")) >= 5)
            wait.until(lambda b: b.execute_script(
                "return Array.from(document.querySelectorAll('.cell img')).filter(i => i.complete && i.naturalWidth > 0).length") >= 5)
            browser.find_element(By.ID, "reviewer").send_keys("Dr. Browser")
            # one script finds the first card and clicks its "hem" button (the grid is redrawn every 4 s)
            rid = int(browser.execute_script(
                "const c = document.querySelector('.cell'); c.querySelector(\"button[data-label='hem']\").click();"
                " return c.dataset.id;"))
            wait.until(lambda b: rv.default_reviews_path(db).exists()
                       and len(db_rows(rv.default_reviews_path(db), "reviews")) == 1)
            row = db_rows(rv.default_reviews_path(db), "reviews")[0]
            assert row[3] == rid and row[5] == "hem" and row[6] == "Dr. Browser"
            wait.until(lambda b: "1 reviewed" in b.find_element(By.ID, "agreement").text)
            browser.execute_script("window.scrollTo(0, 0)")
            browser.save_screenshot(str(shots / "station_page_1280x800.png"))
            browser.set_window_size(1366, 768)
            browser.save_screenshot(str(shots / "station_page_1366x768.png"))
            browser.set_window_size(390, 844)
            time.sleep(0.5)
            assert browser.execute_script("return document.documentElement.scrollWidth") <= 390  # no sideways scrolling
            browser.save_screenshot(str(shots / "station_page_390x844.png"))
            st.request_stop("test done")
            t.join(timeout=30)
            wait.until(lambda b: b.find_element(By.ID, "state").text == "stopped")
            assert (shots / "station_page_1280x800.png").stat().st_size > 10_000
    finally:
        st.request_stop("test done")
        t.join(timeout=30)
        browser.quit()


def test_serve_command_on_a_damaged_database_with_remote_access(tmp_path):
    """`leukedge station serve` as a user starts it: a damaged database is named at start and on the
    page (503), other interfaces print a warning, and the server stops on SIGTERM."""
    import signal
    import subprocess
    import sys
    import urllib.error
    import urllib.request

    junk = tmp_path / "station.sqlite"
    junk.write_bytes(b"garbage, not SQLite" * 50)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "leukedge", "station", "serve", "--db", str(junk), "--host", "0.0.0.0",
                             "--port", str(port), "--allow-remote", "--token", "t0k"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        t_end = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)
                raise AssertionError("healthz answered 200 on a damaged database")
            except urllib.error.HTTPError as exc:
                assert exc.code == 503 and b"damaged" in exc.read()
                break
            except urllib.error.URLError:
                assert proc.poll() is None and time.time() < t_end, proc.communicate()
                time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "warning: listening on 0.0.0.0" in err and "damaged" in err and "station page: http://0.0.0.0:" in err
