"""The training loop, shaped like torchvision's classification reference:
`train_one_epoch`, `evaluate`, and `train`/`main` that wire them to data and checkpoints."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from training import synthetic
from training.checkpoint import library_versions, load_checkpoint, save_checkpoint
from training.data import DataBundle, load_dataset
from training.errors import TrainingError
from training.models import Classifier, build_classifier, input_shape

OPTIMIZERS = ("adam", "sgd")
DEFAULT_LR = {"adam": 1e-3, "sgd": 0.01}
DEVICES = ("auto", "cpu", "cuda", "mps")
BEST_FILE = "best.pt"
LAST_FILE = "last.pt"


@dataclass
class Evaluation:
    accuracy: float
    confusion: torch.Tensor  # [true class, predicted class] counts

    def per_class_accuracy(self) -> list[float]:
        totals = self.confusion.sum(dim=1).clamp(min=1)
        return (self.confusion.diag().double() / totals).tolist()


@dataclass
class TrainResult:
    best: Path
    last: Path
    epoch: int
    accuracy: float
    best_accuracy: float
    data: DataBundle


def select_device(name: str = "auto") -> torch.device:
    """auto prefers cuda, then mps, then cpu; an explicit choice must be available."""
    mps = getattr(torch.backends, "mps", None)
    has_mps = bool(mps is not None and mps.is_available())
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if has_mps else torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("--device cuda: no CUDA GPU is available (use --device auto or cpu)")
    if name == "mps" and not has_mps:
        raise TrainingError("--device mps: Apple MPS is not available (use --device auto or cpu)")
    if name not in DEVICES:
        raise TrainingError(f"unknown device {name!r} (choose from: {', '.join(DEVICES)})")
    return torch.device(name)


def make_optimizer(name: str, params: Any, lr: float | None) -> tuple[torch.optim.Optimizer, float]:
    if name not in OPTIMIZERS:
        raise TrainingError(f"unknown optimizer {name!r} (choose from: {', '.join(OPTIMIZERS)})")
    rate = DEFAULT_LR[name] if lr is None else lr
    if rate <= 0:
        raise TrainingError(f"learning rate must be positive, got {rate}")
    if name == "adam":
        return torch.optim.Adam(params, lr=rate), rate
    return torch.optim.SGD(params, lr=rate, momentum=0.9), rate


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    description: str,
    progress: bool,
) -> float:
    """One pass over the training data; returns the mean cross-entropy loss per image."""
    model.train()
    criterion = nn.CrossEntropyLoss()
    total_loss, seen = 0.0, 0
    bar = tqdm(loader, desc=description, file=sys.stderr, disable=not progress, leave=False)
    for images, labels in bar:
        images, labels = images.to(device), labels.to(device)
        loss = criterion(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * labels.shape[0]
        seen += labels.shape[0]
        bar.set_postfix(loss=f"{total_loss / seen:.4f}")
    return total_loss / max(seen, 1)


@torch.inference_mode()
def evaluate(
    model: nn.Module, loader: DataLoader, device: torch.device, num_classes: int
) -> Evaluation:
    """Accuracy and confusion matrix of argmax predictions over a whole split."""
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for images, labels in loader:
        predicted = model(images.to(device)).argmax(dim=1).cpu()
        index = labels.to(torch.int64) * num_classes + predicted
        confusion += torch.bincount(index, minlength=num_classes * num_classes).view(
            num_classes, num_classes
        )
    total = int(confusion.sum())
    accuracy = float(confusion.diag().sum()) / total if total else 0.0
    return Evaluation(accuracy, confusion)


def eval_loader(data: DataBundle, batch_size: int = 256) -> DataLoader:
    return DataLoader(data.test, batch_size=batch_size, shuffle=False, num_workers=0)


def train(
    arch: str | None = None,
    dataset: str | None = None,
    *,
    checkpoint_dir: Path | str,
    epochs: int = 1,
    batch_size: int = 64,
    lr: float | None = None,
    optimizer: str = "adam",
    device: str = "auto",
    seed: int = 0,
    data_dir: Path | str = "data",
    resume: Path | str | None = None,
    skip_checksum: bool = False,
    download: bool = True,
    synthetic_train_size: int = synthetic.DEFAULT_TRAIN_SIZE,
    synthetic_test_size: int = synthetic.DEFAULT_TEST_SIZE,
    data: DataBundle | None = None,
    progress: bool | None = None,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train (or resume) a classifier; writes best.pt and last.pt into `checkpoint_dir`.

    `epochs` is the total target, so resuming a 2-epoch checkpoint with epochs=5 runs 3 more.
    Shuffling is seeded per epoch, so a resumed run repeats an uninterrupted one.
    """
    state = load_checkpoint(resume) if resume is not None else None
    if state is not None:
        arch = _same(arch, state["arch"], "architecture", resume)
        dataset = _same(dataset, state["dataset"], "dataset", resume)
    if arch is None or dataset is None:
        raise TrainingError("both an architecture (--arch) and a dataset (--dataset) are needed")
    if epochs < 1 or batch_size < 1:
        raise TrainingError("--epochs and --batch-size must be at least 1")
    shape = input_shape(arch)
    if data is None:
        data = load_dataset(
            dataset,
            shape,
            data_dir=data_dir,
            download=download,
            skip_checksum=skip_checksum,
            synthetic_train_size=synthetic_train_size,
            synthetic_test_size=synthetic_test_size,
            seed=seed,
            log=log,
        )
    if tuple(data.input_shape) != tuple(shape):
        raise TrainingError(f"data shaped {data.input_shape} does not fit {arch} {shape}")
    log(f"dataset {data.describe()}")

    torch.manual_seed(seed)
    run_device = select_device(device)
    if state is not None:
        model = build_classifier(arch, len(state["class_names"]), state["mean"], state["std"])
        model.load_state_dict(state["model_state"])
        if list(state["class_names"]) != list(data.class_names):
            raise TrainingError(f"{resume} was trained on other classes than this dataset has")
    else:
        model = build_classifier(arch, data.num_classes, data.mean, data.std)
    model.to(run_device)
    opt, rate = make_optimizer(optimizer, model.parameters(), lr)
    start, best_accuracy, accuracy = 0, -1.0, 0.0
    if state is not None:
        if "optimizer_state" in state and state.get("optimizer") == optimizer:
            opt.load_state_dict(state["optimizer_state"])
        else:
            log("note: optimizer changed or its state is absent; starting it afresh")
        start = int(state["epoch"])
        best_accuracy = float(state.get("best_accuracy", state["accuracy"]))
        accuracy = float(state["accuracy"])
        if start >= epochs:
            raise TrainingError(
                f"{resume} is already at epoch {start}; pass --epochs above {start} to go on"
            )
        log(f"resuming {arch} from {resume} at epoch {start} (best accuracy {best_accuracy:.2%})")

    out = Path(checkpoint_dir)
    best_path, last_path = out / BEST_FILE, out / LAST_FILE
    show = sys.stderr.isatty() if progress is None else progress
    args = {
        "arch": arch,
        "dataset": data.name,
        "data_dir": str(data_dir),
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": rate,
        "optimizer": optimizer,
        "device": str(run_device),
        "seed": seed,
        "skip_checksum": skip_checksum,
    }
    log(
        f"training {arch} on {run_device} for epochs {start + 1}..{epochs} ({optimizer}, lr {rate})"
    )
    for epoch in range(start + 1, epochs + 1):
        began = time.perf_counter()
        order = torch.Generator().manual_seed(seed * 100_003 + epoch)
        loader = DataLoader(
            data.train, batch_size=batch_size, shuffle=True, generator=order, num_workers=0
        )
        loss = train_one_epoch(model, loader, opt, run_device, f"epoch {epoch}/{epochs}", show)
        accuracy = evaluate(model, eval_loader(data), run_device, data.num_classes).accuracy
        improved = accuracy > best_accuracy
        best_accuracy = max(best_accuracy, accuracy)
        payload = _payload(model, opt, data, arch, epoch, accuracy, best_accuracy, args, optimizer)
        save_checkpoint(last_path, payload)
        if improved:
            save_checkpoint(best_path, payload)
        log(
            f"epoch {epoch}/{epochs}  train loss {loss:.4f}  test accuracy {accuracy:.2%}"
            f"{'  (best)' if improved else ''}  [{time.perf_counter() - began:.1f} s]"
        )
    if not best_path.exists():  # resumed into a new folder without improving on the old best
        save_checkpoint(best_path, payload)
    log(f"checkpoints: {best_path} (best {best_accuracy:.2%}), {last_path}")
    return TrainResult(best_path, last_path, epochs, accuracy, best_accuracy, data)


def _same(given: str | None, saved: str, what: str, resume: Any) -> str:
    if given is not None and given != saved:
        raise TrainingError(f"{resume} was trained with {what} {saved!r}, not {given!r}")
    return saved


def _payload(
    model: Classifier,
    opt: torch.optim.Optimizer,
    data: DataBundle,
    arch: str,
    epoch: int,
    accuracy: float,
    best_accuracy: float,
    args: dict[str, Any],
    optimizer: str,
) -> dict[str, Any]:
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return {
        "arch": arch,
        "dataset": data.name,
        "synthetic": data.synthetic,
        "data_options": dict(data.options),
        "class_names": list(data.class_names),
        "mean": list(data.mean),
        "std": list(data.std),
        "input_shape": list(data.input_shape),
        "epoch": epoch,
        "accuracy": accuracy,
        "best_accuracy": best_accuracy,
        "model_state": state,
        "optimizer": optimizer,
        "optimizer_state": opt.state_dict(),
        "args": args,
        "versions": library_versions(),
    }


def main(args: argparse.Namespace) -> int:
    """`python -m training train`: the parsed command line -> train()."""
    train(
        args.arch,
        args.dataset,
        checkpoint_dir=args.checkpoint_dir,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        optimizer=args.optimizer,
        device=args.device,
        seed=args.seed,
        data_dir=args.data_dir,
        resume=args.resume,
        skip_checksum=args.skip_checksum,
        download=not args.no_download,
        synthetic_train_size=args.synthetic_train_size,
        synthetic_test_size=args.synthetic_test_size,
    )
    return 0
