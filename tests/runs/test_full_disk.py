"""A real full disk: the launchers run on a small tmpfs of their own, and every failure is one line.

Injecting OSError(ENOSPC) at our write layer (tests/runs/test_faults.py) misses what the libraries
underneath raise when the disk is really full: the Rust tokenizers an `Exception("... (os error
28)")`, array_record a `RuntimeError("write() failed: No space left on device ...")`, and Orbax
a `ValueError("RESOURCE_EXHAUSTED ... [os_error_code='28']")` from every writer thread at once.
So each launcher here runs in a private mount namespace (`unshare -rm`, no root needed where
unprivileged user namespaces are allowed; skipped where they are not) with a tmpfs too small for
what it writes, and the test reads stderr and what was left on that disk.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tests.train_helpers import MAX_LENGTH, REPO, built_sample, script_env


def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0


pytestmark = pytest.mark.skipif(not _unshare_works(), reason="needs `unshare -rm` (user and mount namespaces)")


def on_small_disk(tmp_path, size: str, argv: list[str], timeout: int = 900):
    """Run `python argv...` with a `size` tmpfs mounted at tmp_path/disk -> (rc, stderr lines, files left there)."""
    disk, listing = tmp_path / "disk", tmp_path / "left.txt"
    disk.mkdir()
    script = (f'mount -t tmpfs -o size={size} tmpfs "{disk}" || exit 97; "$@"; rc=$?; '
              f'(cd "{disk}" && find . -mindepth 1 | sort) > "{listing}"; exit $rc')
    r = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", sys.executable, *argv], cwd=REPO,
                       env=script_env(1), capture_output=True, text=True, timeout=timeout)
    assert r.returncode != 97, r.stderr
    left = listing.read_text().split() if listing.exists() else None
    return r.returncode, [ln for ln in r.stderr.splitlines() if ln.strip()], left


def test_building_a_dataset_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path):
    from socialalign_jax.data.sample import load_sample_dir

    rc, err, left = on_small_disk(tmp_path, "300k", [str(REPO / "launch" / "build_dataset.py"), "--source",
                                                      "socialweibo", "--input", str(load_sample_dir()), "--out",
                                                      str(tmp_path / "disk" / "data")])
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {tmp_path}/disk/data/socialweibo/default/1.0.0: no space left on device; "
                             "it needs about "), err
    assert left == [], left  # not even the empty directories tfds made


def _train(workdir, *extra):
    return [str(REPO / "launch" / "train.py"), "--workdir", str(workdir), "--noprogress",
            "--config.model.weights=random:tiny-qwen2", f"--config.data.max_length={MAX_LENGTH}",
            "--config.data.events_per_batch=2", "--config.loss.max_response_tokens=24",
            "--config.train.num_steps=2", "--config.train.eval_at_end=false", "--config.train.generate_at_end=false",
            *extra]


def test_saving_the_tokenizer_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path):
    # The run builds its dataset into the workdir, so it first saves the model's tokenizer there (~11 MB).
    rc, err, left = on_small_disk(tmp_path, "2m", _train(tmp_path / "disk" / "run"))
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {tmp_path}/disk/run/tokenizer: no space left on device; it needs about "), err
    assert err[0].split("it needs about ")[1].startswith("10.9 MB"), err  # tokenizer.json, indented
    assert left == ["./run"], left  # no tokenizer directory, no temporary one, no lock


@pytest.mark.parametrize("async_save", ["true", "false"])
def test_checkpointing_on_a_full_disk_is_one_line_and_leaves_no_checkpoint(tmp_path, async_save):
    # The dataset is built elsewhere: the workdir on the small disk holds only what training writes,
    # and the first checkpoint (~1.3 MB of adapters and optimizer state) does not fit.
    rc, err, left = on_small_disk(tmp_path, "700k", _train(
        tmp_path / "disk" / "run", f"--config.data.data_dir={built_sample()}", "--config.train.tensorboard=false",
        f"--config.train.async_checkpoint={async_save}"))
    assert rc == 2 and len(err) == 1, err  # none of Orbax's thread tracebacks
    run = f"error: {tmp_path}/disk/run/"
    saving = "no space left on device while saving the checkpoint; a checkpoint needs about 1.3 MB"
    if async_save == "false":
        assert err[0].startswith(run + "checkpoints/1: " + saving), err
    else:  # the save runs beside step 2, whose metrics row may be the write that finds the disk full first
        assert err[0].startswith(run + "checkpoints/1: " + saving) or err[0].startswith(
            run + "metrics.jsonl: no space left on device; it needs about"), err
    assert not [p for p in left if p.startswith("./run/checkpoints/") and p.split("/")[3].isdigit()], left
