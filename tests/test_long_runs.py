"""Long runs never lose their work: a run owns its folder, a diverged run stops before it
writes NaN weights, Ctrl-C and SIGTERM keep what was trained, a full disk is said as such, and
a run killed at any moment (SIGKILL, even mid-save) resumes to the same weights as one that
never stopped."""
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import smol_diffusion
from smol_diffusion import load_checkpoint
from smol_diffusion.checkpoint import read_checkpoint, save_checkpoint
from smol_diffusion.files import lock_folder
from smol_diffusion.interrupts import Interrupts
from smol_diffusion.runlog import read_log
from smol_diffusion.training import TrainingDiverged

ROOT = Path(__file__).resolve().parents[1]
ONE_THREAD = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}  # the same sums


# --- a run owns its folder ------------------------------------------------------------------

def test_a_finished_run_run_again_has_nothing_to_do(tiny_cfg, tmp_path, capsys):
    """The same settings into a folder holding their finished run: its history, untouched."""
    cfg = tiny_cfg.override(steps=3, sample_n=0)
    history = smol_diffusion.train(cfg, progress=False)
    before = (tmp_path / "run" / "ckpt.pt").read_bytes()
    capsys.readouterr()
    again = smol_diffusion.train(cfg.override(out_dir=str(tmp_path / "run") + "/"),
                                 progress=False)
    assert again == history and again["step"] == [3]
    assert "ckpt.pt holds this run, finished at step 3: nothing to train" in capsys.readouterr().out
    assert (tmp_path / "run" / "ckpt.pt").read_bytes() == before
    assert len(read_log(tmp_path / "run")["start"]) == 1  # no second run was logged


def test_a_new_run_into_a_folder_with_another_checkpoint_is_refused(tiny_cfg, tmp_path):
    """Anything but the finished run itself is refused, saying how to go on from it."""
    cfg = tiny_cfg.override(steps=3, sample_n=0)
    smol_diffusion.train(cfg, progress=False)
    ckpt = tmp_path / "run" / "ckpt.pt"
    before = ckpt.read_bytes()
    with pytest.raises(ValueError, match=r"already holds a checkpoint with other settings "
                                         r"\(steps: 3 there, 5 here, lr: 0.004 there, 0.001 here, "
                                         r"at step 3\).*go on from it with these settings with "
                                         r"--resume .*ckpt.pt.*another --out_dir, or --overwrite "
                                         r"true replaces it"):
        smol_diffusion.train(cfg.override(steps=5, lr=1e-3), progress=False)
    with pytest.raises(ValueError, match=r"already holds a checkpoint of another model or task "
                                         r"\(channels: 16 there, 8 here\).*another --out_dir, or "
                                         r"--overwrite true replaces it"):
        smol_diffusion.train(cfg.override(channels=8), progress=False)
    assert ckpt.read_bytes() == before
    smol_diffusion.train(cfg.override(steps=5, overwrite=True), progress=False)
    assert load_checkpoint(ckpt).step == 5


def test_a_stopped_or_unreadable_checkpoint_is_not_replaced(tiny_cfg, tmp_path, monkeypatch):
    cfg = tiny_cfg.override(steps=3, sample_n=0)
    smol_diffusion.train(cfg, progress=False)
    ckpt = tmp_path / "run" / "ckpt.pt"
    state = read_checkpoint(ckpt)
    save_checkpoint(ckpt, state | {"step": 2})  # as an interrupted run leaves it
    with pytest.raises(ValueError, match=r"holds this run, stopped at step 2 of 3; continue it "
                                         r"with --resume .*ckpt.pt"):
        smol_diffusion.train(cfg, progress=False)
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"(?s)ckpt.pt already holds a checkpoint, which this "
                                         r"new run would replace, and it cannot be read \(could "
                                         r"not read .*--overwrite true replaces it"):
        smol_diffusion.train(cfg, progress=False)
    assert ckpt.read_bytes() == b"not a checkpoint"


def test_a_second_live_run_in_a_folder_is_refused_and_a_killed_one_blocks_nothing(tiny_cfg,
                                                                                   tmp_path):
    cfg = tiny_cfg.override(steps=3, sample_n=0)
    with lock_folder(tmp_path / "run"):
        with pytest.raises(BlockingIOError, match=rf"another run is writing to .*run \(process "
                                                  rf"{os.getpid()} on "):
            smol_diffusion.train(cfg, progress=False)
    assert not (tmp_path / "run" / "ckpt.pt").exists()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from smol_diffusion.files import lock_folder; "
                               "lock = lock_folder(Path(sys.argv[1])); lock.__enter__(); "
                               "print(1, flush=True); "
                               "time.sleep(60)", str(tmp_path / "run")],
                              cwd=ROOT, stdout=subprocess.PIPE)
    assert holder.stdout.readline() == b"1\n"  # it holds the lock
    with pytest.raises(BlockingIOError, match=f"process {holder.pid} on"):
        smol_diffusion.train(cfg, progress=False)
    holder.kill()
    holder.wait()
    smol_diffusion.train(cfg, progress=False)  # the killed holder's lock went with it
    assert load_checkpoint(tmp_path / "run" / "ckpt.pt").step == 3


def test_an_output_folder_that_cannot_be_written_stops_the_run_before_it_trains(
        tiny_cfg, tmp_path, monkeypatch, read_only_disk):
    monkeypatch.setattr(sys.modules["smol_diffusion.trainstate"], "make_dataset",
                        lambda *a: pytest.fail("the dataset was built"))
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError, match="cannot write to the output folder .*file/run .*choose "
                                      "another out_dir"):
        smol_diffusion.train(tiny_cfg.override(out_dir=str(tmp_path / "file" / "run")))
    with pytest.raises(OSError, match=r"cannot write to the output folder .*disk/run "
                                      r"\(Read-only file system\)"):
        smol_diffusion.train(tiny_cfg.override(out_dir=str(read_only_disk / "run")))


# --- divergence -----------------------------------------------------------------------------

def test_a_diverged_run_stops_and_keeps_the_last_good_checkpoint(tiny_cfg, tmp_path):
    cfg = tiny_cfg.override(steps=20, sample_n=0, log_every=5, checkpoint_every=10)
    with pytest.raises(TrainingDiverged, match=r"diverged at step \d+: \d+ of the last 5 steps "
                                               r"had a non-finite .*nothing was saved. Try a "
                                               r"lower lr \(it is 1000\)"):
        smol_diffusion.train(cfg.override(lr=1e3), progress=False)
    assert not (tmp_path / "run" / "ckpt.pt").exists()
    smol_diffusion.train(cfg, progress=False)
    path = tmp_path / "run" / "ckpt.pt"
    before = path.read_bytes()
    with pytest.raises(TrainingDiverged, match="was left as it was.*--resume"):
        smol_diffusion.train(cfg.override(lr=10.0, steps=60, resume=str(path)), progress=False)
    assert path.read_bytes() == before


def test_one_bad_batch_is_skipped_and_counted(tiny_cfg, monkeypatch):
    """A NaN loss at one step: that update is skipped (the weights stay finite and the run goes
    on), and history["skipped"] counts it."""
    train_module = sys.modules["smol_diffusion.training"]
    real_loss, calls = train_module.simple_loss, []

    def loss_with_one_nan(*args, **kwargs):
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) == 7 else loss

    monkeypatch.setattr(train_module, "simple_loss", loss_with_one_nan)
    history = smol_diffusion.train(tiny_cfg.override(steps=20, sample_n=0, log_every=5),
                                   progress=False)
    assert history["skipped"] == 1 and all(map(torch.isfinite, map(torch.tensor,
                                                                   history["loss"])))
    ckpt = load_checkpoint(Path(tiny_cfg.train.out_dir) / "ckpt.pt")
    assert all(torch.isfinite(p).all() for p in ckpt.model.parameters())


def test_the_fused_optimizer_skips_an_update_where_found_inf_is_set():
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([w], lr=0.1, weight_decay=0.1, fused=True)
    w.grad = torch.ones(3)
    opt.found_inf = torch.tensor(1.0)
    opt.step()
    assert torch.equal(w.detach(), torch.ones(3)) and opt.state[w]["step"] == 0
    opt.found_inf = torch.tensor(0.0)
    opt.step()
    assert (w.detach() < 1).all() and opt.state[w]["step"] == 1


def test_non_finite_weights_are_neither_written_nor_loaded(tiny_cfg, tmp_path):
    smol_diffusion.train(tiny_cfg.override(steps=2, sample_n=0), progress=False)
    path = tmp_path / "run" / "ckpt.pt"
    state = read_checkpoint(path)
    name = next(iter(state["ema"]))
    state["ema"][name][0] = float("nan")
    with pytest.raises(ValueError, match=f"refusing to write {path}: its ema weight {name} "
                                         "holds NaN"):
        save_checkpoint(path, state)
    torch.save(state, path)  # a file that rotted
    with pytest.raises(ValueError, match=f"refusing to load {path}: its ema weight {name}"):
        load_checkpoint(path)
    r = subprocess.run([sys.executable, "-m", "smol_diffusion", "sample", "--checkpoint", str(path),
                        "--out", str(tmp_path / "grid.png")], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 1 and "refusing to load" in r.stderr
    assert not (tmp_path / "grid.png").exists()


def test_an_error_outside_an_update_keeps_the_steps_trained(tiny_cfg, tmp_path, monkeypatch):
    """Drawing the sample grid fails at step 20 (out of memory, say): the error is raised after
    a checkpoint of step 20 is written."""
    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(sys.modules["smol_diffusion.trainstate"], "save_grid", out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        smol_diffusion.train(tiny_cfg.override(checkpoint_every=0), progress=False)
    assert load_checkpoint(tmp_path / "run" / "ckpt.pt").step == 20


# --- full disks -----------------------------------------------------------------------------

def test_a_full_disk_is_named_and_leaves_the_last_checkpoint_whole(small_disk):
    path = small_disk / "ckpt.pt"
    save_checkpoint(path, {"model": {"w": torch.zeros(1000)}})
    with pytest.raises(OSError, match=r"no space for checkpoint .*disk/ckpt.pt: it needs about "
                                      r"5.0 MB and 1.0 MB is free on that disk"):
        save_checkpoint(path, {"model": {"w": torch.zeros(1_000_000)}})  # 4 MB
    assert sorted(p.name for p in small_disk.iterdir()) == ["ckpt.pt"]  # no temporary file
    assert torch.load(path, weights_only=True)["model"]["w"].shape == (1000,)


def test_torchs_out_of_space_error_is_said_as_such(tmp_path, monkeypatch):
    """What torch.save raises on a full disk, without root: its writer's "unexpected pos"."""
    def full(obj, f):
        f.write(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match=r"no space for checkpoint .*ckpt.pt: it needs about 1.0 MB "
                                      r"and .* is free"):
        save_checkpoint(tmp_path / "ckpt.pt", {"model": {"w": torch.zeros(10)}})
    assert list(tmp_path.iterdir()) == []


def test_the_next_save_removes_temporary_files_of_killed_saves(tmp_path):
    stale = tmp_path / ".ckpt.pt.0123456789abcdef.tmp"
    stale.write_bytes(b"half a checkpoint")
    (tmp_path / ".other.pt.0123456789abcdef.tmp").write_bytes(b"not ours")
    save_checkpoint(tmp_path / "ckpt.pt", {"step": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.pt.0123456789abcdef.tmp",
                                                          "ckpt.pt"]


# --- Ctrl-C and SIGTERM ---------------------------------------------------------------------

def test_a_signal_inside_a_held_section_waits_for_its_end():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with Interrupts() as interrupts:
            with interrupts.held():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.01)  # a signal is handled between bytecodes: it has arrived
                done.append(1)
            done.append(2)
    assert done == [1]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


def test_an_interrupt_returns_the_history_and_resume_goes_on_exactly(tiny_cfg, tmp_path,
                                                                     monkeypatch):
    """The notebook's Interrupt, at step 13 of 30: a checkpoint of step 13, the history so far;
    resuming from it ends where an uninterrupted run ends."""
    cfg = tiny_cfg.override(steps=30, sample_every=0, sample_n=0, checkpoint_every=0,
                            log_every=5, lr_schedule="constant")
    straight = smol_diffusion.train(cfg.override(out_dir=str(tmp_path / "a")), progress=False)
    train_module = sys.modules["smol_diffusion.training"]
    real_lr = train_module.lr_at

    def lr_then_interrupt(step, tc):
        if step == 13:
            raise KeyboardInterrupt
        return real_lr(step, tc)

    monkeypatch.setattr(train_module, "lr_at", lr_then_interrupt)
    part = smol_diffusion.train(cfg.override(out_dir=str(tmp_path / "b")), progress=False)
    assert part["step"] == [5, 10, 13]
    path = tmp_path / "b" / "ckpt.pt"
    assert load_checkpoint(path).step == 13
    monkeypatch.undo()
    resumed = smol_diffusion.train(cfg.override(out_dir=str(tmp_path / "b"), resume=str(path)),
                                   progress=False)
    assert resumed["step"][-1] == 30
    a, b = read_checkpoint(tmp_path / "a" / "ckpt.pt"), read_checkpoint(path)
    for part_name in ("model", "ema"):
        for k, v in a[part_name].items():
            torch.testing.assert_close(b[part_name][k], v)
    assert resumed["loss"][-1] == pytest.approx(straight["loss"][-1], rel=1e-4)


def test_a_second_ctrl_c_during_that_save_waits_for_it(tiny_cfg, tmp_path, monkeypatch):
    """Ctrl-C at step 7, and again in the middle of the checkpoint it writes: the save
    completes, and train returns."""
    train_module, state_module = (sys.modules[f"smol_diffusion.{name}"]
                                  for name in ("training", "trainstate"))
    real_lr, real_save = train_module.lr_at, state_module.save_checkpoint

    def lr_then_interrupt(step, tc):
        if step == 7:
            raise KeyboardInterrupt
        return real_lr(step, tc)

    def save_interrupted(path, state):
        path.with_name(f".{path.name}.0123456789abcdef.tmp").write_bytes(b"half")
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # the signal is handled here, between bytecodes
        real_save(path, state)

    monkeypatch.setattr(train_module, "lr_at", lr_then_interrupt)
    monkeypatch.setattr(state_module, "save_checkpoint", save_interrupted)
    history = smol_diffusion.train(tiny_cfg.override(sample_n=0, checkpoint_every=0),
                                   progress=False)
    assert history["step"][-1] == 7
    assert load_checkpoint(tmp_path / "run" / "ckpt.pt").step == 7
    assert not list((tmp_path / "run").glob(".*.tmp"))  # the save finished, and cleaned up


def _train_args(out: Path, steps: int, **extra) -> list[str]:
    """The command line of a small run that a test interrupts or kills."""
    args = {"preset": "demo", "image_size": 8, "channels": 8, "channel_mults": "1,2",
            "steps": steps, "batch_size": 16, "warmup": 5, "log_every": 5, "sample_n": 0,
            "lr_schedule": "constant", "out_dir": str(out)} | extra
    return [sys.executable, "-m", "smol_diffusion", "train",
            *[s for k, v in args.items() for s in (f"--{k}", str(v))]]


def _resume_args(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "smol_diffusion", "train", "--resume", str(out / "ckpt.pt"),
            *extra]


STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_process_outlives_its_test():
    yield
    while STARTED:  # a test that failed before it stopped its run: torchrun's group included
        p = STARTED.pop()
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def _start(args: list[str], logs: Path) -> subprocess.Popen:
    """A training process (in a process group of its own) whose output goes to logs.out and
    logs.err (files: no pipe fills)."""
    with open(logs.with_suffix(".out"), "w") as out, open(logs.with_suffix(".err"), "w") as err:
        p = subprocess.Popen(args, cwd=ROOT, stdout=out, stderr=err, env=ONE_THREAD,
                             start_new_session=True)
    STARTED.append(p)
    return p


def _steps_shown(logs: Path) -> list[int]:
    """The steps the progress bar has shown so far."""
    text = logs.with_suffix(".err").read_text(errors="replace")
    return [int(n) for n in re.findall(r"\| *(\d+)/\d+ \[", text)]


def _holds_lock(folder: Path, pid: int) -> bool:
    lock = folder / ".lock"
    return lock.exists() and f"process {pid} " in lock.read_text()


def _wait_until(condition, timeout: float = 120.0) -> None:
    t0 = time.time()
    while not condition():
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.001)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_writes_a_checkpoint_and_resume_goes_on(tmp_path, sig):
    out, logs = tmp_path / "run", tmp_path / "log"
    p = _start(_train_args(out, 100_000, checkpoint_every=0), logs)
    _wait_until(lambda: max(_steps_shown(logs), default=0) >= 5)
    p.send_signal(sig)
    assert p.wait(timeout=120) == 130, logs.with_suffix(".err").read_text()
    step = load_checkpoint(out / "ckpt.pt").step
    assert 5 <= step < 100_000
    assert f"interrupted at step {step}: continue with --resume {out / 'ckpt.pt'}" \
        in logs.with_suffix(".out").read_text()
    r = subprocess.run(_resume_args(out, "--steps", str(step + 3)), cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert load_checkpoint(out / "ckpt.pt").step == step + 3


def test_torchrun_stops_every_process_at_one_step_on_sigterm(tmp_path):
    """SIGTERM to torchrun, which passes it to both workers: they stop together at a loss
    reading, rank 0 writes the checkpoint, and each returns from `train` (tests/ddp_worker.py
    then saves its EMA weights beside the run), none killed or hung."""
    out, logs = tmp_path / "run", tmp_path / "log"
    args = _train_args(out, 100_000, checkpoint_every=0, log_every=3)
    p = _start([sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2", str(ROOT / "tests" / "ddp_worker.py"),
                *args[args.index("train") + 1:]], logs)
    _wait_until(lambda: (out / ".lock").exists() and max(_steps_shown(logs), default=0) >= 4)
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=120)
    step = load_checkpoint(out / "ckpt.pt").step
    assert step >= 4 and step % 3 == 0  # a loss reading
    assert f"interrupted at step {step}" in logs.with_suffix(".out").read_text()
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(a, b) for a, b in zip(rank0["ema"], rank1["ema"]))


def test_a_run_killed_at_random_moments_resumes_to_the_uninterrupted_weights(tmp_path):
    """A real training process is killed with SIGKILL a dozen times: at random moments, and
    the moment a new checkpoint's temporary file appears (mid-write). After every kill the
    checkpoint loads and its step never goes back; each start resumes from it; then a last
    resume runs to the end, and its weights are those of a run that was never killed."""
    rng, out, logs = random.Random(0), tmp_path / "run", tmp_path / "log"
    kills, mid_write, resumes, last_step, lost = 0, 0, 0, 0, []
    for kill in range(12):
        ckpt = out / "ckpt.pt"
        before = set(out.glob(".ckpt.pt.*.tmp"))  # left by the last kill, until the next save
        resumes += ckpt.exists()
        args = _resume_args(out) if ckpt.exists() else \
            _train_args(out, 100_000, checkpoint_every=1)
        p = _start(args, logs)
        if kill % 2:  # the moment a checkpoint is being written
            _wait_until(lambda: p.poll() is not None
                        or bool(set(out.glob(".ckpt.pt.*.tmp")) - before))
        else:  # any moment once this process holds the folder: setup, steps, saves
            _wait_until(lambda: p.poll() is not None or _holds_lock(out, p.pid))
            time.sleep(rng.uniform(0, 1.5))
        p.kill()
        assert p.wait(timeout=60) == -signal.SIGKILL, logs.with_suffix(".err").read_text()
        kills += 1
        mid_write += bool(set(out.glob(".ckpt.pt.*.tmp")) - before)
        step = load_checkpoint(ckpt).step if ckpt.exists() else 0  # loads, whatever was cut
        assert step >= last_step
        lost.append(max(_steps_shown(logs), default=0) - step)  # shown, but not on disk
        last_step = step
    end = last_step + 20
    r = subprocess.run(_resume_args(out, "--steps", str(end)), cwd=ROOT, capture_output=True,
                       text=True, env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    # half the kills wait for a save; one may finish before the kill lands
    assert mid_write >= 3 and resumes >= 10 and not any(out.glob(".ckpt.pt.*.tmp"))
    reference = tmp_path / "reference"
    r = subprocess.run(_train_args(reference, end, checkpoint_every=1), cwd=ROOT,
                       capture_output=True, text=True, env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    a, b = read_checkpoint(reference / "ckpt.pt"), read_checkpoint(out / "ckpt.pt")
    assert b["step"] == end
    for part in ("model", "ema", "optimizer"):
        torch.testing.assert_close(b[part], a[part])
    print(f"{kills} kills ({mid_write} mid-write), {resumes} resumes killed and one to the end "
          f"at step {end}; steps shown but not saved at most {max(lost)}")
