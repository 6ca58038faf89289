"""Multi-host training through JAX's multi-controller runtime, and the TPU-pod launcher.

Two CPU processes (4 fake devices each, gloo collectives, coordinator on 127.0.0.1) train
with the same config as a single 8-device process; each reads only its rows of every global
batch, so the logged losses must match step for step.
"""

import os
import socket
import subprocess
import sys

import pytest

from tests.train_helpers import REPO, built_sample, read_metrics, reference_run, script_env

N = 4  # the same run as test_train_resume's reference


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
    ref_wd, ref = reference_run(N)
    data_dir = built_sample()
    addr = f"127.0.0.1:{free_port()}"
    wd = str(tmp_path / "run")
    procs = []
    for pid in range(2):
        args = [sys.executable, str(REPO / "tests" / "train_helpers.py"), wd, f"train.num_steps={N}",
                f"data.data_dir={data_dir}", f"distributed.coordinator_address={addr}",
                "distributed.num_processes=2", f"distributed.process_id={pid}"]
        log = open(tmp_path / f"p{pid}.log", "w")
        procs.append((subprocess.Popen(args, env=script_env(4), stdout=log, stderr=subprocess.STDOUT), log))
    for p, log in procs:
        try:
            p.wait(timeout=420)
        finally:
            if p.poll() is None:
                p.kill()
            log.close()
    logs = [(tmp_path / f"p{i}.log").read_text() for i in range(2)]
    assert [p.returncode for p, _ in procs] == [0, 0], "\n".join(x[-3000:] for x in logs)
    got = read_metrics(wd)
    assert sorted(got) == list(range(1, N + 1)), logs[0][-3000:]
    for s in got:
        assert got[s] == pytest.approx(ref[s], rel=1e-5, abs=1e-5), (s, got, ref)
    assert read_metrics(wd, "train/macro_count") == read_metrics(ref_wd, "train/macro_count")


def test_tpu_pod_script_runs_the_command_on_every_worker(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "gcloud").write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done > "$GCLOUD_ARGS"\n')
    (fake / "gcloud").chmod(0o755)
    env = dict(os.environ, PATH=f"{fake}{os.pathsep}{os.environ['PATH']}", GCLOUD_ARGS=str(tmp_path / "args"),
               TPU_NAME="pod-1", TPU_ZONE="us-east5-a")
    script = str(REPO / "launch" / "tpu_pod.sh")
    r = subprocess.run([script, "--repo", "/srv/sa", "--", "python", "launch/train.py", "--workdir", "/mnt/x y"],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    args = (tmp_path / "args").read_text().splitlines()
    assert args[:7] == ["compute", "tpus", "tpu-vm", "ssh", "pod-1", "--zone", "us-east5-a"]
    assert "--worker=all" in args
    remote = args[args.index("--command") + 1]
    # the remote shell must see the workdir with its space as one argument
    out = subprocess.run(["bash", "-c", remote.replace("cd /srv/sa && ", "printf '<%s>' ")],
                         capture_output=True, text=True).stdout
    assert remote.startswith("cd /srv/sa && ") and out == "<python><launch/train.py><--workdir></mnt/x y>"
    env.pop("TPU_NAME")
    r = subprocess.run([script, "--", "ls"], env=env, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == "error: tpu_pod.sh: no TPU name (--name or TPU_NAME)"


@pytest.mark.parametrize("env,expected", [
    ({}, False),
    ({"SLURM_JOB_ID": "17"}, False),  # a batch job with one task is one process
    ({"SLURM_JOB_ID": "17", "SLURM_NTASKS": "1"}, False),
    ({"SLURM_JOB_ID": "17", "SLURM_NTASKS": "4"}, True),
    ({"SLURM_JOB_ID": "17", "SLURM_NPROCS": "2(x3)"}, True),
    ({"OMPI_COMM_WORLD_SIZE": "1"}, False),
    ({"OMPI_COMM_WORLD_SIZE": "8"}, True),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, False),  # a single-host TPU VM
    ({"TPU_WORKER_HOSTNAMES": "t1k-w-0,t1k-w-1"}, True),
    ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2:8080"}, True),
])
def test_auto_initialize_only_when_the_launcher_says_more_than_one_process(monkeypatch, env, expected):
    from socialalign_jax.train import loop
    for k in ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_NPROCS", "OMPI_COMM_WORLD_SIZE",
              "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert loop._multi_process_environment() is expected


def test_auto_initialize_after_jax_started_runs_single_process_and_yes_is_a_one_line_error(monkeypatch, capsys):
    """In-process callers (notebooks, these tests) have started JAX; a late initialize would raise
    JAX's multi-paragraph RuntimeError. auto warns and goes on; yes is a UserError."""
    import jax
    from ml_collections import config_dict
    from socialalign_jax.core.errors import UserError
    from socialalign_jax.train import loop
    jax.devices()  # the backend is started
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    cfg = config_dict.ConfigDict({"distributed": {"initialize": "auto", "coordinator_address": "",
                                                  "num_processes": 0, "process_id": -1}})
    loop.setup_distributed(cfg)
    assert "already started" in capsys.readouterr().err
    cfg.distributed.initialize = "yes"
    with pytest.raises(UserError, match="before any JAX computation"):
        loop.setup_distributed(cfg)
