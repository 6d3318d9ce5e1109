"""The launch scripts in examples/: they parse, and what they would launch is a valid lmforge command."""

import os
import shlex
import subprocess
from pathlib import Path

from lmforge import config as C
from lmforge.cli import _OWN_OPTIONS, _parser, _split_args

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "examples" / "slurm" / "train_multinode.sbatch"


def test_sbatch_script_parses():
    r = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _launch(tmp_path, run: Path) -> list[str]:
    """Run the script with stand-ins for scontrol, srun and torchrun: the torchrun command line it makes."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stubs = {
        "scontrol": 'printf "gpu-a17\\ngpu-a18\\n"',  # scontrol show hostnames: one host per line
        "srun": 'while [[ $1 == --* ]]; do shift; done; exec "$@"',  # srun's own options, then the command
        "torchrun": 'printf "%s\\n" "$@"',
    }
    for name, body in stubs.items():
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = dict(
        os.environ,
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        SLURM_JOB_NODELIST="gpu-a[17-18]",
        SLURM_NNODES="2",
        SLURM_CPUS_PER_TASK="32",
        SLURM_JOB_ID="4242",
        SLURM_JOB_NAME="lmforge",
        DATA=str(tmp_path / "shards"),
        RUN=str(run),
    )
    env.pop("OMP_NUM_THREADS", None)
    r = subprocess.run(["bash", str(SBATCH)], capture_output=True, text=True, env=env, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def test_sbatch_script_launches_one_torchrun_per_node_meeting_on_the_first(tmp_path):
    run = tmp_path / "runs" / "gpt2"
    argv = _launch(tmp_path, run)
    launcher, lmforge_argv = argv[: argv.index("-m")], argv[argv.index("-m") + 2 :]
    assert shlex.join(launcher) == (
        "--nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint gpu-a17:29500 --rdzv-id 4242"
    )
    assert argv[argv.index("-m") + 1] == "lmforge"
    # what each process runs is a valid `lmforge train` command: its options parse into a valid config
    args, extra = _split_args(_parser(), lmforge_argv)
    assert (args.data, args.out, args.preset) == (str(tmp_path / "shards"), str(run), "gpt2")
    cfg = C.merge(C.preset(args.preset), C.parse_overrides(extra, cli_options=_OWN_OPTIONS["train"]))
    cfg.validate()
    assert cfg.train.parallel == "fsdp" and cfg.train.tokens_per_step == 524288
    # a run with checkpoints is resumed (a requeued or resubmitted job continues)
    (run / "checkpoints" / "step_0001000").mkdir(parents=True)
    argv = _launch(tmp_path, run)
    assert argv[argv.index("-m") + 1 :] == ["lmforge", "train", "--resume", str(run)]
