"""A model repository built offline on the device: both seed models trained briefly on the
synthetic dataset (the real ones cannot be fetched there), exported fp32 and fp16.

Each seed model gives four served models: `NAME` (ONNX), `NAME_ts` (the same version's
TorchScript file, served by libtorch), `NAME_fp16` and `NAME_fp16_ts`. An fp16 version holds
both files, parity-checked and accuracy-gated by export, so the two runtimes serve the same
weights. A training step is also timed on the device, apart from the epoch (whose time is
mostly the data loader's).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from benchmarks.gpu.context import Context, Recorder, StepError

# (served name, architecture) of the seed models.
SEEDS = (("fashion_mnist", "fashion_mlp"), ("cifar10", "cifar10_cnn"))
PRECISIONS = ("fp32", "fp16")
# A --quick rehearsal leaves out cifar10 in fp16 (half-precision convolutions on a CPU take
# seconds a batch) and exports cifar10 as TorchScript alone (an ONNX export costs seconds):
# fashion_mnist's versions already take every ONNX and fp16 path.
QUICK_LEAVES_OUT = {("cifar10", "fp16")}
QUICK_TORCHSCRIPT_ONLY = {"cifar10"}
ONNX, TORCHSCRIPT = "onnx", "torchscript"
# Synthetic (train, test) images: enough to learn the classes in one epoch.
SIZES = {False: (4000, 500), True: (500, 100)}
TRAIN_BATCHES = {False: (64, 256), True: (64,)}
TIMED_STEPS = {False: 30, True: 2}


def served_name(seed: str, precision: str, runtime: str) -> str:
    name = seed if precision == "fp32" else f"{seed}_{precision}"
    return f"{name}_ts" if runtime == TORCHSCRIPT else name


def time_training_step(arch: str, device: str, batch: int, steps: int) -> dict[str, float]:
    """Forward, backward and optimizer step of the seed network on random images, alone."""
    import torch

    from training.models import build_classifier, input_shape
    from training.train import select_device

    run_on = select_device(device)
    shape = input_shape(arch)
    model = build_classifier(arch, 10, [0.5] * shape[0], [0.25] * shape[0]).to(run_on)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss = torch.nn.CrossEntropyLoss()
    images = torch.rand(batch, *shape, device=run_on)
    labels = torch.randint(0, 10, (batch,), device=run_on)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss(model(images), labels).backward()
        optimizer.step()

    for _ in range(3):  # allocation, cuDNN's choice of kernels
        step()
    _synchronize(run_on)
    began = time.perf_counter()
    for _ in range(steps):
        step()
    _synchronize(run_on)
    seconds = (time.perf_counter() - began) / steps
    return {"batch": batch, "ms": round(1000 * seconds, 4), "images_per_s": round(batch / seconds)}


def _synchronize(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _torchscript_copy(repository: Path, source: str, target: str) -> None:
    """The version's TorchScript file served as a model of its own (libtorch's platform)."""
    from modelrepo import layout
    from modelrepo.config import load_config, write_config

    shutil.copytree(repository / source, repository / target)
    config = load_config(repository / target / layout.CONFIG_FILE)
    config.name, config.platform = target, layout.PLATFORM_TORCHSCRIPT
    write_config(repository / target / layout.CONFIG_FILE, config)


def export(
    repository: Path,
    seed: str,
    precision: str,
    trained: Any,
    record: Recorder,
    with_onnx: bool = True,
) -> tuple[dict[str, str], list[str]]:
    """One precision's versions (served name -> runtime) and what failed. Should the ONNX
    exporter fail on the machine's torch, fp32 still gets its TorchScript version alone (an
    fp16 export starts from the fp32 ONNX file: it has none then)."""
    from training.errors import TrainingError
    from training.export import export_checkpoint
    from training.reduced import PrecisionOptions

    def attempt(name: str, fmt: str) -> str | None:
        try:
            export_checkpoint(
                trained.best,
                repository,
                name,
                fmt,
                data=trained.data,
                precision=PrecisionOptions(precision),
                progress=False,
                log=record.progress,
            )
        except TrainingError as error:
            record.progress(f"{name}: {error}")
            return f"{name} ({fmt}): {error}"
        return None

    name, ts_name = served_name(seed, precision, ONNX), served_name(seed, precision, TORCHSCRIPT)
    if not with_onnx:
        alone = attempt(ts_name, "torchscript")
        return ({}, [alone]) if alone else ({ts_name: TORCHSCRIPT}, [])
    failed = attempt(name, "both")
    if failed is None:
        _torchscript_copy(repository, name, ts_name)
        return {name: ONNX, ts_name: TORCHSCRIPT}, []
    if precision != "fp32":
        return {}, [failed]
    alone = attempt(ts_name, "torchscript")
    return ({}, [failed, alone]) if alone else ({ts_name: TORCHSCRIPT}, [failed])


def run(context: Context, record: Recorder) -> str:
    from training.train import train

    repository = context.repository
    train_size, test_size = SIZES[context.quick]
    models: dict[str, dict[str, str]] = {}
    seeds: dict[str, dict[str, Any]] = {}
    failures = []
    for seed, arch in SEEDS:
        record.progress(f"{seed}: training {arch} for 1 epoch on {context.device} (synthetic)")
        began = time.perf_counter()
        trained = train(
            arch,
            "synthetic",
            checkpoint_dir=f"{context.work}/checkpoints/{seed}",
            epochs=1,
            device=context.device,
            download=False,
            synthetic_train_size=train_size,
            synthetic_test_size=test_size,
            progress=False,
            log=record.progress,
        )
        about: dict[str, Any] = {
            "arch": arch,
            "train_images": train_size,
            "epoch_s": round(time.perf_counter() - began, 2),
            "test_accuracy": round(trained.best_accuracy, 4),
            "exports": {},
        }
        seeds[seed] = about
        about["training_step"] = [
            time_training_step(arch, context.device, batch, TIMED_STEPS[context.quick])
            for batch in TRAIN_BATCHES[context.quick]
        ]
        record.progress(f"{seed}: training step {about['training_step']}")
        record.update(seeds=seeds, models=models)
        for precision in PRECISIONS:
            if context.quick and (seed, precision) in QUICK_LEAVES_OUT:
                about["exports"][precision] = {"left out": "--quick"}
                continue
            began = time.perf_counter()
            with_onnx = not (context.quick and seed in QUICK_TORCHSCRIPT_ONLY)
            built, errors = export(repository, seed, precision, trained, record, with_onnx)
            failures += errors
            about["exports"][precision] = {"seconds": round(time.perf_counter() - began, 2)}
            if errors:
                about["exports"][precision]["error"] = "; ".join(errors)
            for served, runtime in built.items():
                models[served] = {"seed": seed, "precision": precision, "runtime": runtime}
            record.update(seeds=seeds, models=models)
    if not models:
        raise StepError(f"no model was exported: {'; '.join(failures)}")
    note = f"{len(models)} models in {repository.name}/ ({', '.join(models)})"
    return note + (f"; failed: {'; '.join(failures)}" if failures else "")


def models_on_device(context: Context) -> dict[str, dict[str, str]]:
    """The built models whose runtime runs on the run's device: TorchScript always; ONNX on
    the CPU, and on CUDA only where onnxruntime has its CUDA provider."""
    models = context.result_of("repository").get("models", {})
    onnx = context.result_of("device").get("onnx_on_device", context.device == "cpu")
    return {name: m for name, m in models.items() if m["runtime"] == TORCHSCRIPT or onnx}
