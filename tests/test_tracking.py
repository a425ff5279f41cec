"""Experiment tracking: `--tracking mlflow` (MONAI's MLFlowHandler, local SQLite store) and TensorBoard logs."""

import pytest
import torch
from conftest import run_bundle, tiny_parser
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

mlflow = pytest.importorskip("mlflow")
pytest.importorskip("sqlalchemy")  # mlflow-skinny keeps runs in SQLite only with sqlalchemy + alembic


@pytest.fixture(scope="module")
def tracked_run(demo_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("tracked")
    (root / "models").mkdir()
    torch.manual_seed(0)  # a random tiny mask autoencoder: this test is about the logging
    torch.save(tiny_parser().get_parsed_content("autoencoder_def").state_dict(), root / "models" / "autoencoder.pt")
    args = ["--bundle_root", str(root), "--dataset", "cvc", "--dataset_dir", str(demo_root / "cvc")]
    args += ["--max_iterations", "4", "--val_interval", "2", "--batch_size", "4", "--tracking", "mlflow"]
    run_bundle("training", ["train.yaml", "tiny.yaml"], root, *args)
    return root


def tensorboard_scalars(log_dir, tag):
    values = {}
    for path in log_dir.glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(path))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            values.update({e.step: e.value for e in acc.Scalars(tag)})
    return values


def test_mlflow_run_records_loss_and_dice(tracked_run):
    out = tracked_run / "eval"  # output_dir
    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlruns.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("monai_experiment").experiment_id])
    assert run.info.status == "FINISHED"
    loss = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train_loss")}
    assert sorted(loss) == [1, 2, 3, 4]  # every iteration
    tb_loss = tensorboard_scalars(out / "logs", "train_loss")
    assert loss == pytest.approx(tb_loss)  # the same numbers as TensorBoard's
    dice = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val_mean_dice")}
    assert sorted(dice) == [1, 2] and all(0 <= v <= 1 for v in dice.values())  # each validation
    assert run.data.params["epoch_length"] == "2"
    assert [a.path for a in client.list_artifacts(run.info.run_id)][0].startswith("config_")  # the executed config


def test_tensorboard_logs_under_output_dir(tracked_run):
    log_dir = tracked_run / "eval" / "logs"
    assert sorted(tensorboard_scalars(log_dir, "train_loss")) == [1, 2, 3, 4]
    assert sorted(tensorboard_scalars(log_dir, "val_mean_dice")) == [1, 2]
