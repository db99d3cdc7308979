"""The loggers (growrun/loggers/): what each backend's own reader finds equals the run's
metrics.csv / growth.csv cell for cell (TensorBoard: as float32), one value per tag and step, also after a kill and a
resume; the config reaches the HParams dashboard; a missing package is a one-line refusal; a
logger that fails mid-run is dropped and the run goes on."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import struct
import sys
from collections import Counter
from pathlib import Path

import helpers_zygote as zygote
import numpy as np
import pytest
from helpers_cli import read_csv

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.plugins.hparams import plugin_data_pb2  # noqa: E402
from tensorboard.util import tensor_util  # noqa: E402

from growrun.faults import ENV as KILL_ENV  # noqa: E402
from growrun.loggers.tensorboard import TensorBoard, keep_until  # noqa: E402

# An MLP on 8x8 synthetic images grown by TINY at steps 4, 6, 8, 10 (4 steps per epoch), 3 epochs.
GROW = ["dataset=synthetic", "dataset.train_size=256", "dataset.test_size=64", "dataset.image_size=8", "model=mlp",
        "model.hidden=[32,32]", "model.start_fraction=0.125", "growth=tiny", "growth.steps=2", "growth.dt=0.5",
        "growth.samples=128", "growth.stats_batch_size=64", "growth.line_search.batch_size=64",
        "trainer.batch_size=64", "trainer.epochs=3", "trainer.threads=1", "trainer.progress=off", "logger=tensorboard"]


def read_events(event_dir: Path, purge: bool = True) -> EventAccumulator:
    events = EventAccumulator(str(event_dir), size_guidance={"tensors": 0, "scalars": 0}, purge_orphaned_data=purge)
    events.Reload()
    return events


def logged(events: EventAccumulator) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of every scalar."""
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def expected(run_dir: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} the CSV files say the logger should hold."""
    want: dict[str, dict[int, float]] = {}
    for row in read_csv(run_dir / "metrics.csv"):
        for key, text in row.items():
            if key != "step" and text != "":
                want.setdefault(f"metrics/{key}", {})[int(row["step"])] = float(text)
    for row in read_csv(run_dir / "growth.csv"):
        for key, text in row.items():
            try:
                value = float(text)
            except ValueError:
                continue
            if key != "step":
                want.setdefault(f"growth/{row['site']}/{key}", {})[int(row["step"])] = value
    return want


def float32(value: float) -> float:
    return float(np.float32(value))


def assert_equals_csv(got: dict[str, list[tuple[int, float]]], run_dir: Path, key=lambda tag: tag,
                      stored=float) -> None:
    """got ({tag: [(step, value)]}, the summary's tags left out) holds every CSV cell once, equal
    to the CSV's value as the backend stores numbers (stored: float, or float32 for TensorBoard)."""
    got = {tag: values for tag, values in got.items() if not tag.startswith("summary/")}
    want = {key(tag): values for tag, values in expected(run_dir).items()}
    assert set(got) == set(want)
    for tag, values in got.items():
        steps = [step for step, _ in values]
        assert len(steps) == len(set(steps)), f"{tag}: a step logged twice: {steps}"
        for step, value in values:
            w = stored(want[tag][step])
            assert value == w or (math.isnan(value) and math.isnan(w)), (tag, step, value, w)
        assert set(steps) == set(want[tag]), tag


def report_figures(run_cli, run_dir: Path, tmp_path: Path) -> dict[str, bytes]:
    """{file name: PNG bytes} of what `growrun report RUN_DIR` draws of the run (all its figures)."""
    out = tmp_path / "report"
    proc = run_cli("report", str(run_dir), "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    figures = {p.name: p.read_bytes() for p in out.glob("*.png")}
    assert {"acc_vs_compute.png", "widths.png", "psi.png"} <= set(figures)
    return figures


def tensorboard_logged(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    return logged(read_events(run_dir / "tensorboard"))


def mlflow_logged(uri: str, run_id: str) -> dict[str, list[tuple[int, float]]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
            for key in client.get_run(run_id).data.metrics}


def kill_and_resume(tmp_path: Path, *extra: str) -> Path:
    """GROW killed while writing the checkpoint of epoch 2, after epoch 2's rows were logged (the
    killed attempt logged step 8), then resumed to the end."""
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("GROWRUN_UID", KILL_ENV)}
    killed = zygote.run(["train", *GROW, *extra, f"hydra.run.dir={run_dir}"], cwd=tmp_path,
                        env={**env, KILL_ENV: "write:last.pt:2"}, timeout=300)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert len(read_csv(run_dir / "metrics.csv")) == 2  # epoch 2 logged, its checkpoint not written
    resumed = zygote.run(["resume", str(run_dir)], cwd=tmp_path, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return run_dir


# --- logger=tensorboard, read back by TensorBoard's event reader -------------------------------------

@pytest.mark.slow
def test_tensorboard_holds_every_csv_cell_the_config_and_the_summary(tmp_path, run_cli):
    run_dir = tmp_path / "run"
    proc = run_cli("train", *GROW, "optim.lr=0.0625", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(read_csv(run_dir / "growth.csv")) == 8 and len(read_csv(run_dir / "metrics.csv")) == 3
    assert_equals_csv(tensorboard_logged(run_dir), run_dir, stored=float32)
    events = read_events(run_dir / "tensorboard")
    info = plugin_data_pb2.HParamsPluginData.FromString(
        events.SummaryMetadata("_hparams_/session_start_info").plugin_data.content).session_start_info
    assert info.hparams["optim.lr"].number_value == 0.0625 and info.hparams["growth.method"].string_value == "tiny"
    summary = json.loads((run_dir / "summary.json").read_text())
    final = logged(events)
    assert final["summary/test_acc"] == [(summary["step"], float32(summary["final"]["test_acc"]))]
    assert final["summary/train_flops"] == [(summary["step"], float32(summary["train_flops"]))]
    texts = [tensor_util.make_ndarray(e.tensor_proto).item().decode() for e in events.Tensors("growth/fc1/event/text_summary")]
    rows = [r for r in read_csv(run_dir / "growth.csv") if r["site"] == "fc1"]
    assert [f"added {r['added']}, reason {r['reason']}" in t for r, t in zip(rows, texts)] == [True] * 4
    figures = report_figures(run_cli, run_dir, tmp_path)
    assert {f"plots/{name[:-4]}" for name in figures} == set(events.Tags()["images"])
    for name, png in figures.items():
        [image] = events.Images(f"plots/{name[:-4]}")
        assert image.step == summary["step"] and image.encoded_image_string == png, name


@pytest.mark.slow
def test_tensorboard_after_a_kill_and_resume_holds_each_step_once(tmp_path):
    """The resumed run logs epoch 2 again; the killed attempt's copy is gone from the files
    themselves, for readers that purge restarts (TensorBoard's event reader) and for those that do not."""
    run_dir = kill_and_resume(tmp_path)
    assert_equals_csv(tensorboard_logged(run_dir), run_dir, stored=float32)
    raw = Counter(e.step for e in read_events(run_dir / "tensorboard", purge=False).Scalars("metrics/test_acc"))
    assert raw == {4: 1, 8: 1, 12: 1}  # (the killed attempt had logged step 8: metrics.csv's 2 rows above)


def test_a_missing_backend_is_a_one_line_refusal(tmp_path, run_cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    proc = run_cli("train", *GROW, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "growrun: error: logger.tensorboard=true: needs the tensorboard package, which is not installed; "
        "pip install 'growrun[tensorboard]' (or choose another logger)"]
    assert not (tmp_path / "run").exists()


def test_without_matplotlib_the_run_says_so_once_and_logs_everything_else(tmp_path, run_cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    run_dir = tmp_path / "run"
    proc = run_cli("train", *GROW, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = [line for line in (proc.stdout + proc.stderr).splitlines() if "figure" in line]
    assert len(said) == 1 and "matplotlib is not installed" in said[0], said
    assert_equals_csv(tensorboard_logged(run_dir), run_dir, stored=float32)
    assert read_events(run_dir / "tensorboard").Tags()["images"] == []


@pytest.mark.slow
def test_a_logger_failing_mid_run_is_dropped_and_the_run_goes_on(tmp_path, run_cli, monkeypatch):
    calls = []
    real = TensorBoard.epoch

    def fails_second_time(self, rows):
        calls.append(rows)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(self, rows)

    monkeypatch.setattr(TensorBoard, "epoch", fails_second_time)
    run_dir = tmp_path / "run"
    proc = run_cli("train", *GROW, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = proc.stdout + proc.stderr
    assert "logger tensorboard failed in epoch (OSError" in said and "dropped" in said
    assert len(calls) == 2 and len(read_csv(run_dir / "metrics.csv")) == 3
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    steps = [step for step, _ in tensorboard_logged(run_dir)["metrics/test_acc"]]
    assert steps == [4]  # epoch 1 only: nothing after the failure, nothing half-written


def test_keep_until_keeps_the_early_steps_and_finishes_or_drops_an_interrupted_swap(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    d = tmp_path / "tb"
    writer = SummaryWriter(str(d))
    for step in range(5):
        writer.add_scalar("x", float(step), step)
    writer.close()

    def steps() -> list[int]:
        return [step for step, _ in logged(read_events(d, purge=False))["x"]]

    keep_until(d, 2)
    assert steps() == [0, 1, 2] and len(list(d.iterdir())) == 1
    # killed between the swap's renames: <dir> gone, <dir>.old and the complete <dir>.tmp left
    shutil.copytree(d, tmp_path / "tb.tmp")
    os.replace(d, tmp_path / "tb.old")
    keep_until(d, 1)
    assert steps() == [0, 1] and sorted(p.name for p in tmp_path.iterdir()) == ["tb"]
    # killed while writing <dir>.tmp: <dir> intact, the partial <dir>.tmp dropped
    (tmp_path / "tb.tmp").mkdir()
    (tmp_path / "tb.tmp" / "events.out.tfevents.partial").write_bytes(b"\x00" * 7)
    keep_until(d, 5)
    assert steps() == [0, 1] and sorted(p.name for p in tmp_path.iterdir()) == ["tb"]


# --- logger=mlflow, with a real local tracking store (a sqlite file) read back by MLflow's client -----

@pytest.fixture(scope="module")
def empty_mlflow_store(tmp_path_factory) -> Path:
    """An MLflow sqlite store with its tables made (a new store spends ~2 s creating them)."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


def mlflow_store(empty: Path, tmp_path: Path) -> str:
    """The tracking URI of a copy of the empty store, in tmp_path."""
    shutil.copyfile(empty, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.mark.slow
def test_mlflow_holds_every_csv_cell_the_params_the_status_and_the_files(tmp_path, run_cli, empty_mlflow_store):
    from mlflow.tracking import MlflowClient

    uri = mlflow_store(empty_mlflow_store, tmp_path)
    run_dir = tmp_path / "run"
    proc = run_cli("train", *GROW, "logger=mlflow", f"logger.tracking_uri={uri}", "logger.project=study",
                   "optim.lr=0.0625", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_id = json.loads((run_dir / "loggers.json").read_text())["mlflow"]["run_id"]
    assert_equals_csv(mlflow_logged(uri, run_id), run_dir, key=lambda tag: tag.replace(":", "/"))
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert client.get_experiment(run.info.experiment_id).name == "study"
    assert run.data.params["optim.lr"] == "0.0625" and run.data.params["growth.method"] == "tiny"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert run.data.metrics["summary/test_acc"] == summary["final"]["test_acc"]
    assert {a.path for a in client.list_artifacts(run_id)} == {"metrics.csv", "growth.csv", "summary.json", "plots"}
    figures = report_figures(run_cli, run_dir, tmp_path)
    assert {a.path for a in client.list_artifacts(run_id, "plots")} == {f"plots/{name}" for name in figures}
    for name, png in figures.items():
        assert Path(client.download_artifacts(run_id, f"plots/{name}", str(tmp_path))).read_bytes() == png, name


@pytest.mark.slow
def test_mlflow_after_a_kill_and_resume_continues_the_same_run_with_each_step_once(tmp_path, empty_mlflow_store):
    from mlflow.tracking import MlflowClient

    uri = mlflow_store(empty_mlflow_store, tmp_path)
    run_dir = kill_and_resume(tmp_path, "logger=mlflow", f"logger.tracking_uri={uri}")
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("growrun").experiment_id])
    assert [r.info.run_id for r in runs] == [json.loads((run_dir / "loggers.json").read_text())["mlflow"]["run_id"]]
    assert runs[0].info.status == "FINISHED"
    assert_equals_csv(mlflow_logged(uri, runs[0].info.run_id), run_dir, key=lambda tag: tag.replace(":", "/"))


def test_an_unreachable_tracking_server_is_a_one_line_error_before_training(tmp_path, run_cli):
    pytest.importorskip("mlflow")
    run_dir = tmp_path / "run"
    proc = run_cli("train", *GROW, "logger=mlflow", "logger.tracking_uri=http://127.0.0.1:9",
                   f"hydra.run.dir={run_dir}", cwd=tmp_path, env={"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and lines[-1].startswith(
        "growrun: error: logger.mlflow: cannot use the tracking store http://127.0.0.1:9 ("), proc.stderr[-2000:]
    assert lines[-1].endswith("check logger.tracking_uri")
    assert not (run_dir / "metrics.csv").exists() or len(read_csv(run_dir / "metrics.csv")) == 0


# --- logger=wandb in offline mode, its run files (.wandb: a LevelDB-style log of protobuf records) read back

def wandb_records(path: Path):
    """The records of a .wandb file: a 7-byte header (":W&B", 0xBEE1, version), then LevelDB log
    blocks of 32 KiB, each record chunk with a 7-byte header (crc32c, length, type: 1 full,
    2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", path
    pos, pieces = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack_from("<IHB", data, pos)
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        pieces = chunk if kind in (1, 2) else pieces + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            yield record


def wandb_logged(run_dir: Path, media: dict | None = None) -> tuple[dict[str, list[tuple[int, float]]], list]:
    """({key: [(step, value)]} of every numeric history value, the run records) of all the offline
    directories of the run id in loggers.json (a resumed run adds one); the media values (images)
    go to `media` ({key: (step, their file)})."""
    run_id = json.loads((run_dir / "loggers.json").read_text())["wandb"]
    got: dict[str, list[tuple[int, float]]] = {}
    runs = []
    media = {} if media is None else media
    for path in sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")):
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                runs.append(record.run)
            elif kind == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                # an image is flattened into <key>/_type ("image-file"), <key>/path, <key>/sha256, ...
                images = [key[:-len("/_type")] for key, value in items.items()
                          if key.endswith("/_type") and value == "image-file"]
                for key in images:
                    media[key] = (int(items["_step"]), path.parent / "files" / items[f"{key}/path"])
                for key, value in items.items():
                    if not key.startswith("_") and not any(key.startswith(f"{image}/") for image in images):
                        got.setdefault(key, []).append((int(items["_step"]), float(value)))
    return got, runs


@pytest.mark.slow
def test_wandb_offline_holds_every_csv_cell_and_the_config(tmp_path, run_cli):
    pytest.importorskip("wandb")
    run_dir = tmp_path / "run"
    proc = run_cli("train", *GROW, "logger=wandb", "logger.mode=offline", "optim.lr=0.0625",
                   f"hydra.run.dir={run_dir}", cwd=tmp_path, env={"WANDB_SILENT": "true"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    media: dict = {}
    got, runs = wandb_logged(run_dir, media)
    assert_equals_csv(got, run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    figures = report_figures(run_cli, run_dir, tmp_path)
    assert set(media) == {f"plots/{name[:-4]}" for name in figures}
    for name, png in figures.items():
        step, path = media[f"plots/{name[:-4]}"]
        assert step == summary["step"] and path.read_bytes() == png, name
    assert len(runs) == 1 and runs[0].display_name == "run" and runs[0].project == "growrun"
    config = {i.key: json.loads(i.value_json) for i in runs[0].config.update}
    assert config["optim"]["lr"] == 0.0625 and config["growth"]["method"] == "tiny"


@pytest.mark.slow
def test_wandb_online_without_a_login_is_a_one_line_error_before_training(tmp_path):
    pytest.importorskip("wandb")
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "GROWRUN_UID"}
    env |= {"HOME": str(tmp_path), "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"), "WANDB_SILENT": "true"}
    proc = zygote.run(["train", *GROW, "logger=wandb", f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=env, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and lines[-1].startswith(
        "growrun: error: logger.wandb: cannot start a W&B run in mode online ("), proc.stderr[-2000:]
    assert lines[-1].endswith("use logger.mode=offline and `wandb sync` later")
    assert not (run_dir / "metrics.csv").exists() or len(read_csv(run_dir / "metrics.csv")) == 0


@pytest.mark.slow
def test_wandb_offline_after_a_sigterm_and_resume_continues_the_same_run_with_each_step_once(tmp_path):
    """SIGTERM after the first growth event: the run checkpoints and ends (interrupted); the
    resumed run continues the same W&B run id in a second offline directory; together they hold
    every CSV cell once. (A SIGKILL may leave W&B without the last interval: growrun/loggers/wandb.py.)"""
    pytest.importorskip("wandb")
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("GROWRUN_UID", KILL_ENV)} | {"WANDB_SILENT": "true"}
    proc = zygote.Process(["train", *GROW, "trainer.epochs=6", "logger=wandb", "logger.mode=offline",
                           f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=env, stdout=zygote.DEVNULL,
                          stderr=zygote.PIPE)
    _, err = zygote.signal_when(proc, lambda: (run_dir / "growth.csv").exists()
                                and len(read_csv(run_dir / "growth.csv")) >= 4, signal.SIGTERM)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    resumed = zygote.run(["resume", str(run_dir)], cwd=tmp_path, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got, runs = wandb_logged(run_dir)
    assert len(runs) == 2 and runs[0].run_id == runs[1].run_id
    assert_equals_csv(got, run_dir)
