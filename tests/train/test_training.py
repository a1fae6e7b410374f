import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from latentct.generators.interface import generator_info, load_encoder, load_generator
from latentct.train.batches import step_indices
from latentct.train.bookkeeping import TrainingDiverged
from latentct.train.checkpoint import load_checkpoint, save_checkpoint
from latentct.util.settings import UserError, parse_settings
from Training import TrainGAN, TrainVAE

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--ngf", "8", "--ndf", "8", "--batch-size", "8", "--latent-dim", "8", "--log-every", "1",
        "--eval-every", "100000", "--sample-every", "100000", "--eval-samples", "16", "--workers", "0",
        "--device", "cpu"]


def metrics(folder):
    return [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]


def losses_by_step(folder):
    return {r["step"]: (r["loss_d"], r["loss_g"]) for r in metrics(folder) if "loss_d" in r}


def script_env(**extra):
    """One thread, and this checkout's package first (not whichever copy pip installed last)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **extra}


def start(args, env=None):
    return subprocess.Popen([sys.executable, str(ROOT / "Training" / "TrainGAN.py"), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env=script_env(**(env or {})))


def wait_for_steps(folder, steps, proc, timeout=120):
    path = Path(folder) / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.is_file() and sum(1 for line in path.read_text().splitlines() if '"loss_d"' in line) >= steps:
            return
        assert proc.poll() is None, f"run ended before step {steps}: {proc.stdout.read()}"
        time.sleep(0.01)
    raise AssertionError("timed out")


def test_batches_depend_only_on_step_and_cover_each_epoch():
    a = step_indices(100, 10, 7, seed=1)
    assert torch.equal(a, step_indices(100, 10, 7, seed=1))
    epoch = torch.cat([step_indices(100, 10, s, seed=1) for s in range(10)])
    assert sorted(epoch.tolist()) == list(range(100))
    ranks = [step_indices(100, 10, 3, seed=1, rank=r, world=2) for r in range(2)]
    assert set(ranks[0].tolist()).isdisjoint(ranks[1].tolist())


def test_sigkill_and_sigterm_resume_continue_exactly(dataset, tmp_path):
    args = ["--data", str(dataset), "--steps", "300", "--checkpoint-every", "10", *TINY]
    ref = start(["--output", str(tmp_path / "ref"), *args])
    assert ref.wait(timeout=300) == 0, ref.stdout.read()

    run = tmp_path / "run"
    proc = start(["--output", str(run), *args])
    wait_for_steps(run, 25, proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    killed_at = torch.load(run / "checkpoint.pt", weights_only=True)["step"]
    assert 20 <= killed_at < 300

    proc = start(["--output", str(run), *args])  # the same command continues
    wait_for_steps(run, killed_at + 30, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    stopped_at = torch.load(run / "checkpoint.pt", weights_only=True)["step"]
    assert stopped_at > killed_at + 20 and max(losses_by_step(run)) == stopped_at
    assert not (run / "generator.pt").exists()

    proc = start(["--output", str(run), *args])
    assert proc.wait(timeout=300) == 0
    ours, theirs = losses_by_step(run), losses_by_step(tmp_path / "ref")
    assert sorted(ours) == list(range(1, 301))  # every step logged once, none twice
    for step in range(killed_at + 1, 301):
        assert ours[step] == pytest.approx(theirs[step], rel=1e-5, abs=1e-6), step


def test_truncated_checkpoint_is_a_clear_error_and_the_previous_stays(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"step": 10, "w": torch.ones(1000)}, path)
    save_checkpoint({"step": 20, "w": torch.ones(1000)}, path)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(UserError) as err:
        load_checkpoint(path)
    assert "truncated or corrupt" in str(err.value) and "checkpoint.prev.pt" in str(err.value)
    assert load_checkpoint(tmp_path / "checkpoint.prev.pt")["step"] == 10


def test_script_reports_a_corrupt_checkpoint_in_one_line(dataset, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"\x80garbage")
    proc = start(["--output", str(run), "--data", str(dataset), "--steps", "3", *TINY])
    out = proc.communicate(timeout=120)[0].strip().splitlines()
    assert proc.returncode != 0 and "checkpoint is truncated or corrupt" in out[-1]


def test_generator_files_round_trip(dataset, tmp_path):
    TrainGAN.main(parse_settings(TrainGAN.Settings, ["--data", str(dataset), "--output", str(tmp_path / "g"),
                                                              "--steps", "3", *TINY]))
    TrainVAE.main(parse_settings(TrainVAE.Settings, ["--data", str(dataset), "--output", str(tmp_path / "v"),
                                                              "--steps", "3", "--width", "8", *TINY[4:]]))
    z = torch.randn(4, 8)
    g = load_generator(tmp_path / "g" / "generator.pt")
    state = torch.load(tmp_path / "g" / "checkpoint.pt", weights_only=True)["models"]["G"]
    fresh = TrainGAN.Generator(latent_dim=8, image_size=32, ngf=8)
    fresh.load_state_dict(state)
    assert torch.allclose(g(z), fresh.eval()(z)) and g.latent_dim == 8 and not g.training
    assert generator_info(tmp_path / "g" / "generator.pt")["kind"] == "dcgan"
    decoder = load_generator(tmp_path / "v" / "generator.pt")
    encoder = load_encoder(tmp_path / "v" / "generator.pt")
    assert decoder(z).shape == (4, 1, 32, 32) and encoder(decoder(z))[0].shape == (4, 8)
    assert load_encoder(tmp_path / "g" / "generator.pt") is None
    (tmp_path / "bad.pt").write_bytes(b"nope")
    with pytest.raises(UserError, match="bad.pt is neither a LatentCT generator file, nor TorchScript"):
        load_generator(tmp_path / "bad.pt")


def test_diverging_loss_stops_and_keeps_the_last_good_checkpoint(dataset, tmp_path, monkeypatch):
    real_loss = TrainGAN.g_loss
    calls = {"n": 0}

    def exploding(logits, cfg):
        calls["n"] += 1
        return real_loss(logits, cfg) * (float("nan") if calls["n"] >= 7 else 1.0)

    monkeypatch.setattr(TrainGAN, "g_loss", exploding)
    cfg = parse_settings(TrainGAN.Settings, ["--data", str(dataset), "--output", str(tmp_path / "g"),
                                                      "--steps", "20", "--checkpoint-every", "5", *TINY])
    with pytest.raises(TrainingDiverged, match="loss_g is nan at step 7"):
        TrainGAN.main(cfg)
    kept = load_checkpoint(tmp_path / "g" / "checkpoint.pt")
    assert kept["step"] == 5 and all(torch.isfinite(v).all() for v in kept["models"]["G"].values())
    assert not (tmp_path / "g" / "generator.pt").exists()


def test_two_process_ddp_ends_with_identical_weights(dataset, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "Training" / "TrainGAN.py"), "--data", str(dataset), "--output", str(out), "--steps", "4", *TINY]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, env=script_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    sums = [r["ddp_weight_checksums"] for r in metrics(out) if "ddp_weight_checksums" in r][0]
    assert len(sums) == 2 and sums[0] == sums[1]
    steps = [r["step"] for r in metrics(out) if "loss_d" in r]
    assert steps == [1, 2, 3, 4]  # only rank 0 wrote


def test_demo_preset_does_not_collapse(gan_run):
    evals = [r["eval"] for r in metrics(gan_run) if "eval" in r]
    assert evals and evals[-1]["diversity_ratio"] > 0.5, evals
    assert (gan_run / "samples_latest.png").is_file() and (gan_run / "losses.png").is_file()
    floor = [r["real_vs_real"] for r in metrics(gan_run) if "real_vs_real" in r][0]
    assert floor["swd"] > 0 and evals[-1]["swd"] > 0


def test_channels_last_where_it_measured_faster():
    from latentct.train.runtime import Runtime, memory_format

    cpu, gpu = Runtime(torch.device("cpu")), Runtime(torch.device("cuda"))
    assert memory_format("auto", cpu) == torch.channels_last  # faster on CPU (bench/train.py)
    assert memory_format("auto", gpu, compiled=True) == torch.contiguous_format  # breaks compile there
    assert memory_format("on", gpu) == torch.channels_last and memory_format("off", cpu) == torch.contiguous_format
    with pytest.raises(UserError, match="--channels-last on with --compile on"):
        memory_format("on", gpu, compiled=True)
