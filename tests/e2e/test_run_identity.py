"""Issue 31, item 2: every checkpoint records the run's identity (the resolved config's hash without the
sections a resume may change, the seed, the training data's and the teacher's fingerprints), and
`--resume` refuses a checkpoint of another run in one line. A sweep copied a checkpoint (with its
.sha256) from a run of the same config with another seed: it was resumed, exit 0, the other run's weights."""

from __future__ import annotations

import shutil

import pytest
import torch

from helpers import ASSETS, one_line_error, tiny_overrides, train_argv
from hld.cli import main
from hld.config import load_config
from hld.train.checkpoint import CKPT_NAME, atomic_save


@pytest.mark.slow  # one run and three resumes
def test_a_checkpoint_of_another_seed_is_refused_and_an_older_one_without_identity_resumes(
    tmp_path, capsys, finished_run_copy
):
    mine, other = finished_run_copy, tmp_path / "seed1"  # mine: the shared run, of the default seed 0
    assert load_config("smoke", tiny_overrides()).train.seed == 0
    assert main(train_argv(other, "train.seed=1")) == 0
    capsys.readouterr()
    own = (mine / "checkpoints" / CKPT_NAME).read_bytes()
    for f in (other / "checkpoints").iterdir():  # the checkpoint and its checksum record, as a copy would
        shutil.copy2(f, mine / "checkpoints" / f.name)
    line = one_line_error(capsys, [*train_argv(mine, "train.seed=0"), "--resume"], "belongs to another run")
    assert "seed is 1, this run's 0" in line, line

    ck = torch.load(other / "checkpoints" / CKPT_NAME, weights_only=True)
    assert ck["identity"]["seed"] == 1 and ck["identity"]["teacher"] and ck["identity"]["data"]
    # the same seed, another config: the hash names it
    hashed = dict(ck, identity={**ck["identity"], "seed": 0})
    atomic_save(hashed, mine / "checkpoints" / CKPT_NAME, checked=True)
    one_line_error(capsys, [*train_argv(mine, "train.seed=0", "train.lr=0.002"), "--resume"], "differs from")
    line = one_line_error(capsys, [*train_argv(mine, "train.seed=0"), "--resume"], "resolved config (hash)")

    # a checkpoint of an hld before identities (its own, the identity dropped): resumed, not refused
    (mine / "checkpoints" / CKPT_NAME).write_bytes(own)
    older = torch.load(mine / "checkpoints" / CKPT_NAME, weights_only=True)
    del older["identity"]
    atomic_save(older, mine / "checkpoints" / CKPT_NAME, checked=True)
    assert main([*train_argv(mine, "train.seed=0"), "--resume"]) == 0


@pytest.mark.slow
def test_resume_after_the_data_changed_is_refused(tmp_path, capsys):
    """11: `--resume` after the data file changed continued on other text."""
    data = tmp_path / "data"
    data.mkdir()
    for f in (ASSETS / "c4").glob("c4-train.*.json.gz"):
        shutil.copy(f, data / f.name)
    spec = f"data.train={data}/c4-train.*.json.gz"
    run = tmp_path / "run"
    assert main(train_argv(run, spec)) == 0
    first = sorted(data.glob("*.json.gz"))[0]
    shutil.copy(ASSETS / "c4" / "c4-validation.00000-of-00001.json.gz", first)  # same name, other text
    one_line_error(capsys, [*train_argv(run, spec), "--resume"], "the training data differs")
