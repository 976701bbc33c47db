"""Installed without the ``train`` extra (no torchvision, matplotlib, TensorBoard, mlxtend, Pillow), ebmfast still
imports, the sampler works, ``ebmfast bench`` measures, and the commands that need a missing package say which extra
to install, in one line with exit code 2. One subprocess in which those packages cannot be imported (a ``None``
entry in ``sys.modules`` makes ``import`` and ``importlib.util.find_spec`` report them missing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CKPT = str(ROOT / "tests" / "data" / "checkpoint_v1.pt")
OPTIONAL = ("torchvision", "matplotlib", "tensorboard", "mlxtend", "PIL")

SCRIPT = """
import contextlib, io, json, sys
OPTIONAL, CKPT, TMP = {optional!r}, {ckpt!r}, {tmp!r}
for m in OPTIONAL:
    sys.modules[m] = None
import torch
import ebmfast
outer_loaded = sorted(m for m in sys.modules if m.split(".")[:2] in (["ebmfast", "training"], ["ebmfast", "evaluation"],
                      ["ebmfast", "benchmark"], ["ebmfast", "cli"]))
from ebmfast import CNNModel, LangevinSampler, ReplayBuffer, Trainer, TrainConfig, load_model  # lazy names resolve
from ebmfast.cli import build_parser, main

build_parser()  # every command's module imports
x = ReplayBuffer((1, 28, 28), capacity=8).draw(4)
samples = LangevinSampler(CNNModel(8), steps=2, backend="eager", seed=0).sample(x)
result = {{"sampled": list(samples.shape), "outer_loaded_by_import": outer_loaded}}

def run(argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(argv)
        except SystemExit as exc:
            rc = exc.code
    return rc, err.getvalue()

small = ["--device", "cpu", "--backends", "eager", "--batch", "2", "--steps", "2", "--rounds", "2", "--no-train",
         "--no-peak", "--no-progress", "--json", TMP + "/b.json"]
result["bench"] = run(["bench", *small])
result["train"] = run(["train", "--out", TMP + "/run", "--device", "cpu", "--no-tensorboard"])
result["sample"] = run(["sample", "--checkpoint", CKPT, "--out", TMP + "/g.png", "--device", "cpu"])
result["evaluate"] = run(["evaluate", "--checkpoint", CKPT, "--out", TMP + "/report", "--device", "cpu", "--quiet"])
result["still_blocked"] = [m for m in OPTIONAL if sys.modules.get(m, 0) is not None]
print(json.dumps(result))
"""


def test_core_works_without_the_train_extra(tmp_path):
    code = SCRIPT.format(optional=OPTIONAL, ckpt=CKPT, tmp=str(tmp_path))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(res.stdout.strip().splitlines()[-1])
    assert r["sampled"] == [4, 1, 28, 28]
    assert r["outer_loaded_by_import"] == []  # `import ebmfast` loads the engine only
    assert r["still_blocked"] == []  # nothing replaced the blocked entries (nothing imported them another way)
    assert r["bench"][0] == 0, r["bench"][1]
    assert json.loads((tmp_path / "b.json").read_text())["sampler"][0]["median_s"] > 0
    for command, needs in (("train", "mlxtend"), ("sample", "pillow"), ("evaluate", "matplotlib")):
        rc, err = r[command]
        assert rc == 2 and len(err.splitlines()) == 1, (command, err)
        assert needs in err and "ebmfast[train]" in err, (command, err)
    assert not (tmp_path / "run").exists() and not (tmp_path / "g.png").exists()
