"""The `sanitize` command: a thin click layer over the Python API. Exit 0 passed, 1 gate failed, 2 bad input."""

from __future__ import annotations

import functools
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import click
import numpy as np

from sanitize.config import ScanConfig, TrainConfig
from sanitize.errors import SanitizeError

DEFAULTS = ScanConfig()
TRAIN_DEFAULTS = TrainConfig()


def _handle_errors(fn: Callable) -> Callable:
    """User errors become one line on stderr and exit 2; a bug says how to get its traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SanitizeError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted; rerun the same command to resume", err=True)
            sys.exit(130)
        except Exception as error:
            if os.environ.get("SANITIZE_DEBUG"):
                raise
            click.echo(f"internal error: {type(error).__name__}: {error} (set SANITIZE_DEBUG=1 for the traceback)", err=True)
            sys.exit(3)

    return wrapper


def scan_options(fn: Callable) -> Callable:
    options = [
        click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("sanitize-scan"), show_default=True, help="Output directory (never inside DATA)."),
        click.option("--model", default=DEFAULTS.model, show_default=True, help="Proxy model from the registry; auto picks by image size."),
        click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False), default=None, help="Load these weights instead of training a proxy."),
        click.option("--epochs", type=int, default=TRAIN_DEFAULTS.epochs, show_default=True, help="Proxy training epochs."),
        click.option("--batch-size", type=int, default=TRAIN_DEFAULTS.batch_size, show_default=True, help="Proxy training batch size."),
        click.option("--augment/--no-augment", default=TRAIN_DEFAULTS.augment, show_default=True, help="Random crop + flip while training the proxy."),
        click.option("--image-size", type=int, default=None, help="Side in pixels (folders); default: the most common size."),
        click.option("--embedding", type=click.Choice(["gradient", "features", "logit_gradient"]), default=DEFAULTS.embedding, show_default=True),
        click.option("--index", type=click.Choice(["auto", "flat", "ivf", "hnsw"]), default=DEFAULTS.index, show_default=True),
        click.option("--threshold", type=float, default=DEFAULTS.threshold, show_default=True, help="Flag examples with score >= this."),
        click.option("--max-flagged-fraction", type=float, default=DEFAULTS.max_flagged_fraction, show_default=True, help="Gate: exit 1 when more is flagged."),
        click.option("--device", default=DEFAULTS.device, show_default=True),
        click.option("--precision", type=click.Choice(["auto", "bf16", "fp32"]), default=DEFAULTS.precision, show_default=True),
        click.option("--workers", type=int, default=DEFAULTS.workers, show_default=True, help="Data-loading processes."),
        click.option("--seed", type=int, default=DEFAULTS.seed, show_default=True),
        click.option("--quiet", is_flag=True, help="No progress bars."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def print_summary(result: Any) -> None:
    summary = result.summary
    data, flagged, gate = summary["data"], summary["flagged"], summary["gate"]
    click.echo(f"data      {data['source']} ({data['kind']}, {data['examples']} examples, {len(data['classes'])} classes, {len(data['skipped'])} skipped)")
    click.echo(f"proxy     {summary['model']['name']}, accuracy on the data {summary['model']['train_accuracy_eval_mode']:.1%}")
    worst = sorted(flagged["per_class"].items(), key=lambda kv: -kv[1])[:3]
    click.echo(f"flagged   {flagged['count']} ({flagged['fraction']:.2%}); most in {', '.join(f'{k}: {v}' for k, v in worst)}")
    verdict = "PASSED" if gate["passed"] else "FAILED"
    click.echo(f"gate      {verdict} (flagged {gate['flagged_fraction']:.2%}, limit {gate['max_flagged_fraction']:.2%})")
    click.echo(f"time      {summary['seconds']['total']:.1f} s  " + ", ".join(f"{k} {v:.1f}" for k, v in summary["seconds"].items() if k != "total"))
    for note in data["notes"]:
        click.echo(f"note      {note}")
    click.echo(f"outputs   {', '.join(str(p) for p in result.files.values())}")


@click.group()
@click.version_option(package_name="sanitize")
def cli() -> None:
    """Find isolated (likely poisoned) examples in image-classification training data."""


@cli.command()
@click.argument("data", type=click.Path(path_type=Path))
@scan_options
@_handle_errors
def scan(data: Path, out: Path, **options: Any) -> None:
    """Scan DATA (an ImageFolder directory or a .npz) and gate on the flagged fraction."""
    from sanitize.scan import scan as run

    result = run(data, out, **options)
    print_summary(result)
    sys.exit(0 if result.passed else 1)


@cli.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("sanitize-demo"), show_default=True)
@click.option("--quiet", is_flag=True)
@_handle_errors
def demo(out: Path, quiet: bool) -> None:
    """Scan a built-in dataset (scikit-learn's digits as PNGs, 2% mislabeled on purpose); no downloads."""
    from sanitize.data.digits import digits_arrays, mislabel, write_image_folder
    from sanitize.scan import scan as run

    images, labels = digits_arrays()
    noisy, moved = mislabel(labels, 0.02)
    data_dir = Path(tempfile.mkdtemp(prefix="sanitize-demo-data-"))
    ids = write_image_folder(data_dir, images, noisy, [f"digit_{d}" for d in range(10)])
    click.echo(f"demo data {data_dir}: {len(ids)} digit images, {len(moved)} moved to a wrong class folder")
    result = run(data_dir, out, model="tiny", epochs=15, batch_size=32, augment=False, quiet=quiet, seed=0)  # flips would mix up digits
    print_summary(result)
    caught = set(result.flagged_ids) & {ids[i] for i in moved}
    click.echo(f"planted   {len(caught)} of {len(moved)} mislabeled images are among the flagged")


def main() -> None:
    cli(prog_name="sanitize")
