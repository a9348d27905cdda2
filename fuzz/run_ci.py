"""Bounded fuzz run for CI (``.ci/run``): at most ``--seconds`` (default 60) of libFuzzer on
``fuzz/fuzz_native.py``, seeded from ``fuzz/corpus`` and, when present, real C-NMC cells in
``../shared/data/cnmc_sample`` (turned into small seeds in a temporary folder, never copied into the
repository). Fails (non-zero exit) on any crash: an unexpected exception, a Rust panic, an abort, a
hang past 10 s on one input, or RSS above 1 GB. Prints the number of inputs run.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SAMPLE = REPO.parent / "shared" / "data" / "cnmc_sample"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("--rss-limit-mb", type=int, default=1024)
    a = ap.parse_args()
    try:
        import atheris  # noqa: F401
    except ImportError:
        print("fuzz: atheris is not installed (pip install -e '.[fuzz]'; x86-64 Linux wheels only)")
        return 1
    with tempfile.TemporaryDirectory(prefix="leukedge-fuzz-") as tmp:
        new, real = Path(tmp) / "new", Path(tmp) / "real"
        new.mkdir()
        dirs = [str(new), str(HERE / "corpus")]
        if SAMPLE.is_dir():
            subprocess.run([sys.executable, str(HERE / "make_corpus.py"), str(real), "--real", str(SAMPLE)], check=True)
            dirs.append(str(real))
        # libFuzzer's own -max_total_time includes loading the corpus; keep the whole run within --seconds
        cmd = [sys.executable, str(HERE / "fuzz_native.py"), f"-max_total_time={max(1, a.seconds - 5)}",
               f"-rss_limit_mb={a.rss_limit_mb}", "-timeout=10", "-max_len=65536", "-len_control=0", "-print_final_stats=1",
               f"-artifact_prefix={tmp}/crash-", *dirs]
        print("+", " ".join(cmd), flush=True)
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=a.seconds + 120)
        log = res.stdout + res.stderr
        runs = re.findall(r"stat::number_of_executed_units:\s*(\d+)", log)
        done = re.findall(r"#(\d+)\s+DONE", log)
        n = int(runs[-1]) if runs else (int(done[-1]) if done else 0)
        crashed = res.returncode != 0 or "==ERROR" in log or "Uncaught Python exception" in log
        if crashed:
            print(log[-6000:])
            for art in Path(tmp).glob("crash-*"):
                print(f"crash input: {art.name} ({art.stat().st_size} bytes): {art.read_bytes()[:64]!r}...")
            print(f"fuzz: FAILED after {n} inputs (exit {res.returncode})")
            return 1
        print(f"fuzz: {n} inputs in about {a.seconds} s, no crash, RSS limit {a.rss_limit_mb} MB")
        return 0


if __name__ == "__main__":
    sys.exit(main())
