"""Try ebmfast as a new user would, with bad inputs, faults of the machine and signals, and write the table of
outcomes into docs/faults.md (between the ``probe table`` markers).

    PYTHONPATH=. python docs/fault_probe.py            # about two minutes on a 2-core CPU

Every case states what should happen: ``error`` (the command exits 2 with exactly one line on stderr, no traceback),
``ok`` (exit 0), an exit code, or a named exception from the library. Each case is also checked for hangs (a time
limit) and for files it must not touch (a checkpoint, a classifier cache, a picture, a CSV: their hashes before and
after). Command-line cases run in this process through ``ebmfast.cli.main``; signals and file-size limits run in
child processes. Not a pytest file (pytest collects ``tests/`` only).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ebmfast import CNNModel, LangevinSampler, ReplayBuffer, langevin_reference  # noqa: E402
from ebmfast.cli import main  # noqa: E402
from ebmfast.errors import CheckpointError, NonFiniteError, OutputPathError  # noqa: E402
from ebmfast.training.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from ebmfast.training.config import TrainConfig  # noqa: E402

CASE_LIMIT_S = 120  # a case running longer is recorded as a hang
CKPT = ROOT / "tests" / "data" / "checkpoint_v1.pt"  # a real training checkpoint (hidden_features=2)


@dataclass
class Result:
    area: str
    case: str
    expected: str
    outcome: str
    ok: bool
    seconds: float


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang


def _digest(paths) -> dict:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths if p.is_file()}


class Probe:
    def __init__(self, work: Path):
        self.work = work
        self.results: list[Result] = []
        w = work
        self.model = w / "model.pt"
        shutil.copyfile(CKPT, self.model)
        self.model_png = w / "model.png"
        shutil.copyfile(CKPT, self.model_png)
        self.model_json = w / "model.json"
        shutil.copyfile(CKPT, self.model_json)
        self.foreign = w / "foreign.pt"
        torch.save({"weights": torch.zeros(3)}, self.foreign)
        self.text = w / "notes.txt"
        self.text.write_text("not a checkpoint\n")
        self.empty = w / "empty.pt"
        self.empty.write_bytes(b"")
        self.truncated = w / "truncated.pt"
        self.truncated.write_bytes(CKPT.read_bytes()[:2000])
        self.folder = w / "folder"
        self.folder.mkdir()
        self.other_csv = w / "other.csv"
        self.other_csv.write_text("a,b\n1,2\n")
        self.picture = w / "picture.png"
        self.picture.write_bytes(b"\x89PNG\r\n\x1a\n not really")
        self.run_dir = w / "earlier_run"
        (self.run_dir / "checkpoints").mkdir(parents=True)
        shutil.copyfile(CKPT, self.run_dir / "checkpoints" / "last.pt")
        shutil.copyfile(CKPT, self.run_dir / "checkpoints" / "mnist_classifier.pt")
        self.protected = [
            self.model,
            self.model_png,
            self.model_json,
            self.foreign,
            self.text,
            self.truncated,
            self.other_csv,
            self.picture,
            self.run_dir / "checkpoints" / "last.pt",
            self.run_dir / "checkpoints" / "mnist_classifier.pt",
        ]
        self.long = "n" * 300
        self.abbreviations: dict[str, str] = {}  # long, repeated command prefixes -> a short name (legend in the doc)

    # ------------------------------------------------------------------------------------------------ running
    def _short(self, text: str) -> str:
        for full, short in self.abbreviations.items():
            text = text.replace(full, short)
        return text.replace(str(self.work) + "/", "").replace(self.long, "<300 x n>")

    def _record(self, area, case, expected, outcome, ok, t0, before):
        case, outcome = self._short(case), self._short(outcome)
        if len(outcome) > 240:
            outcome = outcome[:237] + "..."
        after = _digest(self.protected)
        changed = [p.name for p in before if before[p] != after.get(p)]
        if changed:
            outcome += f"; CHANGED {changed}"
            ok = False
        self.results.append(Result(area, case, expected, outcome, ok, time.perf_counter() - t0))
        mark = "ok  " if ok else "FAIL"
        print(f"{mark} {area:9s} {case[:80]:80s} {outcome[:110]}", flush=True)

    def cli(self, area: str, argv: list[str], expected="error", match: str | None = None, case: str | None = None):
        """``ebmfast ARGV`` in this process; ``expected``: "error" (exit 2, one line), "ok" or an exit code."""
        before = _digest(self.protected)
        t0 = time.perf_counter()
        err, out = io.StringIO(), io.StringIO()
        signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(CASE_LIMIT_S)
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
                try:
                    rc = main([str(a) for a in argv])
                except SystemExit as exc:
                    rc = exc.code
            signal.alarm(0)
        except Hang:
            rc, outcome = None, f"HANG (> {CASE_LIMIT_S} s)"
        except BaseException as exc:  # a traceback the user would have seen
            signal.alarm(0)
            rc, outcome = None, f"TRACEBACK {type(exc).__name__}: {str(exc)[:120]}"
        lines = [line for line in err.getvalue().splitlines() if not line.startswith("[")]  # progress lines
        if rc is not None:
            last = lines[-1] if lines else ""
            outcome = f"exit {rc}" + (f": {last}" if last else "")
        if rc is None:
            ok = False
        elif expected == "error":
            ok = rc == 2 and len(lines) == 1 and (match is None or match in lines[0])
        elif expected == "ok":
            ok = rc == 0
        else:
            ok = rc == int(expected) and (match is None or match in err.getvalue())
        self._record(area, case or " ".join(str(a) for a in argv), expected, outcome, ok, t0, before)

    def api(self, case: str, fn, expected: type[BaseException] | None, match: str | None = None):
        """A library call: ``expected`` is the exception it must raise with ``match`` in its message (None: runs)."""
        before = _digest(self.protected)
        t0 = time.perf_counter()
        signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(CASE_LIMIT_S)
        try:
            fn()
            signal.alarm(0)
            outcome, ok = "returned", expected is None
        except Hang:
            outcome, ok = f"HANG (> {CASE_LIMIT_S} s)", False
        except BaseException as exc:
            signal.alarm(0)
            message = " ".join(str(exc).split())
            outcome = f"{type(exc).__name__}: {message}"
            ok = expected is not None and isinstance(exc, expected) and (match is None or match in message)
            if not ok:
                traceback.print_exc()
        name = "returns" if expected is None else expected.__name__
        self._record("api", case, name, outcome, ok, t0, before)

    def process(self, case: str, argv: list[str], check, limit_fsize: int | None = None, signals=(), wait_for=None):
        """A child ``python -m ebmfast ARGV``; ``signals``: sent once ``wait_for()`` holds; ``check(rc, out)``."""
        before = _digest(self.protected)
        t0 = time.perf_counter()

        def child_setup():
            if limit_fsize is not None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit_fsize, limit_fsize))

        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        proc = subprocess.Popen(
            [sys.executable, "-m", "ebmfast", *map(str, argv)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            preexec_fn=child_setup,
        )
        try:
            if signals:
                while not wait_for() and proc.poll() is None and time.perf_counter() - t0 < CASE_LIMIT_S:
                    time.sleep(0.1)
                time.sleep(1.0)
                for sig in signals:
                    proc.send_signal(sig)
                    time.sleep(0.2)
            out, _ = proc.communicate(timeout=CASE_LIMIT_S)
            rc = proc.returncode
            ok, why = check(rc, out)
            ok = ok and "Traceback" not in out
            outcome = f"exit {rc}: {why}"
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            ok, outcome = False, f"HANG (> {CASE_LIMIT_S} s)"
        self._record("process", case, "see case", outcome, ok, t0, before)


# ---------------------------------------------------------------------------------------------------- the cases
def cli_cases(p: Probe) -> None:
    w = p.work
    train = ["train", "--preset", "quick", "--device", "cpu", "--sampler-backend", "eager", "--max-iterations", "1"]
    train += ["--quiet", "--no-tensorboard", "--out", w / "t_out"]
    p.abbreviations[" ".join(map(str, train))] = "TRAIN"
    p.abbreviations[" ".join(map(str, train[: train.index("--out")]))] = "TRAIN0"
    for flag, value, match in [
        ("--epochs", "0", "epochs must be >= 1"),
        ("--epochs", "-3", "epochs must be >= 1"),
        ("--epochs", "many", "invalid int value"),
        ("--epochs", "10000000", "epochs must be <= 1,000,000"),
        ("--batch-size", "0", "batch_size must be >= 1"),
        ("--batch-size", "1.5", "invalid int value"),
        ("--batch-size", "2000000", "batch_size must be <= 1,048,576"),
        ("--batch-size", "9000", "must be <= buffer_size (8192)"),
        ("--sampler-steps", "0", "sampler_steps must be >= 1"),
        ("--sampler-steps", "100000000", "sampler_steps must be <= 1,000,000"),
        ("--buffer-size", "0", "buffer_size must be >= 1"),
        ("--buffer-size", "1000000000", "buffer_size must be <= 16,777,216"),
        ("--buffer-size", "64", "must be <= buffer_size"),
        ("--lr", "0", "lr must be > 0"),
        ("--lr", "nan", "lr must be finite"),
        ("--lr", "inf", "lr must be finite"),
        ("--lr", "-1", "lr must be > 0"),
        ("--alpha", "-1", "alpha must be >= 0"),
        ("--hidden", "3", "hidden_features must be even"),
        ("--hidden", "0", "hidden_features must be >= 2"),
        ("--hidden", "100000", "hidden_features must be <= 4,096"),
        ("--seed", "-1", "seed must be >= 0"),
        ("--seed", str(2**63), "seed must be <="),
        ("--gen-steps", "0", "gen_steps must be >= 1"),
        ("--gen-steps", "100000000", "gen_steps must be <= 1,000,000"),
        ("--sample-every", "-1", "sample_every must be >= 0"),
        ("--max-recoveries", "-1", "max_recoveries must be >= 0"),
        ("--max-iterations", "0", "max_iterations must be >= 1"),
        ("--sync-every", "0", "sync_every must be >= 1"),
        ("--sync-every", "1000000", "sync_every must be <= 10,000"),
        ("--threads", "0", "--threads must be in"),
        ("--threads", "5000", "--threads must be in"),
        ("--dist-timeout", "0", "--dist-timeout must be > 0"),
        ("--dist-timeout", "nan", "--dist-timeout must be > 0"),
        ("--quality-every", "-1", "--quality-every must be >= 0"),
        ("--set", "foo", "--set expects KEY=VALUE"),
        ("--set", "nope=1", "unknown TrainConfig field"),
        ("--set", "lr=abc", "cannot read"),
        ("--set", "buffer_fresh_prob=2", "buffer_fresh_prob must be <= 1"),
        ("--set", "sampler_step_size=-1", "sampler_step_size must be > 0"),
        ("--preset", "fast", "invalid choice"),
        ("--device", "tpu", "device must be"),
        ("--device", "cuda:99", "CUDA"),
        ("--data", "cifar", "invalid choice"),
        ("--sampler-backend", "graph", "graph"),
        ("--sampler-backend", "turbo", "invalid choice"),
        ("--precision", "fp8", "invalid choice"),
        ("--resume", w / "missing.pt", "no checkpoint at"),
        ("--resume", p.foreign, "not an ebmfast checkpoint"),
        ("--resume", p.text, "not an ebmfast checkpoint"),
        ("--resume", p.empty, "is empty"),
        ("--resume", p.truncated, "cannot read checkpoint"),
        ("--resume", p.folder, "is a folder"),
    ]:
        p.cli("train", [*train, flag, value], match=match)
    base = train[: train.index("--out")]
    p.cli("train", [*base, "--data", "mnist", "--data-root", w / "missing"], match="MNIST not found")
    p.cli("train", [*base, "--out", p.text], match="exists and is not a folder")
    p.cli("train", [*base, "--out", "/proc/ebmfast-run"], match="cannot write in /proc")
    p.cli("train", [*base, "--out", w / p.long], match="is 300 bytes long")
    p.cli("train", [*base, "--out", p.run_dir], match="already holds a run")
    p.cli(
        "train",
        [*base, "--out", p.run_dir, "--resume", p.run_dir / "checkpoints" / "last.pt", "--quality-every", "1"],
        match="is not an ebmfast classifier cache",
        case="train --resume RUN/checkpoints/last.pt --quality-every 1, where RUN/checkpoints/mnist_classifier.pt is a "
        "checkpoint",
    )

    sample = ["sample", "--checkpoint", p.model, "--device", "cpu", "--backend", "eager"]
    out_png = ["--out", w / "s_out" / "grid.png"]
    for args, match in [
        (["--n", "0"], "--n must be in"),
        (["--n", "1000000"], "--n must be in"),
        (["--steps", "0"], "--steps must be in"),
        (["--steps", "100000000"], "--steps must be in [1, 1,000,000]"),
        (["--seed", "-1"], "--seed must be in"),
        (["--nrow", "0"], "--nrow"),
        (["--backend", "graph"], "graph"),
        (["--device", "tpu"], "device must be"),
    ]:
        p.cli("sample", [*sample, *out_png, *args], match=match)
    for out, match in [
        (w / "grid.txt", ".png"),
        ("/proc/x.png", "cannot write in /proc"),
        (p.text / "grid.png", "is not a folder"),
        (w / (p.long + ".png"), "is 304 bytes long"),
        (p.model_png, "holds a torch file"),
        (p.folder, ".png"),
    ]:
        p.cli("sample", [*sample, "--out", out], match=match)
    for ckpt, match in [
        (w / "missing.pt", "no checkpoint at"),
        (p.foreign, "not an ebmfast checkpoint"),
        (p.text, "not an ebmfast checkpoint"),
        (p.empty, "is empty"),
        (p.truncated, "cannot read checkpoint"),
        (p.folder, "is a folder"),
    ]:
        p.cli("sample", ["sample", "--checkpoint", ckpt, "--device", "cpu", *out_png], match=match)
    p.cli("sample", ["sample", *out_png], match="required: --checkpoint")

    evaluate = ["evaluate", "--checkpoint", p.model, "--device", "cpu", "--quiet", "--out", w / "e_out"]
    p.abbreviations[" ".join(map(str, evaluate))] = "EVALUATE"
    for args, match in [
        (["--n-samples", "1"], "--n-samples must be >= 2"),
        (["--n-samples", "5000"], "too large"),
        (["--steps", "0"], "--steps must be in"),
        (["--steps", "100000000"], "--steps must be in"),
        (["--n-ood", "0"], "--n-ood must be in"),
        (["--classifier-epochs", "0"], "--classifier-epochs must be in"),
        (["--seed", "-1"], "--seed"),
        (["--data", "cifar"], "invalid choice"),
        (["--backend", "graph"], "graph"),
        (["--classifier", p.model], "is not an ebmfast classifier cache (an ebmfast checkpoint)"),
        (["--classifier", p.foreign], "is not an ebmfast classifier cache (another torch file)"),
        (["--classifier", p.text], "is not an ebmfast classifier cache (not a torch file)"),
        (["--classifier", p.folder], "is a folder"),
    ]:
        p.cli("evaluate", [*evaluate, *args], match=match)
    p.cli(
        "evaluate",
        ["evaluate", "--device", "cpu", "--checkpoint", p.model, "--classifier", p.model, "--n-samples", "4"]
        + ["--steps", "2", "--n-ood", "8", "--classifier-epochs", "1"],
        match="left alone",
        case="issue 22 repro: evaluate --classifier naming the checkpoint being evaluated",
    )
    for out, match in [
        (p.text, "exists and is not a folder"),
        ("/proc/report", "cannot write in /proc"),
        (w / p.long, "is 300 bytes long"),
    ]:
        p.cli("evaluate", ["evaluate", "--checkpoint", p.model, "--device", "cpu", "--out", out], match=match)
    for ckpt, match in [(w / "missing.pt", "no file at"), (p.foreign, "not an ebmfast checkpoint")]:
        p.cli("evaluate", ["evaluate", "--checkpoint", ckpt, "--device", "cpu", "--out", w / "e_out"], match=match)

    bench = ["bench", "--device", "cpu", "--no-progress", "--json", w / "b_out" / "b.json"]
    p.abbreviations[" ".join(map(str, bench))] = "BENCH"
    for args, match in [
        (["--batch", "0"], "--batch values must be positive"),
        (["--batch", "100000000"], "--batch must be <="),
        (["--steps", "-2"], "--steps values must be positive"),
        (["--steps", "100000000"], "--steps must be <="),
        (["--rounds", "0"], "--rounds"),
        (["--rounds", "100000000"], "--rounds must be <="),
        (["--train-iters", "0"], "--train-iters"),
        (["--train-batch", "0"], "--train-batch"),
        (["--hidden-features", "3"], "--hidden-features must be an even integer"),
        (["--backends", "turbo"], "backend must be one of"),
        (["--backends", "graph"], "not available on cpu"),
        (["--precision", "fp8"], "invalid choice"),
    ]:
        p.cli("bench", [*bench, *args], match=match)
    for args, match in [
        (["--json", "/proc/b.json"], "cannot write in /proc"),
        (["--csv", p.other_csv], "expected"),
        (["--json", p.model_json], "holds a torch file"),
        (["--json", w / (p.long + ".json")], "is 305 bytes long"),
    ]:
        p.cli("bench", ["bench", "--device", "cpu", "--no-progress", *args], match=match)
    p.cli("command", [], match="required: COMMAND")
    p.cli("command", ["frobnicate"], match="invalid choice")

    # what should work, works (and writes only what it was asked to)
    p.cli("sample", [*sample, "--n", "4", "--steps", "2", "--out", w / "ok" / "grid.png"], expected="ok")
    p.cli(
        "evaluate",
        [*evaluate[:-1], w / "ok_eval", "--n-samples", "4", "--steps", "2", "--n-ood", "8"]
        + ["--classifier-epochs", "1", "--classifier", w / "ok" / "clf.pt"],
        expected="ok",
    )
    p.cli(
        "evaluate",
        [*evaluate[:-1], w / "ok_eval2", "--n-samples", "4", "--steps", "2", "--n-ood", "8"]
        + ["--classifier-epochs", "1", "--classifier", w / "ok" / "clf.pt"],
        expected="ok",
        case="evaluate again with the classifier cache it wrote (reused, rewritten only if stale)",
    )


class _Scores(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.w = torch.nn.Parameter(torch.tensor(0.5))

    def forward(self, x):
        return self.fn(x, self.w)


def api_cases(p: Probe) -> None:
    cnn = CNNModel(hidden_features=2)
    img = torch.zeros(2, 1, 28, 28)

    def s(model=cnn, **kw):
        kw.setdefault("steps", 2)
        kw.setdefault("backend", "eager")
        return LangevinSampler(model, **kw)

    nan_model = _Scores(lambda x, w: w * (x**2).flatten(1).sum(1) * float("nan"))
    cases = [
        ("meta-device input", lambda: s().sample(torch.zeros(2, 1, 28, 28, device="meta")), ValueError, "meta"),
        ("sparse input", lambda: s().sample(img.to_sparse()), TypeError, "dense tensor"),
        ("integer input", lambda: s().sample(img.int()), TypeError, "floating-point"),
        ("complex input", lambda: s().sample(img.to(torch.complex64)), TypeError, "floating-point"),
        ("bool input", lambda: s().sample(img.bool()), TypeError, "floating-point"),
        ("1-D input", lambda: s().sample(torch.zeros(5)), ValueError, "batch dimension"),
        ("empty batch", lambda: s().sample(torch.zeros(0, 1, 28, 28)), ValueError, "empty batch"),
        ("NaN input", lambda: s().sample(img * float("nan")), ValueError, "must be finite"),
        ("inf input", lambda: s().sample(img + float("inf")), ValueError, "must be finite"),
        ("list input", lambda: s().sample([[0.0]]), TypeError, "torch.Tensor"),
        ("float64 input, float32 model", lambda: s().sample(img.double()), TypeError, "dtype"),
        ("wrong image shape", lambda: s().sample(torch.zeros(2, 1, 28, 27)), ValueError, "28"),
        ("NaN energy, eager", lambda: s(nan_model).sample(torch.rand(3, 4)), NonFiniteError, "3 of 3 samples"),
        ("NaN energy, fused", lambda: s(nan_model, backend="fused").sample(torch.rand(3, 4)), NonFiniteError, "3 of 3"),
        (
            "NaN energy with trajectory: the step is named",
            lambda: s(nan_model).sample(torch.rand(3, 4), return_trajectory=True),
            NonFiniteError,
            "first at step 1 of 2",
        ),
        (
            "NaN energy with a finite gradient (f = -|x|^2/2 + NaN), eager",
            lambda: s(_Scores(lambda x, w: -0.5 * (x**2).sum(1) + w * float("nan"))).sample(torch.rand(3, 4)),
            NonFiniteError,
            "first at step 1 of 2",
        ),
        (
            "expanded input gradient (f = w * sum x), eager",
            lambda: s(_Scores(lambda x, w: x.flatten(1).sum(1) * w)).sample(torch.zeros(3, 4)),
            None,
            None,
        ),
        (
            "model returning (N, 2)",
            lambda: s(torch.nn.Linear(4, 2)).sample(torch.zeros(3, 4)),
            ValueError,
            "one score per sample",
        ),
        (
            "model returning a scalar",
            lambda: s(_Scores(lambda x, w: (x * w).sum())).sample(torch.zeros(3, 4)),
            ValueError,
            "one score per sample",
        ),
        ("a function, not a module", lambda: LangevinSampler(lambda x: x.sum(1)), TypeError, "nn.Module"),
        ("steps=0", lambda: s(steps=0), ValueError, "steps must be a positive integer"),
        ("steps=2.5", lambda: s(steps=2.5), ValueError, "steps must be a positive integer"),
        ("step_size=nan", lambda: s(step_size=float("nan")), ValueError, "step_size must be finite"),
        ("clamp reversed", lambda: s(clamp=(1.0, -1.0)), ValueError, "low < high"),
        ("backend unknown", lambda: s(backend="turbo"), ValueError, "backend must be one of"),
        ("seed negative", lambda: s(seed=-1), ValueError, "seed must be a non-negative integer"),
        ("graph backend on CPU", lambda: s(backend="graph").sample(img), ValueError, "needs a CUDA device"),
        ("ReplayBuffer capacity 0", lambda: ReplayBuffer((1, 28, 28), capacity=0), ValueError, "capacity"),
        (
            "ReplayBuffer push of NaN",
            lambda: ReplayBuffer((4,), 8).push(torch.full((2, 4), float("nan"))),
            ValueError,
            "must be finite",
        ),
        (
            "reference with noise of the wrong shape",
            lambda: langevin_reference(cnn, img, steps=2, noise=torch.zeros(3, 2, 1, 28, 28)),
            ValueError,
            "noise must have shape",
        ),
        ("TrainConfig(sampler_steps=10**8)", lambda: TrainConfig(sampler_steps=10**8), ValueError, "the seed uses"),
        ("load_checkpoint of a foreign torch file", lambda: load_checkpoint(p.foreign), CheckpointError, "not an"),
        ("load_checkpoint of a truncated file", lambda: load_checkpoint(p.truncated), CheckpointError, "cannot read"),
    ]
    for case, fn, expected, match in cases:
        p.api(case, fn, expected, match)

    # faults of the machine while saving a checkpoint: injected where they cannot be produced as root
    for err in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS):
        p.api(
            f"save_checkpoint with {errno.errorcode[err]} (injected)",
            _injected_save(p.work, err),
            OutputPathError,
            "unchanged",
        )
    p.api(
        "save_checkpoint to a 300-byte name (real ENAMETOOLONG)",
        lambda: save_checkpoint(p.work / (p.long + ".pt"), {"a": 1}),
        OutputPathError,
        "a file name is longer",
    )
    from ebmfast.data import load_dataset
    from ebmfast.evaluation.quality import ClassifierConfig, load_or_train_classifier

    p.api(
        "load_or_train_classifier at a checkpoint's path",
        lambda: load_or_train_classifier(p.model, load_dataset("mnist5k"), ClassifierConfig(epochs=1), progress=False),
        OutputPathError,
        "an ebmfast checkpoint",
    )


def _injected_save(work: Path, err: int):
    def run():
        path = work / f"inject_{errno.errorcode[err]}.pt"
        save_checkpoint(path, {"v": 1})
        real = torch.save

        def broken(obj, fh, *a, **k):
            fh.write(b"partial")
            raise OSError(err, os.strerror(err))

        torch.save = broken
        try:
            save_checkpoint(path, {"v": 2})
        finally:
            torch.save = real
            assert load_checkpoint(path)["v"] == 1, "the previous checkpoint changed"

    return run


def process_cases(p: Probe) -> None:
    w = p.work
    tiny = ["--device", "cpu", "--hidden", "8", "--batch-size", "16", "--sampler-backend", "eager", "--quiet"]
    tiny += ["--no-tensorboard", "--sample-every", "0", "--threads", "1"]

    def started(out):
        return lambda: (out / "train.log").exists() and "iterations:" in (out / "train.log").read_text()

    out = w / "p_sigterm"
    p.process(
        "SIGTERM in the first iteration of a 1,000,000-step chain (issue 22 repro, bounded flag)",
        ["train", "--preset", "quick", "--out", out, *tiny, "--max-iterations", "1", "--sampler-steps", "1000000"],
        lambda rc, o: (
            rc == 143 and load_checkpoint(out / "checkpoints" / "last.pt")["trainer"]["iteration"] == 0,
            "stopped at the next chunk, last.pt at iteration 0",
        ),
        signals=[signal.SIGTERM],
        wait_for=started(out),
    )
    out2 = w / "p_sigterm2"
    p.process(
        "two SIGTERMs in a long chain: the second ends at once",
        ["train", "--preset", "quick", "--out", out2, *tiny, "--max-iterations", "1", "--sampler-steps", "1000000"],
        lambda rc, o: (rc == 130 and "interrupted" in o, o.strip().splitlines()[-1][:80] if o.strip() else ""),
        signals=[signal.SIGTERM, signal.SIGTERM],
        wait_for=started(out2),
    )
    out3 = w / "p_sigint"
    p.process(
        "SIGINT during training with short chains",
        ["train", "--preset", "quick", "--out", out3, *tiny, "--sampler-steps", "5"],
        lambda rc, o: (rc == 130 and (out3 / "checkpoints" / "last.pt").is_file(), "checkpoint saved, exit 130"),
        signals=[signal.SIGINT],
        wait_for=started(out3),
    )
    out4 = w / "p_fsize"
    p.process(
        "ulimit -f 20000 (KiB) below the 26 MB checkpoint (issue 22 repro)",
        ["train", "--preset", "quick", "--out", out4, *tiny, "--max-iterations", "1", "--sampler-steps", "2"],
        lambda rc, o: (
            rc == 2 and "file too large" in o and not list((out4 / "checkpoints").glob("*")),
            o.strip().splitlines()[-1].replace(str(w) + "/", "")[:120],
        ),
        limit_fsize=20_000 * 1024,
    )
    p.process(
        "python -m ebmfast without a command",
        [],
        lambda rc, o: (rc == 2 and len(o.strip().splitlines()) == 1, o.strip()[:80]),
    )


# ---------------------------------------------------------------------------------------------------- the table
def write_table(results: list[Result], path: Path, abbreviations: dict[str, str], work: Path) -> None:
    bad = [r for r in results if not r.ok]
    tracebacks = sum("TRACEBACK" in r.outcome for r in results)
    hangs = sum("HANG" in r.outcome for r in results)
    changed = sum("CHANGED" in r.outcome for r in results)
    lines = [
        "<!-- probe table: written by docs/fault_probe.py; do not edit by hand -->",
        f"{len(results)} cases, {len(results) - len(bad)} as expected; {tracebacks} tracebacks, {hangs} hangs, "
        f"{changed} cases that changed a file they must not touch. Whole probe: "
        f"{sum(r.seconds for r in results):.0f} s on {os.cpu_count()} CPU cores.",
        "",
        "Abbreviations: "
        + "; ".join(f"{short} = `{full.replace(str(work) + '/', '')}`" for full, short in abbreviations.items()),
        "",
        "| # | area | case | expected | outcome | as expected |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for i, r in enumerate(results, 1):
        cells = [str(i), r.area, r.case, r.expected, r.outcome, "yes" if r.ok else "**no**"]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines.append("<!-- end of probe table -->")
    table = "\n".join(lines)
    text = path.read_text() if path.exists() else ""
    new = re.sub(r"<!-- probe table.*?<!-- end of probe table -->", lambda m: table, text, flags=re.S)
    if new == text and table not in text:
        new = text.rstrip() + "\n\n" + table + "\n"
    path.write_text(new)


def run() -> int:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="ebmfast-fault-probe-") as tmp:
        probe = Probe(Path(tmp))
        cli_cases(probe)
        api_cases(probe)
        process_cases(probe)
    write_table(probe.results, ROOT / "docs" / "faults.md", probe.abbreviations, probe.work)
    bad = [r for r in probe.results if not r.ok]
    print(f"{len(probe.results)} cases, {len(bad)} not as expected; table in docs/faults.md")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(run())
