"""Coverage-guided fuzzing with atheris (libFuzzer) on a bounded budget.

Each harness under tests/fuzz/ runs in its own process (libFuzzer exits the process
when it is done) for a fixed number of runs with a fixed seed, so a failure can be
reproduced; PYFLANNEL_FUZZ_SEED and PYFLANNEL_FUZZ_RUNS explore further by hand.
Any crash (an exception other than the target's refusal type, or a failed oracle)
leaves a crash-* file whose content is printed."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

HARNESSES = Path(__file__).resolve().parent.parent / "fuzz"

pytestmark = pytest.mark.skipif(importlib.util.find_spec("atheris") is None,
                                reason="atheris is not installed (pip install -e '.[test]' "
                                       "installs it on Linux x86_64)")


@pytest.mark.parametrize("harness", ["atheris_cni.py", "atheris_netconf.py"])
def test_harness_finds_nothing(harness: str, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    runs = os.environ.get("PYFLANNEL_FUZZ_RUNS", "20000")
    seed = os.environ.get("PYFLANNEL_FUZZ_SEED", "1")
    proc = subprocess.run(
        [sys.executable, str(HARNESSES / harness), str(corpus), f"-runs={runs}",
         f"-seed={seed}", "-max_total_time=60", "-max_len=4096", "-print_final_stats=1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    crashes = sorted(tmp_path.glob("crash-*")) + sorted(tmp_path.glob("timeout-*"))
    found = [f"{c.name}: {c.read_bytes()[:300]!r}" for c in crashes]
    assert proc.returncode == 0 and not found, (found, proc.stderr[-3000:])
    assert "Done" in proc.stderr and "INFO: Instrumenting pyflannel" in proc.stderr
