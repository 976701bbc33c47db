"""The ``ebmfast evaluate`` report: what a trained energy model does, with pictures and a JSON of every number.

Sections (``OUT/report.md``, PNGs next to it, ``OUT/report.json``):
1. Generation from scratch: chains from U(-1, 1) over ``steps`` (256) Langevin steps; the seed's figure (every
   32nd step of 8 chains), f(x) along those chains, and a grid of final samples labelled by the classifier.
2. Out-of-distribution (``ood.py``): the seed's table (mean f(x) of random images and a training batch; f(x) of one
   test image, noisy, flipped, shrunk), then the same transformations on many test images with AUROC of the test
   digits against each set, against uniform noise, training digits and Fashion-MNIST (when on the machine), and
   histograms.
3. Sample quality (``quality.py``): class distribution and mean confidence of the generated samples under the
   project's MNIST classifier (trained on first use, cached beside the checkpoint), and the Fréchet distance of their
   classifier features to real digits, next to the real-vs-real and noise-vs-real baselines.
4. Health checks: the seed warns that energy models often diverge; the report flags the usual signs.

The figures are drawn by ``pictures.py``; the command line is ``ebmfast.cli.evaluate``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch

from ..data import DataNotFoundError, find_fashion_mnist, load_dataset, load_fashion_mnist
from ..sampler import LangevinSampler
from ..training.config import config_value
from . import ood as _ood
from . import quality as _q
from .generate import generate_from_noise, noise_start, sampler_settings
from .pictures import (
    plot_chain_energy,
    plot_class_distribution,
    plot_energy_histograms,
    plot_generation_steps,
    plot_samples,
    plot_transform_examples,
)

__all__ = ["evaluate_model", "write_report", "shown_steps", "check_n_samples", "checkpoint_provenance"]

N_TRAJECTORY_CHAINS = 8  # the seed's figure: 8 chains
N_SHOWN_SAMPLES = 64


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None  # JSON has no NaN/inf
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def shown_steps(steps: int, columns: int = 8) -> list[int]:
    """Steps shown in the generation figure: the start (0) and every ``steps // columns``-th step (the seed: 256
    steps -> 0, 32, 64, ..., 256)."""
    stride = max(1, steps // columns)
    return [0] + list(range(stride, steps + 1, stride))


def check_n_samples(n_samples: int, data) -> str | None:
    """Why ``n_samples`` does not work with ``data`` (None when it does)."""
    if n_samples < 2:
        return f"n_samples must be >= 2 (the Fréchet distance needs a covariance), got {n_samples}"
    if n_samples > len(data.train_images) // 2 and n_samples > len(data.val_images):
        return (
            f"n_samples={n_samples} is too large for {data.name}: the real-vs-real baseline needs "
            f"{n_samples} held-out digits (have {len(data.val_images)}) or 2 x {n_samples} training "
            f"digits (have {len(data.train_images)})"
        )
    return None


def evaluate_model(
    model: torch.nn.Module,
    config: dict | None,
    out_dir,
    *,
    data=None,
    device: torch.device | str = "cpu",
    n_samples: int = 256,
    steps: int = 256,
    seed: int = 0,
    n_ood: int = 1000,
    fashion_root=None,
    use_fashion: bool = True,
    backend: str | None = None,
    classifier_path=None,
    classifier_config: _q.ClassifierConfig | None = None,
    checkpoint_info: dict | None = None,
    log=None,
    progress: bool = False,
    buffer_images: torch.Tensor | None = None,
) -> dict:
    """Run every analysis on ``model`` and write the report into ``out_dir``; returns the JSON dict.

    ``buffer_images``: the replay buffer stored in a training checkpoint (persistent chains, which look much more
    like digits than short chains from noise early in training); when given, its quality is reported too."""
    log = log or (lambda msg: None)
    classifier_config = classifier_config or _q.ClassifierConfig()
    device = torch.device(device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = config or {}
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    warnings_: list[str] = []
    model = model.to(device).eval()

    if data is None:
        data = load_dataset(config_value(config, "data", "mnist5k"), config_value(config, "data_root"))
    problem = check_n_samples(n_samples, data)
    if problem:
        raise ValueError(problem)

    # ---- sampler, from the checkpoint's settings
    if backend is None:
        backend = "auto" if device.type == "cuda" else "eager"
    sampler_kwargs = sampler_settings(config)
    sampler = LangevinSampler(model, steps=steps, backend=backend, seed=seed, **sampler_kwargs)

    gen = _generation(sampler, model, n_samples, steps, seed, device, out_dir, timings, log)
    fashion, fashion_note = _fashion(use_fashion, fashion_root)
    ood = _ood_step(model, data, fashion, fashion_note, n_ood, seed, gen["chain_scores"], out_dir, timings, log)
    quality, images = _quality(
        model,
        data,
        gen["samples"],
        n_samples,
        steps,
        seed,
        device,
        out_dir,
        classifier_path,
        classifier_config,
        buffer_images,
        progress,
        timings,
        warnings_,
        log,
    )
    warnings_ += _health_warnings(ood, gen["chain_scores"], quality)

    result = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "checkpoint": checkpoint_info or {},
        "model_config": config,
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else platform.processor() or platform.machine(),
        },
        "settings": {
            "n_samples": n_samples,
            "steps": steps,
            "seed": seed,
            "n_ood": n_ood,
            "data": data.name,
            "sampler": dict(sampler_kwargs, backend=backend, resolved_backend=sampler.last_backend),
        },
        "generation": {
            "steps_shown": gen["steps_shown"],
            "chain_mean_score_at_shown_steps": [float(gen["chain_scores"][s].mean()) for s in gen["steps_shown"]],
            "sample_score_mean": float(gen["sample_scores"].mean()),
            "sample_score_std": float(gen["sample_scores"].std()),
            "sample_steps_per_s": n_samples * steps / timings["generation_s"] if timings["generation_s"] > 0 else None,
        },
        "ood": ood.to_json(),
        "quality": quality,
        "warnings": warnings_,
        "timings_s": dict(timings, total=time.perf_counter() - t_start),
        "files": {"markdown": "report.md", "json": "report.json", "images": images},
    }
    result = _jsonable(result)
    (out_dir / "report.json").write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    write_report(result, out_dir / "report.md")
    log(f"report written: {out_dir / 'report.md'}")
    return result


def _generation(sampler, model, n_samples: int, steps: int, seed: int, device, out_dir: Path, timings, log) -> dict:
    """Step 1, generation from scratch: the trajectory chains (and their figure), the samples, their scores."""
    log(f"generating {N_TRAJECTORY_CHAINS} chains x {steps} steps (trajectory) and {n_samples} chains for quality")
    t0 = time.perf_counter()
    _, traj = generate_from_noise(
        sampler, model, N_TRAJECTORY_CHAINS, steps, seed, device=device, return_trajectory=True
    )
    start = noise_start(N_TRAJECTORY_CHAINS, (1, 28, 28), seed, device=traj.device, dtype=traj.dtype)
    traj = torch.cat([start[None], traj])  # index t = state after t steps
    timings["trajectory_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    samples = generate_from_noise(sampler, model, n_samples, steps, seed + 1, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    timings["generation_s"] = time.perf_counter() - t0
    samples = samples.float().cpu()
    steps_shown = shown_steps(steps)
    plot_generation_steps(traj[steps_shown], steps_shown, out_dir / "generation_steps.png")
    chain_scores = _ood.batch_scores(model, traj.reshape(-1, 1, 28, 28).float(), device=device)
    chain_scores = chain_scores.reshape(steps + 1, N_TRAJECTORY_CHAINS).double().numpy()
    sample_scores = _ood.batch_scores(model, samples, device=device)
    return {
        "samples": samples,
        "steps_shown": steps_shown,
        "chain_scores": chain_scores,
        "sample_scores": sample_scores,
    }


def _fashion(use_fashion: bool, fashion_root) -> tuple:
    """Fashion-MNIST for the OOD table, or None and the note that says why its row is skipped."""
    fashion, fashion_note = None, None
    if use_fashion:
        folder = find_fashion_mnist(fashion_root)
        if folder is None:
            fashion_note = (
                "Fashion-MNIST not found on this machine (looked in --fashion-root, $EBMFAST_FASHION_MNIST "
                "and Debian's dataset-fashion-mnist locations): its row is skipped. "
                "`apt-get install dataset-fashion-mnist` adds it."
            )
        else:
            try:
                fashion = load_fashion_mnist(folder)
            except (DataNotFoundError, ValueError, OSError) as exc:
                fashion_note = f"Fashion-MNIST at {folder} could not be read ({exc}): its row is skipped."
    else:
        fashion_note = "Fashion-MNIST disabled for this run: its row is skipped."
    return fashion, fashion_note


def _ood_step(model, data, fashion, fashion_note, n_ood: int, seed: int, chain_scores, out_dir: Path, timings, log):
    """Step 2, out-of-distribution: the sets' scores and AUROCs, their figures, the chains' score figure."""
    log(f"out-of-distribution scores ({min(n_ood, len(data.val_images))} images per set)")
    t0 = time.perf_counter()
    ood = _ood.ood_analysis(model, data.val_images, data.train_images, fashion=fashion, n=n_ood, seed=seed)
    if fashion_note:
        ood.notes.append(fashion_note)
    plot_energy_histograms(ood.scores, out_dir / "ood_histograms.png", title="f(x) = -E(x): test digits vs each set")
    plot_transform_examples(model, data.val_images[0], out_dir / "ood_transforms.png", noise_seed=seed)
    timings["ood_s"] = time.perf_counter() - t0
    plot_chain_energy(
        chain_scores,
        {"mean f(test digits)": ood.summary["test"]["mean"], "mean f(uniform noise)": ood.summary["noise"]["mean"]},
        out_dir / "generation_energy.png",
    )
    return ood


def _quality(
    model,
    data,
    samples: torch.Tensor,
    n_samples: int,
    steps: int,
    seed: int,
    device,
    out_dir: Path,
    classifier_path,
    classifier_config,
    buffer_images,
    progress: bool,
    timings,
    warnings_: list[str],
    log,
) -> tuple[dict, list[str]]:
    """Step 3, sample quality: the classifier (cached), class statistics and Fréchet distances of the samples (and
    of the checkpoint's replay buffer), their figures. Returns the report's ``quality`` part and its image files."""
    if classifier_path is None:
        classifier_path = out_dir / _q.CLASSIFIER_FILENAME
    log(f"classifier: {classifier_path}")
    t0 = time.perf_counter()
    clf, clf_info = _q.load_or_train_classifier(classifier_path, data, classifier_config, device, progress=progress)
    timings["classifier_s"] = time.perf_counter() - t0
    if clf_info.get("stale_reason"):
        log(f"classifier cache was stale ({clf_info['stale_reason']}): retrained")
    if clf_info.get("val_accuracy", 1.0) < 0.95:
        warnings_.append(
            f"the MNIST classifier reaches only {clf_info['val_accuracy']:.1%} on held-out digits "
            "(target >= 95%): treat the class statistics with care"
        )
    log("sample quality")
    t0 = time.perf_counter()
    base = _q.fd_baselines(clf, data, n_samples, generator=torch.Generator().manual_seed(seed + 2))
    gen_q = _q.sample_quality(clf, samples, base["reference_feats"])
    _, real_probs = _q.classifier_outputs(clf, data.val_images)
    real_stats = _q.class_statistics(real_probs)
    _, sample_probs = _q.classifier_outputs(clf, samples[:N_SHOWN_SAMPLES])
    buffer_q = None
    images = [
        "generation_steps.png",
        "generation_energy.png",
        "samples.png",
        "ood_transforms.png",
        "ood_histograms.png",
        "class_distribution.png",
    ]
    if buffer_images is not None and len(buffer_images) >= n_samples:
        pick = torch.randperm(len(buffer_images), generator=torch.Generator().manual_seed(seed + 3))[:n_samples]
        buf = buffer_images[pick].float().cpu()
        buffer_q = _q.sample_quality(clf, buf, base["reference_feats"])
        buffer_q["score_mean"] = float(_ood.batch_scores(model, buf, device=device).mean())
        _, buf_probs = _q.classifier_outputs(clf, buf[:N_SHOWN_SAMPLES])
        plot_samples(
            buf[:N_SHOWN_SAMPLES],
            buf_probs,
            out_dir / "buffer_samples.png",
            title=f"Replay-buffer samples from the checkpoint ({min(n_samples, N_SHOWN_SAMPLES)} of "
            f"{len(buffer_images)}), labelled by the classifier: digit (confidence)",
        )
        images.append("buffer_samples.png")
    timings["quality_s"] = time.perf_counter() - t0
    plot_samples(
        samples[:N_SHOWN_SAMPLES],
        sample_probs,
        out_dir / "samples.png",
        title=f"Samples after {steps} Langevin steps from U(-1, 1) (the first {min(n_samples, N_SHOWN_SAMPLES)} of "
        f"{n_samples}), labelled by the classifier: digit (confidence)",
    )
    plot_class_distribution(gen_q["class_fractions"], gen_q["mean_confidence"], out_dir / "class_distribution.png")
    classifier_keys = (
        "path",
        "cache",
        "stale_reason",
        "val_accuracy",
        "train_seconds",
        "n_train",
        "n_val",
        "cache_error",
    )
    quality = {
        "classifier": {k: clf_info.get(k) for k in classifier_keys if clf_info.get(k) is not None},
        "generated": gen_q,
        "real_heldout": real_stats,
        "fd_generated_vs_real": gen_q["fd"],
        "fd_real_vs_real": base["fd_real_vs_real"],
        "fd_noise_vs_real": base["fd_noise_vs_real"],
        "fd_n": base["n"],
        "fd_baseline_source": base["baseline_source"],
        "replay_buffer": buffer_q,
    }
    return quality, images


def _health_warnings(ood, chain_scores, quality: dict) -> list[str]:
    """Step 4, health checks (the seed: "energy models ... often diverge if the hyperparameters are not well
    tuned")."""
    warnings_ = []
    noise_auroc = ood.summary["noise"]["auroc_vs_test"]
    if any(row["non_finite"] for row in ood.summary.values()) or not np.isfinite(chain_scores).all():
        warnings_.append("some scores are NaN or infinite: the model has diverged")
    if noise_auroc is not None and noise_auroc < 0.9:
        warnings_.append(
            f"test digits vs uniform noise AUROC is {noise_auroc:.3f} (< 0.9): the model barely tells "
            "digits from noise; it is undertrained or has diverged"
        )
    if ood.summary["test"]["mean"] is not None and abs(ood.summary["test"]["mean"]) > 1e3:
        warnings_.append(
            f"|mean f(test digits)| = {abs(ood.summary['test']['mean']):.3g}: scores this large "
            "suggest the regularizer lost control of the energy scale"
        )
    if quality["fd_generated_vs_real"] > 0.5 * quality["fd_noise_vs_real"]:
        warnings_.append(
            "generated samples are closer to noise than to digits in the classifier's feature space "
            f"(FD {quality['fd_generated_vs_real']:.1f} vs noise {quality['fd_noise_vs_real']:.1f})"
        )
    return warnings_


def _f(v, fmt=".3f") -> str:
    return "n/a" if v is None else format(v, fmt)


def write_report(r: dict, path: Path) -> None:
    """The Markdown report (images referenced by relative path, all next to it)."""
    lines = _report_header(r) + _report_generation(r) + _report_ood(r) + _report_quality(r) + _report_timings(r)
    path.write_text("\n".join(lines))


def _report_header(r: dict) -> list[str]:
    """Title, checkpoint and run provenance, warnings."""
    ck, st = r["checkpoint"], r["settings"]
    lines = [f"# ebmfast evaluation: {Path(ck.get('path', 'model')).name}", ""]
    lines += [f"- checkpoint: `{ck.get('path', 'n/a')}` (sha256 {str(ck.get('sha256', 'n/a'))[:16]}…)"]
    cfg = r["model_config"]
    if "epoch" in ck:
        lines.append(
            f"- trained for {ck['epoch']}"
            + (f" of {cfg['epochs']}" if "epochs" in cfg else "")
            + f" epoch(s), {ck.get('iteration', '?')} iterations"
            + (f" (ebmfast {ck['ebmfast_version']})" if ck.get("ebmfast_version") else "")
        )
    if ck.get("epoch_metrics"):
        shown = {
            k: v
            for k, v in ck["epoch_metrics"].items()
            if k in ("rand_out", "val_real_out", "val_fake_out", "val_contrastive_divergence")
        }
        if shown:
            lines.append(
                "- last epoch's training metrics: "
                + ", ".join(f"{k} {v:.3g}" for k, v in shown.items() if isinstance(v, (int, float)))
            )
    model_bits = [f"{k} {cfg[k]}" for k in ("data", "hidden_features", "batch_size", "lr", "sampler_steps") if k in cfg]
    if model_bits:
        lines.append("- training config: " + ", ".join(model_bits))
    env = r["environment"]
    lines += [
        f"- evaluated {r['created']} on {env['device']} ({env['device_name']}), torch {env['torch']}",
        f"- data: {st['data']}; seed {st['seed']}; sampler {st['sampler']['resolved_backend']} "
        f"(step size {st['sampler']['step_size']}, noise std {st['sampler']['noise_std']}, "
        f"gradient clip {st['sampler']['grad_clip']})",
        f"- total time {r['timings_s']['total']:.1f} s",
        "",
    ]
    if r["warnings"]:
        lines += ["## Warnings", ""] + [f"- **{w}**" for w in r["warnings"]] + [""]
    else:
        lines += ["No health warnings (scores finite, digits separated from noise, energy scale bounded).", ""]
    return lines


def _report_generation(r: dict) -> list[str]:
    """Section 1: chains from noise, their scores, the final samples."""
    st, gen = r["settings"], r["generation"]
    return [
        "## 1. Generation from scratch",
        "",
        f"{st['n_samples']} chains from U(-1, 1), {st['steps']} Langevin steps each "
        f"({_f(gen['sample_steps_per_s'], ',.0f')} sample-steps/s on this device). {N_TRAJECTORY_CHAINS} chains "
        f"at steps {', '.join(str(s) for s in gen['steps_shown'])}:",
        "",
        "![generation steps](generation_steps.png)",
        "",
        "f(x) along those chains (dashed: mean f of test digits and of uniform noise):",
        "",
        "![score along chains](generation_energy.png)",
        "",
        "| step | " + " | ".join(str(s) for s in gen["steps_shown"]) + " |",
        "|---|" + "---|" * len(gen["steps_shown"]),
        "| mean f(x) | " + " | ".join(_f(v, ".2f") for v in gen["chain_mean_score_at_shown_steps"]) + " |",
        "",
        f"Final samples: mean f(x) {_f(gen['sample_score_mean'], '.2f')} ± {_f(gen['sample_score_std'], '.2f')}. "
        f"The first {N_SHOWN_SAMPLES}, titled with the classifier's digit and confidence:",
        "",
        "![samples](samples.png)",
        "",
    ]


def _report_ood(r: dict) -> list[str]:
    """Section 2: the seed's table, the sets' scores and AUROCs."""
    ood, t = r["ood"], r["ood"]["seed_table"]
    lines = [
        "## 2. Out-of-distribution detection",
        "",
        "The seed's comparison (one test image; 128-image means for random images and a training batch):",
        "",
        "| input | f(x) = -E(x) |",
        "|---|---|",
        f"| random images U(-1, 1), mean of 128 | {_f(t['random_images_mean'], '.2f')} |",
        f"| training batch, mean of 128 | {_f(t['training_batch_mean'], '.2f')} |",
        f"| test image | {_f(t['test_image'], '.2f')} |",
        f"| test image + N(0, 0.3²) noise | {_f(t['test_image_noisy'], '.2f')} |",
        f"| test image flipped | {_f(t['test_image_flipped'], '.2f')} |",
        f"| test image shrunk ×2 into a corner | {_f(t['test_image_shrunk'], '.2f')} |",
        "",
        "![transformed test image](ood_transforms.png)",
        "",
        "The same transformations on many test images. AUROC = P(f(test digit) > f(image of the set)): 0.5 means "
        "the model cannot tell them apart, 1.0 perfectly separated, below 0.5 it prefers the other set.",
        "",
        "| set | n | mean f(x) | std | AUROC test digits vs set |",
        "|---|---|---|---|---|",
    ]
    for row in ood["sets"].values():
        a = (
            "reference"
            if row["auroc_vs_test"] is None and row["label"] == _ood.SET_LABELS["test"]
            else _f(row["auroc_vs_test"])
        )
        lines.append(f"| {row['label']} | {row['n']} | {_f(row['mean'], '.2f')} | {_f(row['std'], '.2f')} | {a} |")
    lines += [""] + [f"- {n}" for n in ood["notes"]] + ([""] if ood["notes"] else [])
    overfitting = "A 'training digits' AUROC well below 0.5 would mean the model scores its training images above "
    return lines + [overfitting + "unseen ones (overfitting).", "", "![energy histograms](ood_histograms.png)", ""]


def _report_quality(r: dict) -> list[str]:
    """Section 3: classifier statistics and Fréchet distances of generated (and replay-buffer) samples."""
    st, q = r["settings"], r["quality"]
    c, g, rh, b = q["classifier"], q["generated"], q["real_heldout"], q.get("replay_buffer")
    accuracy = 100 * c["val_accuracy"] if c.get("val_accuracy") is not None else None
    cache = {
        "hit": "loaded from cache",
        "trained": "trained now (no cache)",
        "retrained": f"retrained (stale cache: {c.get('stale_reason', '')})",
    }.get(c.get("cache"), c.get("cache"))
    lines = [
        "## 3. Sample quality",
        "",
        f"Classifier: the project's small MNIST CNN, {cache}; `{c.get('path')}`; trained on {c.get('n_train')} "
        f"digits in {_f(c.get('train_seconds'), '.1f')} s; accuracy {_f(accuracy, '.1f')}% "
        f"on {c.get('n_val')} held-out digits.",
        "",
        "| | generated from noise | " + ("replay buffer | " if b else "") + "real (held-out) |",
        "|---|---|---|" + ("---|" if b else ""),
        f"| mean max-softmax confidence | {_f(g['mean_confidence'])} | "
        + (f"{_f(b['mean_confidence'])} | " if b else "")
        + f"{_f(rh['mean_confidence'])} |",
        f"| entropy of the class histogram (max ln 10 = {g['max_class_entropy']:.3f}) | {_f(g['class_entropy'])} | "
        + (f"{_f(b['class_entropy'])} | " if b else "")
        + f"{_f(rh['class_entropy'])} |",
        "",
        "| digit | " + " | ".join(str(i) for i in range(10)) + " |",
        "|---|" + "---|" * 10,
        "| generated | " + " | ".join(f"{v:.2f}" for v in g["class_fractions"]) + " |",
    ]
    if b:
        lines.append("| replay buffer | " + " | ".join(f"{v:.2f}" for v in b["class_fractions"]) + " |")
    lines += [
        "| real | " + " | ".join(f"{v:.2f}" for v in rh["class_fractions"]) + " |",
        "",
        "![class distribution](class_distribution.png)",
        "",
        f"Fréchet distance in the classifier's 64-d feature space, {q['fd_n']} images per set (reference: "
        f"{q['fd_n']} training digits). Lower is closer to real digits; the value depends on the set size, so "
        "compare with the baselines below, not with Inception FIDs.",
        "",
        "| compared with the reference | Fréchet distance |",
        "|---|---|",
        f"| generated from noise ({st['steps']} steps) | {_f(q['fd_generated_vs_real'], '.2f')} |",
    ]
    if b:
        lines.append(f"| replay-buffer samples (the training chains) | {_f(b['fd'], '.2f')} |")
    lines += [
        f"| real digits ({q['fd_baseline_source']}) | {_f(q['fd_real_vs_real'], '.2f')} |",
        f"| uniform noise | {_f(q['fd_noise_vs_real'], '.2f')} |",
        "",
    ]
    if b:
        shown = "Replay-buffer samples (the persistent training chains stored in the checkpoint), labelled by the "
        lines += [shown + "classifier:", "", "![replay buffer](buffer_samples.png)", ""]
    return lines


def _report_timings(r: dict) -> list[str]:
    lines = ["## Timings", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k.removesuffix('_s')} | {v:.1f} |" for k, v in r["timings_s"].items()]
    lines += ["", "All numbers are in `report.json`.", ""]
    return lines


def checkpoint_provenance(path) -> tuple[dict, torch.Tensor | None]:
    """What the report says about a checkpoint file (path, sha256, epoch, iteration, last metrics, kind, ebmfast
    version, device), and the replay-buffer images it stores (``None`` when it holds none of shape (N, 1, 28, 28))."""
    from ..training.checkpoint import load_checkpoint

    path = Path(path)
    info = {"path": str(path.resolve()), "sha256": _sha256(path)}
    raw = load_checkpoint(str(path))
    trainer_state = raw.get("trainer") if isinstance(raw.get("trainer"), dict) else {}
    for key in ("epoch", "iteration", "epoch_metrics"):
        if key in trainer_state:
            info[key] = trainer_state[key]
    for key in ("kind", "ebmfast_version", "device"):
        if key in raw:
            info[key] = raw[key]
    buffer_state = trainer_state.get("buffer")
    storage = buffer_state.get("storage") if isinstance(buffer_state, dict) else None
    if isinstance(storage, torch.Tensor) and storage.dim() == 4 and tuple(storage.shape[1:]) == (1, 28, 28):
        return info, storage
    return info, None
