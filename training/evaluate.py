"""`python -m training evaluate`: a checkpoint's accuracy, per-class accuracy and confusion."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.checkpoint import classifier_from_checkpoint, load_checkpoint
from training.data import DataBundle, load_dataset
from training.errors import TrainingError
from training.train import Evaluation, eval_loader, evaluate, select_device


@dataclass
class Report:
    evaluation: Evaluation
    class_names: list[str]
    dataset: str
    synthetic: bool
    recorded_accuracy: float


def evaluate_checkpoint(
    checkpoint: Path | str,
    dataset: str | None = None,
    *,
    data_dir: Path | str | None = None,
    device: str = "auto",
    skip_checksum: bool = False,
    download: bool = True,
    data: DataBundle | None = None,
    log: Callable[[str], None] = print,
) -> Report:
    """Score a checkpoint on a dataset's test split (by default the one it was trained on).

    For the synthetic dataset the recorded seed and sizes are reused, so the test split is the
    very one that training measured.
    """
    state = load_checkpoint(checkpoint)
    model = classifier_from_checkpoint(state, checkpoint)
    name = dataset or state["dataset"]
    if data is None:
        data = _load(state, name, data_dir, skip_checksum, download, log)
    if data.num_classes != len(state["class_names"]):
        raise TrainingError(
            f"{checkpoint} predicts {len(state['class_names'])} classes but {name} has "
            f"{data.num_classes}"
        )
    if list(data.class_names) != list(state["class_names"]):
        log(f"note: {name}'s class names differ from the checkpoint's; comparing by index")
    run_device = select_device(device)
    evaluation = evaluate(model.to(run_device), eval_loader(data), run_device, data.num_classes)
    return Report(
        evaluation, list(state["class_names"]), data.name, data.synthetic, float(state["accuracy"])
    )


def _load(
    state: dict[str, Any],
    name: str,
    data_dir: Path | str | None,
    skip_checksum: bool,
    download: bool,
    log: Callable[[str], None],
) -> DataBundle:
    recorded = state.get("args", {}) or {}
    options = state.get("data_options", {}) if name == state["dataset"] else {}
    options = options or {}
    extra = {}
    if name == "synthetic":
        extra = {
            "synthetic_train_size": int(options.get("train_size", 1)),
            "synthetic_test_size": int(options.get("test_size", 500)),
            "synthetic_classes": int(options.get("num_classes", len(state["class_names"]))),
            "seed": int(options.get("seed", 0)),
        }
    return load_dataset(
        name,
        state["input_shape"],
        data_dir=data_dir if data_dir is not None else recorded.get("data_dir", "data"),
        download=download,
        skip_checksum=skip_checksum,
        log=log,
        **extra,
    )


def format_report(report: Report) -> str:
    """Accuracy, per-class accuracy and the confusion matrix as a plain-text table."""
    names = report.class_names
    confusion = report.evaluation.confusion.tolist()
    lines = [
        f"dataset: {report.dataset}{' (SYNTHETIC data)' if report.synthetic else ''}",
        f"accuracy: {report.evaluation.accuracy:.2%} over {sum(map(sum, confusion))} images "
        f"(recorded at training: {report.recorded_accuracy:.2%})",
        "",
        "per-class accuracy:",
    ]
    width = max(len(n) for n in names)
    for i, (name, acc) in enumerate(
        zip(names, report.evaluation.per_class_accuracy(), strict=True)
    ):
        lines.append(f"  {i:>2} {name:<{width}}  {acc:7.2%}  ({sum(confusion[i])} images)")
    cell = max(4, *(len(str(v)) + 1 for row in confusion for v in row))
    lines += ["", "confusion matrix (rows: true class, columns: predicted class):"]
    lines.append(" " * 5 + "".join(f"{j:>{cell}}" for j in range(len(names))))
    for i, row in enumerate(confusion):
        lines.append(f"  {i:>2} " + "".join(f"{v:>{cell}}" for v in row))
    return "\n".join(lines)


def save_confusion_png(report: Report, path: Path | str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    names = report.class_names
    matrix = report.evaluation.confusion.numpy()
    size = max(4.0, 0.6 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    try:
        ax.imshow(matrix, cmap="Blues")
        ax.set_xticks(range(len(names)), names, rotation=90)
        ax.set_yticks(range(len(names)), names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{report.dataset}: accuracy {report.evaluation.accuracy:.2%}")
        threshold = matrix.max() / 2 if matrix.size else 0
        for i in range(matrix.shape[0]):
            for j in range(matrix.shape[1]):
                color = "white" if matrix[i, j] > threshold else "black"
                ax.text(j, i, str(matrix[i, j]), ha="center", va="center", color=color, fontsize=7)
        fig.tight_layout()
        try:
            fig.savefig(path)
        except OSError as exc:
            raise TrainingError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)


def main(args: argparse.Namespace) -> int:
    report = evaluate_checkpoint(
        args.checkpoint,
        args.dataset,
        data_dir=args.data_dir,
        device=args.device,
        skip_checksum=args.skip_checksum,
        download=not args.no_download,
    )
    print(format_report(report))
    if args.confusion_png:
        save_confusion_png(report, args.confusion_png)
        print(f"confusion matrix saved to {args.confusion_png}")
    return 0
