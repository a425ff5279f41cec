"""configs/multi_gpu_train.yaml for real: torchrun, 2 CPU processes, gloo, DistributedDataParallel, tiny preset."""

import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, tiny_parser
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()), reason="needs gloo"
)

# test only: each rank saves its own final weights and last loss, after training
DUMP = """\
+training:
  - "$torch.save({'network': @network.module.state_dict(), 'loss': @train#trainer.state.output[0]['loss']},
      @bundle_root + '/rank' + str(dist.get_rank()) + '.pt')"
"""


@pytest.fixture(scope="module")
def ddp_run(demo_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    (root / "models").mkdir()
    torch.manual_seed(0)  # a random tiny mask autoencoder: this test is about the training plumbing
    torch.save(tiny_parser().get_parsed_content("autoencoder_def").state_dict(), root / "models" / "autoencoder.pt")
    (root / "dump.yaml").write_text(DUMP)
    files = [str(ROOT / "configs" / f) for f in ("train.yaml", "multi_gpu_train.yaml", "tiny.yaml")]
    files.append(str(root / "dump.yaml"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "monai.bundle", "run", "training", "--config_file", "[" + ",".join(f"'{f}'" for f in files) + "]"]
    cmd += ["--meta_file", str(ROOT / "configs" / "metadata.json")]
    cmd += ["--logging_file", str(ROOT / "configs" / "logging.conf"), "--bundle_root", str(root)]
    cmd += ["--dataset", "cvc", "--dataset_dir", str(demo_root / "cvc")]
    cmd += ["--max_iterations", "4", "--val_interval", "2", "--batch_size", "4"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return root, proc.stdout + proc.stderr


def test_both_ranks_train_and_gradients_are_synchronised(ddp_run):
    root, _ = ddp_run
    ranks = [torch.load(root / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    # different shards and noise draws: the ranks' losses differ ...
    assert ranks[0]["loss"] != ranks[1]["loss"]
    # ... yet after 4 steps the weights are bit-identical: DDP averaged the gradients (and the scale factor agreed)
    w0, w1 = ({k: v for k, v in r["network"].items() if torch.is_tensor(v)} for r in ranks)  # not _extra_state
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)
    assert float(w0["scale_factor"]) > 0
    ckpt = torch.load(root / "models" / "sdseg_checkpoint_epoch=2.pt", weights_only=False)
    assert all(torch.equal(ckpt["network"][k], w0[k]) for k in w0)  # bare module keys, no "module." prefix
    assert ckpt["trainer"]["iteration"] == 4
    assert {int(s["step"]) for s in ckpt["optimizer"]["state"].values()} == {4}


def test_rank0_alone_logs_validates_and_saves(ddp_run):
    root, log = ddp_run
    assert sorted(p.name for p in (root / "models").iterdir()) == [
        "autoencoder.pt",
        "model.pt",
        "sdseg_checkpoint_epoch=1.pt",  # keep_checkpoints: 2
        "sdseg_checkpoint_epoch=2.pt",
    ]
    assert len(re.findall(r"Saved checkpoint at epoch: \d", log)) == 2  # once per epoch, not once per rank
    assert len(re.findall(r"Epoch\[\d\] Metrics -- val_mean_dice", log)) == 2
    events = list((root / "eval" / "logs").glob("events.out.tfevents.*"))
    assert events and len({p.name.split(".")[4] for p in events}) == 1  # one writer process (pid)
    steps = []
    for path in events:
        acc = EventAccumulator(str(path))
        acc.Reload()
        if "train_loss" in acc.Tags()["scalars"]:
            steps += [e.step for e in acc.Scalars("train_loss")]
    assert sorted(steps) == [1, 2, 3, 4]  # the loss of every iteration, logged once
