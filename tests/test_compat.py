"""Run directories written by earlier versions of lmforge keep working: generate, eval and resume."""

import json
import shutil
from pathlib import Path

import pytest
from conftest import run_cli

OLD_RUN = Path(__file__).parent / "data" / "run-4ad76cb"  # made by commit 4ad76cb, see its README.md


@pytest.fixture
def old_run(tmp_path) -> Path:
    """A copy of the old run (tests must not touch the shipped one), its data.json pointing at the copied shards."""
    shutil.copytree(OLD_RUN, tmp_path / "old")
    run = tmp_path / "old" / "run"
    info = json.loads((run / "data.json").read_text())
    info["shards"] = str(tmp_path / "old" / "shards")
    (run / "data.json").write_text(json.dumps(info))
    return run


def test_old_run_evaluates_as_before(old_run, capsys):
    code, out, err = run_cli(capsys, "eval", old_run, "--data", old_run.parent / "bisect.txt")
    assert code == 0, err
    old_line = "tokens 2,076 | loss 5.7581 | perplexity 316.74 | bits/byte 5.5045"  # the old code's line
    assert out.strip().startswith(old_line + " | top-1 ") and out.strip().endswith("%")  # + accuracy (issue 17)


def test_old_run_generates_as_before(old_run, capsys):
    code, out, err = run_cli(capsys, "generate", old_run, "--prompt", "def ", "--max-new-tokens", 10, "--greedy")
    assert code == 0, err
    assert out == "def" + " " * 4 + "(" * 7 + "\n"  # the old code's greedy continuation


def test_old_run_resumes_as_before(old_run, capsys):
    code, out, err = run_cli(capsys, "train", "--resume", old_run)
    assert code == 0, err
    last = json.loads((old_run / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 6 and last["tokens"] == 384
    # The old code resumed from the same checkpoint reached exactly this validation loss (fp32 on CPU).
    assert last["val_loss"] == pytest.approx(5.757629871368408, rel=1e-5)
    assert (old_run / "checkpoints" / "step_0000006" / "manifest.json").is_file()
