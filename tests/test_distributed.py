"""Data-parallel training and sampling across processes (``ebmfast.training.distributed``): 2 CPU ranks over gloo,
started by torchrun, tiny models, a few iterations.

In-process (fast): shard sizes, per-rank seeds, the batch sharding of one epoch, the replay-buffer merge / split of
checkpoints, the command line's torchrun checks. Under torchrun (slow: each job starts 3 Python processes, ~10 s on
a 2-core machine): parameters identical on both ranks, one epoch covering every image exactly once across ranks, a
2-rank checkpoint resuming bit-identically on 2 ranks and on 1 rank, a 1-rank checkpoint resuming on 2 ranks,
divergence roll-back on all ranks together, a killed rank ending the job, SIGTERM to one rank stopping both at the
same iteration with a checkpoint, and ``bench --distributed``.
"""

from __future__ import annotations

import os
import re
import signal
import time

import pytest
import torch
from dist_helpers import ROOT, run_worker, start, steps_logged, stop, torchrun, wait_for, worker_pids
from train_helpers import TINY_CLI, one_thread, small_data, tiny_config  # noqa: F401

from ebmfast.cli import main
from ebmfast.training.batches import TensorBatches
from ebmfast.training.checkpoint import load_checkpoint
from ebmfast.training.distributed import DistContext, describe_failure
from ebmfast.training.state import S_GEN, S_SAMPLER, derive_seed, merge_buffer_shards, split_buffer
from ebmfast.training.trainer import Trainer

slow = pytest.mark.slow


# ================================================================================================ in-process
def test_rank_context_seeds_and_shards():
    one = DistContext()
    assert not one.distributed and one.is_main and one.world_size == 1
    assert one.reduce_mean({"loss": 1.5}) == {"loss": 1.5} and one.from_main(2.5) == 2.5 and one.agree_max(3) == 3
    ranks = [DistContext(r, 3) for r in range(3)]
    # rank 0's streams are a single process's; every rank's differ
    assert ranks[0].seed(42, 0, S_SAMPLER) == derive_seed(42, 0, S_SAMPLER)
    seeds = {c.seed(42, a, s) for c in ranks for a in (0, 1) for s in (S_GEN, S_SAMPLER)}
    assert len(seeds) == 12
    assert [c.shard_size(8192) for c in ranks] == [2731, 2731, 2730] and sum(ranks[0].shard_sizes(10)) == 10
    assert ranks[1].local_batch(129) == 43
    with pytest.raises(ValueError, match="divisible by the 3 ranks"):
        ranks[0].local_batch(128)
    assert ranks[0].iteration_graph_allowed and not DistContext(0, 1, backend="gloo").iteration_graph_allowed
    assert describe_failure(RuntimeError("gloo: Connection reset by peer"), DistContext(0, 2, backend="gloo"))
    assert describe_failure(RuntimeError("gloo: Connection reset by peer"), one) is None  # one process: no peers
    assert describe_failure(ValueError("bad"), DistContext(0, 2, backend="gloo")) is None


def test_batches_shard_one_epoch_like_one_process():
    """Each global batch is the one-process batch, split between the ranks; one epoch covers every image once; the
    next epoch is reshuffled."""
    images = torch.arange(100, dtype=torch.float32).view(100, 1, 1, 1)
    one = TensorBatches(images, 20, seed=7)
    ranks = [TensorBatches(images, 20, seed=7, rank=r, world_size=2) for r in range(2)]
    for epoch in range(2):
        single = [b.flatten().long().tolist() for b in one]
        split = [[b.flatten().long().tolist() for b in tb] for tb in ranks]
        assert len(single) == len(split[0]) == len(split[1]) == 5
        for i, batch in enumerate(single):
            assert split[0][i] + split[1][i] == batch and len(split[0][i]) == 10
        seen = sorted(i for r in split for b in r for i in b)
        assert seen == list(range(100)), f"epoch {epoch}"
        if epoch == 0:
            first = single
    assert single != first  # reshuffled
    with pytest.raises(ValueError, match="divisible"):
        TensorBatches(images, 21, rank=0, world_size=2)


def test_buffer_merge_split_round_trip_and_reshard():
    g = torch.Generator().manual_seed(0)
    caps, ptrs = [5, 4, 4], [3, 0, 2]
    shards = [
        {"storage": torch.rand((c, 1, 2, 2), generator=g), "ptr": p, "capacity": c, "sample_shape": (1, 2, 2)}
        for c, p in zip(caps, ptrs)
    ]
    merged = merge_buffer_shards(shards)
    assert merged["capacity"] == 13 and merged["ptr"] == 0
    # the merged buffer starts with each shard's oldest image (the one at its write pointer)
    assert {tuple(merged["storage"][i].flatten().tolist()) for i in range(3)} == {
        tuple(s["storage"][s["ptr"]].flatten().tolist()) for s in shards
    }
    back = split_buffer(merged, caps, ptrs)
    for a, b in zip(back, shards):
        assert torch.equal(a["storage"], b["storage"]) and a["ptr"] == b["ptr"] and a["capacity"] == b["capacity"]
    rows = sorted(tuple(r.flatten().tolist()) for s in shards for r in s["storage"])
    for sizes in ([13], [7, 6], [4, 3, 3, 3]):
        parts = split_buffer(merged, sizes)
        assert [p["storage"].shape[0] for p in parts] == sizes and all(p["ptr"] == 0 for p in parts)
        assert sorted(tuple(r.flatten().tolist()) for p in parts for r in p["storage"]) == rows
    # a one-process buffer merges to its images oldest first
    single = merge_buffer_shards([shards[0]])
    assert torch.equal(single["storage"], torch.roll(shards[0]["storage"], -3, 0))
    with pytest.raises(ValueError, match="do not add up"):
        split_buffer(merged, [5, 5])


@pytest.mark.usefixtures("one_thread")
def test_single_process_trainer_is_not_distributed():
    tr = Trainer(tiny_config(), data=small_data(), device="cpu", out_dir=None, progress=False)
    assert not tr.dist.distributed and tr.forward_model is tr.model and tr.buffer.capacity == 128
    assert type(tr.signals).__name__ == "StopSignals" and type(tr.rollback).__name__ == "Rollback"


def test_help_says_what_batch_size_means(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "torchrun --standalone --nproc-per-node N -m ebmfast train" in text
    assert "images per iteration in total; under torchrun each of the N ranks takes batch-size/N" in text
    assert "--dist-timeout" in text and "--rdzv-backend c10d" in text


def test_cli_refuses_a_batch_the_ranks_cannot_share(tmp_path, monkeypatch, capsys):
    """Checked before the ranks meet: one line, exit 2, nothing written."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert main(["train", "--out", str(tmp_path / "out"), "--device", "cpu", "--batch-size", "16"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--batch-size 16 must be divisible by the 3 ranks" in err
    argv = ["train", "--out", str(tmp_path / "out"), "--device", "cpu", "--batch-size", "15"]
    assert main([*argv, "--buffer-size", "60", "--dist-timeout", "0"]) == 2
    assert "--dist-timeout must be > 0" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "5")
    assert main(["train", "--out", str(tmp_path / "out"), "--device", "cpu"]) == 2
    assert "inconsistent torchrun environment" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("joined", [False, True])
def test_exit_process_flushes_and_exits_with_the_code(joined):
    """A process that joined a group skips interpreter finalization (os._exit) but still says everything it
    printed, even into a pipe (block-buffered); one that did not exits the ordinary way (sys.exit)."""
    import subprocess
    import sys

    code = (
        "import atexit, sys\n"
        "import ebmfast.training.distributed as d\n"
        f"d._joined = {joined}\n"
        "atexit.register(lambda: print('finalized'))\n"
        "print('out', end=''); print('err', end='', file=sys.stderr)\n"
        "d.exit_process(143)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert proc.stdout == ("out" if joined else "outfinalized\n") and proc.stderr == "err"


# ================================================================================================ under torchrun
def _same(a: dict, b: dict, keys=("params", "buffer", "buffer_ptr", "sampler", "generator", "adam")) -> list[str]:
    diffs = []
    for k in keys:
        x, y = a[k], b[k]
        if isinstance(x, dict) and all(isinstance(v, torch.Tensor) for v in x.values()):
            same = x.keys() == y.keys() and all(torch.equal(x[n], y[n]) for n in x)
        elif isinstance(x, list) and x and isinstance(x[0], torch.Tensor):
            same = len(x) == len(y) and all(torch.equal(p, q) for p, q in zip(x, y))
        elif isinstance(x, torch.Tensor):
            same = torch.equal(x, y)
        else:
            same = x == y
        if not same:
            diffs.append(k)
    return diffs


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """2 ranks, 17 iterations: 10 per epoch (160 images, batch 16 = 8 per rank), so across an epoch end."""
    out = tmp_path_factory.mktemp("full")
    return out, run_worker(out, 17)


@slow
def test_ranks_train_identical_parameters_on_their_own_shards(full_run):
    out, (r0, r1) = full_run
    assert r0["ebmfast_file"].startswith(str(ROOT)) and r1["ebmfast_file"].startswith(str(ROOT))  # this worktree
    assert (r0["status"], r0["iteration"], r0["epoch"]) == (r1["status"], r1["iteration"], r1["epoch"])
    assert (r0["iteration"], r0["epoch"]) == (17, 1)
    assert _same(r0, r1, ("params", "adam")) == []  # DDP: gradients averaged, the same update on both ranks
    init = Trainer(tiny_config(), data=small_data(), device="cpu", out_dir=None, progress=False).model
    assert not all(torch.equal(p, r0["params"][n]) for n, p in init.named_parameters())  # and it did train
    # each rank its own buffer shard (capacity / 2) and its own streams
    assert r0["buffer"].shape[0] == r1["buffer"].shape[0] == 64
    assert not torch.equal(r0["buffer"], r1["buffer"]) and r0["sampler"]["seed"] != r1["sampler"]["seed"]
    assert r0["sampler"]["seed"] == derive_seed(tiny_config().seed, 0, S_SAMPLER)  # rank 0 = one process
    # only rank 0 wrote files; the checkpoint holds both ranks
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
    assert ckpt["distributed"]["world_size"] == 2 and ckpt["trainer"]["buffer"]["capacity"] == 128
    assert [r["sampler"] for r in ckpt["distributed"]["ranks"]] == [r0["sampler"], r1["sampler"]]


@slow
def test_one_epoch_visits_every_image_once_across_ranks(full_run):
    _, (r0, r1) = full_run
    epoch0 = r0["seen"][:80] + r1["seen"][:80]  # 10 iterations x 8 images per rank
    assert sorted(epoch0) == list(range(160))
    epoch1 = r0["seen"][80:] + r1["seen"][80:]  # 7 iterations of the next epoch: no repeats, another order
    assert len(epoch1) == len(set(epoch1)) == 7 * 16
    assert r0["seen"][80:88] != r0["seen"][:8]


@slow
def test_two_rank_checkpoint_resumes_bit_identically_on_two_ranks(full_run, tmp_path):
    _, full = full_run
    run_worker(tmp_path, 7)  # stopped mid-epoch 0
    ckpt = tmp_path / "checkpoints" / "last.pt"
    assert load_checkpoint(ckpt)["trainer"]["iteration"] == 7
    resumed = run_worker(tmp_path, 17, "--resume", str(ckpt))
    for rank in (0, 1):
        assert resumed[rank]["iteration"] == 17
        assert _same(resumed[rank], full[rank]) == [], f"rank {rank}"
        assert resumed[rank]["metrics"] == full[rank]["metrics"]


@slow
@pytest.mark.usefixtures("one_thread")
def test_two_rank_checkpoint_resumes_on_one_rank(full_run, tmp_path):
    out, (r0, r1) = full_run
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
    merged = ckpt["trainer"]["buffer"]["storage"]
    assert sorted(map(tuple, merged.flatten(1).tolist())) == sorted(
        map(tuple, torch.cat([r0["buffer"], r1["buffer"]]).flatten(1).tolist())
    )
    cfg = tiny_config(epochs=3, snapshot_every=4, collapse_check_every=2, max_iterations=20)
    tr = Trainer(cfg, data=small_data(), device="cpu", out_dir=tmp_path, resume=out / "checkpoints" / "last.pt")
    assert tr.buffer.capacity == 128 and tr.iteration == 17
    assert torch.equal(tr.buffer.storage, merged) and int(tr.buffer.ptr) == 0
    assert tr.sampler.state_dict() == r0["sampler"]  # rank 0's streams continue
    result = tr.fit()
    tr.close()
    assert (result.status, result.iteration) == ("max_iterations", 20)
    assert "2-rank checkpoint resumed on 1 rank(s): replay buffer re-sharded" in (tmp_path / "train.log").read_text()
    assert "distributed" not in load_checkpoint(tmp_path / "checkpoints" / "last.pt")


@slow
@pytest.mark.usefixtures("one_thread")
def test_one_rank_checkpoint_resumes_on_two_ranks(tmp_path):
    cfg = tiny_config(epochs=3, snapshot_every=4, collapse_check_every=2, max_iterations=7)
    from dist_worker import encode  # the same data the workers train on

    d = small_data()
    data = type(d)(d.name, encode(d.train_images), d.train_labels, d.val_images, d.val_labels)
    tr = Trainer(cfg, data=data, device="cpu", out_dir=tmp_path, progress=False)
    tr.fit()
    tr.close()
    saved = load_checkpoint(tmp_path / "checkpoints" / "last.pt")["trainer"]
    r0, r1 = run_worker(tmp_path, 12, "--resume", str(tmp_path / "checkpoints" / "last.pt"))
    assert r0["iteration"] == r1["iteration"] == 12 and _same(r0, r1, ("params", "adam")) == []
    assert r0["buffer"].shape[0] == r1["buffer"].shape[0] == 64
    # the rest of epoch 0 (iterations 8-10): exactly the images the one-process run had not reached
    order = saved["batches"]["perm"].tolist()
    assert sorted(r0["seen"][:24] + r1["seen"][:24]) == sorted(order[7 * 16 : 10 * 16])
    # rank 0 continued the saved noise stream (3 steps x 5 more iterations), rank 1 started its own
    assert r0["sampler"]["seed"] == saved["sampler"]["seed"]
    assert r0["sampler"]["counters"]["cpu"] == saved["sampler"]["counters"]["cpu"] + 5 * cfg.sampler_steps
    assert r1["sampler"]["seed"] == DistContext(1, 2).seed(cfg.seed, 0, S_SAMPLER)


@slow
def test_divergence_on_one_rank_rolls_back_every_rank(tmp_path):
    r0, r1 = run_worker(tmp_path, 9, "--inject-divergence-at", "6")
    assert r0["recoveries"] == r1["recoveries"] == 1
    assert [e["detail"] for e in r0["events"]] == [e["detail"] for e in r1["events"]]
    assert "injected on rank 1 at iteration 6 (on rank 1)" in r0["events"][0]["detail"]
    assert _same(r0, r1, ("params", "adam")) == [] and r0["iteration"] == r1["iteration"]
    # after the roll-back each rank draws from a reseeded stream of its own
    assert r0["sampler"]["seed"] == derive_seed(tiny_config().seed, 1, S_SAMPLER)
    assert r1["sampler"]["seed"] == DistContext(1, 2).seed(tiny_config().seed, 1, S_SAMPLER)


def _cli_job(out, *extra):
    train = ["-m", "ebmfast", "train", "--preset", "quick", "--out", str(out), "--epochs", "1000"]
    return start(*train, *TINY_CLI, *extra)


@slow
def test_killed_rank_ends_the_job_within_the_timeout(tmp_path):
    timeout = 20
    proc = _cli_job(tmp_path, "--dist-timeout", str(timeout))
    try:
        wait_for(lambda: steps_logged(tmp_path / "metrics.csv") >= 3, proc, 120, "3 training steps")
        pids = worker_pids(proc.pid)
        assert set(pids) == {0, 1}
        t0 = time.time()
        os.kill(pids[1], signal.SIGKILL)
        output, _ = proc.communicate(timeout=timeout + 60)
        elapsed = time.time() - t0
    finally:
        stop(proc)
    assert proc.returncode != 0, output[-3000:]
    assert elapsed < timeout, f"the job took {elapsed:.1f} s to end"
    # whichever collective notices first (the stop agreement, the metrics mean, DDP's all-reduce) says what happened:
    # a rank died, long before the time-out (issue 22: it said "did not answer within the time-out")
    assert re.search(r"rank 0 of 2: [a-z ]+ failed: another rank died", output), output[-3000:]


@slow
def test_sigterm_to_one_rank_stops_all_ranks_with_a_checkpoint(tmp_path):
    proc = _cli_job(tmp_path, "--dist-timeout", "60")
    try:
        wait_for(lambda: steps_logged(tmp_path / "metrics.csv") >= 3, proc, 120, "3 training steps")
        os.kill(worker_pids(proc.pid)[1], signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        stop(proc)
    assert "all 2 ranks stopped at iteration" in output, output[-3000:]
    # the first rank to leave exits 128 + SIGTERM and torchrun lists it; torchrun then sends SIGTERM to the other,
    # which may be gone already (143 too) or die of that signal (-15): both are a clean stop
    assert "143" in output, output[-3000:]
    assert not re.search(r"exitcode\s*:\s*(?!143\b|-15\b)-?\d+", output), output[-3000:]
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    stopped = int(output.split("all 2 ranks stopped at iteration ")[1].split(";")[0])
    assert ckpt["trainer"]["iteration"] == stopped >= 3
    counters = [r["sampler"]["counters"]["cpu"] for r in ckpt["distributed"]["ranks"]]
    assert counters == [stopped * 3, stopped * 3]  # both ranks ran exactly `stopped` iterations of 3 steps


@slow
def test_bench_distributed_reports_aggregate_and_per_rank(tmp_path):
    out = tmp_path / "b.json"
    args = ["--device", "cpu", "--backends", "eager", "--batch", "4", "--steps", "3", "--rounds", "2"]
    proc = torchrun("-m", "ebmfast", "bench", "--distributed", *args, "--no-progress", "--json", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "aggregate sample-steps/s" in proc.stdout and "r0 " in proc.stdout and "r1 " in proc.stdout
    assert proc.stdout.count("Sampler across 2 rank(s)") == 1  # rank 0 alone prints
    import json

    (row,) = json.loads(out.read_text())["distributed"]
    assert row["world_size"] == 2 and len(row["rank_sample_steps_per_s"]) == 2 and row["aggregate_sample_steps_per_s"]


@slow
@pytest.mark.usefixtures("one_thread")
def test_torchrun_with_one_process_is_the_plain_run(tmp_path):
    """torchrun --nproc-per-node 1 (process group, DDP of one) ends bit-identical to the plain run, and writes an
    ordinary checkpoint."""
    from dist_worker import encode

    (dist,) = run_worker(tmp_path / "dist", 12, nproc=1)
    d = small_data()
    data = type(d)(d.name, encode(d.train_images), d.train_labels, d.val_images, d.val_labels)
    cfg = tiny_config(epochs=3, snapshot_every=4, collapse_check_every=2, max_iterations=12)
    tr = Trainer(cfg, data=data, device="cpu", out_dir=tmp_path / "plain", progress=False)
    tr.fit()
    tr.close()
    assert dist["world_size"] == 1 and dist["iteration"] == 12
    plain = {
        "params": {n: p.detach() for n, p in tr.model.named_parameters()},
        "buffer": tr.buffer.storage,
        "buffer_ptr": int(tr.buffer.ptr),
        "sampler": tr.sampler.state_dict(),
        "generator": tr.gen.get_state(),
        "adam": [t for s in tr.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)],
    }
    assert _same(dist, plain) == []
    assert "distributed" not in load_checkpoint(tmp_path / "dist" / "checkpoints" / "last.pt")


def test_bench_distributed_without_torchrun_is_one_rank(capsys):
    argv = ["bench", "--distributed", "--device", "cpu", "--backends", "eager", "--batch", "2", "--steps", "2"]
    assert main([*argv, "--rounds", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "1 rank (not under torchrun)" in out and "aggregate sample-steps/s" in out and "r0 " in out
    assert main([*argv, "--csv", "x.csv"]) == 2
    assert "--csv is not supported with --distributed" in capsys.readouterr().err


@pytest.mark.cuda
def test_torchrun_one_gpu_trains_and_benches(tmp_path):
    """The CUDA path on one GPU: NCCL with the gloo control group, DDP with device_ids, a checkpoint, and bench
    --distributed. Eager chains (no compile) to keep the GPU check short; the graph sampler beside DDP is left to a
    full run."""
    (r,) = run_worker(tmp_path, 6, "--device", "cuda", nproc=1)
    assert (r["backend"], r["device"], r["iteration"]) == ("nccl", "cuda:0", 6)
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["trainer"]["iteration"] == 6
    args = ["--device", "cuda", "--backends", "eager", "--batch", "128", "--steps", "10", "--rounds", "2"]
    proc = torchrun("-m", "ebmfast", "bench", "--distributed", *args, "--no-progress", nproc=1)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "aggregate sample-steps/s" in proc.stdout and "Sampler across 1 rank(s)" in proc.stdout
