"""The SLURM path and the rendezvous: sbatch -> srun -> the torchrun script, under stubs.

Expectations: inside a faked 8-node SLURM job (SLURM_JOB_ID 4242, nodes gpu-node-[01-08]) the
sbatch script runs one srun task per node inside the container image, and the torchrun script
rendezvouses on the first node (gpu-node-01) at port 20000 + 4242 % 20000 = 24242 with this node's
SLURM_NODEID, launching exactly the command its dry run prints; a multi-node rendezvous on
localhost or on nothing is refused naming MASTER_ADDR; 4, 8 and 16 nodes validate with
DP = nodes x 8 / (TP x PP).
"""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "examples" / "scripts"


def executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def recording_python(path: Path) -> Path:
    code = "import json, sys; print(json.dumps(sys.argv[1:]))"
    return executable(path, f'#!/bin/sh\nexec {sys.executable} -I -S -c "{code}" "$@"\n')


def slurm_env(tmp: Path, **extra):
    """A faked 8-node job: stub srun (records its flags, then runs the task on node 3) and scontrol."""
    bin_dir = tmp / "bin"
    executable(bin_dir / "srun", f"""#!/bin/sh
printf '%s\\n' "$@" > {tmp / 'srun_args'}
while [ $# -gt 0 ] && [ "$1" != bash ]; do shift; done
SLURM_NODEID=3 SLURM_PROCID=3 exec "$@"
""")
    executable(bin_dir / "squeue", "#!/bin/sh\necho 3:59:00\n")  # the job's time left
    executable(bin_dir / "scontrol", "#!/bin/sh\n[ \"$1 $2\" = 'show hostnames' ] || exit 1\n"
               "for i in 01 02 03 04 05 06 07 08; do echo gpu-node-$i; done\n")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "MASTER_", "NNODES", "NODE_RANK", "EXIT_DURATION"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", SLURM_JOB_ID="4242", SLURM_NNODES="8",
               SLURM_JOB_NODELIST="gpu-node-[01-08]", SLURM_SUBMIT_DIR=str(ROOT), CONTAINER_IMAGE="/images/pt.sqsh",
               MOCK="1", OMP_NUM_THREADS="1", CHECKPOINT_PATH=str(tmp / "ckpt"), TENSORBOARD_LOGS_PATH=str(tmp / "tb"))
    env.update(extra)
    return env


@pytest.mark.parametrize("shape", ["llama2_7b", "120l"])
def test_sbatch_runs_the_dry_runs_command_through_srun(tmp_path, shape):
    sbatch = SCRIPTS / f"sbatch_{shape}_prores.sh"
    header = [line for line in sbatch.read_text().splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --nodes=8" in header and "#SBATCH --ntasks-per-node=1" in header
    assert any(line.startswith("#SBATCH --output=") and "%j" in line for line in header)  # one log per job

    stub = recording_python(tmp_path / "stub" / "python")
    proc = subprocess.run(["bash", str(sbatch)], env=slurm_env(tmp_path, PYTHON=str(stub)),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    launched = json.loads(proc.stdout.strip().splitlines()[-1])
    srun = (tmp_path / "srun_args").read_text().splitlines()
    assert "--container-image=/images/pt.sqsh" in srun and f"--container-mounts={ROOT}:{ROOT}" in srun
    assert "--ntasks-per-node=1" in srun and srun[-2:] == ["bash", str(SCRIPTS / f"pretrain_{shape}_prores.sh")]
    # 3:59 left minus the 15-minute margin: Megatron saves and exits before SLURM's time limit.
    assert launched[launched.index("--exit-duration-in-mins") + 1] == str(3 * 60 + 59 - 15)
    assert "--exit-signal-handler" in launched
    rendezvous = dict(zip(launched[2:12:2], launched[3:13:2]))
    assert rendezvous == {"--nproc_per_node": "8", "--nnodes": "8", "--node_rank": "3",
                          "--master_addr": "gpu-node-01", "--master_port": "24242"}

    # The same job in dry-run mode, with the real interpreter: the report's command is the launch.
    dry = subprocess.run(["bash", str(sbatch)], env=slurm_env(tmp_path, PYTHON=sys.executable, DRY_RUN="1",
                                                              DRY_RUN_ARGS="--json"),
                         capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0, dry.stderr[-3000:]
    report = json.loads(dry.stdout[dry.stdout.index("{"):])
    assert report["argv"][0] == sys.executable and report["argv"][1:] == launched
    assert report["launcher"]["outer"].startswith("srun (SLURM job 4242, 8 nodes")
    assert report["launcher"]["per_node"].endswith("-m torch.distributed.run ")
    v = report["versions"]
    assert (v["torch"], v["megatron_core"], v["interpreter"]) == (torch.__version__, "0.19.2", sys.executable)
    assert v["transformer_engine"] is None  # not installed here; the report says so


def test_sbatch_needs_a_container_image(tmp_path):
    env = slurm_env(tmp_path)
    env.pop("CONTAINER_IMAGE")
    proc = subprocess.run(["bash", str(SCRIPTS / "sbatch_llama2_7b_prores.sh")], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "set CONTAINER_IMAGE" in proc.stderr
    assert not (tmp_path / "srun_args").exists()


@pytest.mark.parametrize("addr", [None, "localhost", "127.0.0.1"])
def test_a_multi_node_rendezvous_on_localhost_is_refused(tmp_path, addr):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
    env.update(MOCK="1", DRY_RUN="1", NNODES="2", PYTHON=sys.executable, CHECKPOINT_PATH=str(tmp_path / "c"))
    if addr is not None:
        env["MASTER_ADDR"] = addr
    proc = subprocess.run(["bash", str(SCRIPTS / "pretrain_120l_prores.sh")], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"MASTER_ADDR={addr or '(unset)'} with NNODES=2" in proc.stderr and proc.stdout == ""


def test_the_dry_run_refuses_it_too():
    from prores_megatron.training import dry_run as dr

    with pytest.raises(dr.DryRunError, match="MASTER_ADDR=localhost with 2 nodes"):
        dr.run(["--dry-run-nnodes", "2", "--dry-run-nproc-per-node", "8", "--dry-run-master-addr", "localhost",
                "--num-layers", "2"])


@pytest.mark.parametrize("shape, nodes, dp", [("llama2_7b", 4, 32), ("llama2_7b", 16, 128),
                                              ("120l", 4, 2), ("120l", 16, 8)])
def test_node_counts_validate_with_their_data_parallel_size(tmp_path, shape, nodes, dp):
    """7B: TP 1, PP 1, so DP = 8 n; 120 layers: TP 2, PP 8, so DP = 8 n / 16 (8 nodes: the
    launch-script tests)."""
    from prores_megatron.training import dry_run as dr

    stub = recording_python(tmp_path / "stub" / "python")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
    env.update(MOCK="1", DRY_RUN="1", NNODES=str(nodes), MASTER_ADDR="node001", PYTHON=str(stub),
               CHECKPOINT_PATH=str(tmp_path / "c"), TENSORBOARD_LOGS_PATH=str(tmp_path / "tb"))
    proc = subprocess.run(["bash", str(SCRIPTS / f"pretrain_{shape}_prores.sh")], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    argv = json.loads(proc.stdout)[2:]  # after "-m prores_megatron.training.dry_run"
    with mock.patch.dict(os.environ, {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}):  # what the script exports
        report = dr.run(argv)
    assert report["launch"]["world_size"] == 8 * nodes and report["parallel"]["data"] == dp
