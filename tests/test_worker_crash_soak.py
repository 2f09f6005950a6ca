"""The crash soak, short (issue 16): one job through 3 worker SIGKILLs and 2 training-child SIGKILLs at
random moments, a new worker started after each. It succeeds with every step exactly once, at most
save_steps steps repeated per crash, one adapter, and no two attempts ever interleaved. The long run
(20 + 5 kills) is bench/crash_soak.py; this runs the same code with real API and worker processes."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import crash_soak
from bench.common import read_json


@pytest.mark.slow
def test_a_job_survives_worker_and_child_kills_without_losing_a_step(
    tmp_path: Path, models_dir: Path
) -> None:
    out = tmp_path / "soak.json"
    argv = ["--out", str(out), "--models-dir", str(models_dir), "--worker-kills", "3", "--child-kills", "2"]
    argv += ["--steps", "300", "--save-steps", "5", "--min-delay", "3", "--max-delay", "9", "--seed", "1"]
    with pytest.raises(SystemExit) as ended:
        crash_soak.main(argv)
    result = read_json(out)
    assert ended.value.code == 0, result
    checks = result["checks"]
    assert checks["succeeded"] and checks["every_step_once"] and checks["one_adapter"]
    assert checks["repeated_within_save_steps"] and checks["attempts_never_interleaved"]
    assert checks["all_kills_done"] and result["final"]["lost_attempts"] == 5
