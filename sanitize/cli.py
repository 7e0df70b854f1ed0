"""The `sanitize` command: a thin click layer over the Python API. Exit 0 passed, 1 gate failed, 2 bad input, 3 a bug,
4 no verdict."""

from __future__ import annotations

import functools
import json
import os
import shlex
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import click

from sanitize.config import (
    DECODED_CACHE_MODES,
    FINETUNE_MODES,
    PAPER_NOISE_EPS,
    SCHEDULES,
    FineTuneConfig,
    RobustConfig,
    ScanConfig,
    TrainConfig,
)
from sanitize.detectors import EMBEDDINGS, list_detectors
from sanitize.detectors.epic import EpicOptions
from sanitize.detectors.knn_density import ALARM_RULES, ALARM_TESTS, LABEL_RULES, KnnDensityOptions
from sanitize.errors import SanitizeError
from sanitize.names import ATTACKS, DEVICE_KINDS, MODELS
from sanitize.wording import plural, unknown


class Choice(click.Choice):
    """click's Choice that names the nearest value on a typo ("did you mean convnet?")."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if value in self.choices or not isinstance(value, str):
            return super().convert(value, param, ctx)
        self.fail(unknown(self.name or "value", value, list(self.choices)), param, ctx)


class Device(click.ParamType):
    """auto, cpu, cuda, cuda:N or mps, checked before any heavy import."""

    name = "device"

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return "[auto|cpu|cuda|cuda:N|mps]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        kind, _, index = str(value).partition(":")
        if kind in DEVICE_KINDS and (not index or (kind == "cuda" and index.isdigit())):
            return value
        self.fail(unknown("device", str(value), [*DEVICE_KINDS, "cuda:N"]), param, ctx)


def choice(values, kind: str = "value") -> Choice:
    """A Choice over `values` whose typo message names them as `kind`s."""
    made = Choice(list(values))
    made.name = kind
    return made


DEFAULTS = ScanConfig()
KNN = KnnDensityOptions()  # the default detector's own defaults
TRAIN_DEFAULTS = TrainConfig()
SCHEDULE_HELP = (
    "learning rate: step decay x0.1 at 3/8, 5/8 and 7/8 of the epochs, or onecycle (a linear rise over the first "
    "quarter to the rate, then a linear fall to 0)."
)
# options every command that trains or crafts takes alike
device_option = click.option(
    "--device", type=Device(), default=DEFAULTS.device, show_default=True, help="auto: CUDA when present, else the CPU."
)
precision_option = click.option(
    "--precision",
    type=choice(["auto", "bf16", "fp32"], "precision"),
    default=DEFAULTS.precision,
    show_default=True,
    help="bf16 autocast where the hardware runs it natively (auto), or forced.",
)
decoded_cache_option = click.option(
    "--decoded-cache",
    type=choice(DECODED_CACHE_MODES, "decoded-cache mode"),
    default=DEFAULTS.decoded_cache,
    show_default=True,
    help="Folders and shards: keep each image once decoded, in OUT/decoded until the run ends, instead of decoding it "
    "in every pass (auto: when the images are read more than once and the copy fits in half the free disk).",
)
ROBUST_DEFAULTS = RobustConfig()
FINETUNE_DEFAULTS = FineTuneConfig()
VERDICT_EXIT = {"passed": 0, "failed": 1, "inconclusive": 4}  # a gate's verdict as `scan` and `combine` exit with it
exclude_option = click.option(
    "--exclude",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="A file of example ids, one a line, to leave out: a scan's flagged.txt (scan, then train on what it kept).",
)
test_option = click.option(
    "--test", type=click.Path(exists=True), default=None, help="A labelled test set to report accuracy on."
)
image_size_option = click.option(
    "--image-size", type=int, default=None, help="Side in pixels (folders); default: the most common size."
)


def refuse_torchrun(command: str) -> None:
    """The commands that must run once refuse torchrun (sanitize.distributed, imported only when a command runs)."""
    from sanitize.distributed import refuse_torchrun as refuse

    refuse(command)


def is_main_process() -> bool:
    """True but on the other ranks under torchrun."""
    from sanitize.distributed import current_world

    return current_world().is_main


def silence_stdout() -> None:
    """Point stdout at /dev/null, so that nothing more (not even the exit's flush) writes to a closed pipe."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


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
        except BrokenPipeError:  # the reader of our output left (`| head`): nothing more to say
            silence_stdout()
            sys.exit(141)
        except Exception as error:
            if os.environ.get("SANITIZE_DEBUG"):
                raise
            click.echo(
                f"internal error: {type(error).__name__}: {error} (set SANITIZE_DEBUG=1 for the traceback)", err=True
            )
            sys.exit(3)

    return wrapper


def scan_options(fn: Callable) -> Callable:
    options = [
        click.option(
            "--out",
            type=click.Path(file_okay=False, path_type=Path),
            default=Path("sanitize-scan"),
            show_default=True,
            help="Output directory (never inside DATA).",
        ),
        click.option(
            "--model",
            type=choice(["auto", *MODELS], "model"),
            default=DEFAULTS.model,
            show_default=True,
            help="Proxy model from the registry; auto picks by image size.",
        ),
        click.option(
            "--checkpoint",
            type=click.Path(exists=True, dir_okay=False),
            default=None,
            help="Load these weights instead of training a proxy.",
        ),
        click.option(
            "--held-out-checkpoint",
            is_flag=True,
            default=DEFAULTS.held_out_checkpoint,
            help="The --checkpoint never trained on DATA (e.g. the network you will fine-tune): also flag the labels "
            "it confidently contradicts (knn_density's label check).",
        ),
        click.option(
            "--epochs", type=int, default=DEFAULTS.train.epochs, show_default=True, help="Proxy training epochs."
        ),
        click.option(
            "--batch-size",
            type=int,
            default=TRAIN_DEFAULTS.batch_size,
            show_default=True,
            help="Proxy training batch size.",
        ),
        click.option(
            "--schedule",
            type=choice(list(SCHEDULES), "schedule"),
            default=DEFAULTS.train.schedule,
            show_default=True,
            help=f"Proxy {SCHEDULE_HELP}",
        ),
        click.option(
            "--augment/--no-augment",
            default=TRAIN_DEFAULTS.augment,
            show_default=True,
            help="Random crop + flip while training the proxy.",
        ),
        click.option(
            "--image-size", type=int, default=None, help="Side in pixels (folders); default: the most common size."
        ),
        click.option(
            "--proxy-folds",
            type=int,
            default=DEFAULTS.proxy_folds,
            show_default=True,
            help="0: off; K >= 2: also train K proxies, each without one K-th of the data, and flag examples whose "
            "label they confidently contradict (knn_density's label check; ~K-1 proxy trainings more).",
        ),
        click.option(
            "--embedding",
            type=choice(EMBEDDINGS, "embedding"),
            default=KNN.embedding,
            show_default=True,
            help="knn_density's space: penultimate features, the last-layer gradient, or softmax - onehot.",
        ),
        click.option(
            "--index",
            type=choice(["auto", "flat", "ivf", "hnsw"], "index"),
            default=DEFAULTS.index,
            show_default=True,
            help="FAISS index per class: exact (flat) up to 50,000 examples under auto, IVF above; HNSW on request.",
        ),
        click.option(
            "--detector",
            type=choice(list_detectors(), "detector"),
            default=DEFAULTS.detector,
            show_default=True,
            help="The rule: knn_density, or a baseline (epic, deep_knn, spectral_signatures, activation_clustering).",
        ),
        click.option(
            "--k-small",
            type=int,
            default=KNN.k_small,
            show_default=True,
            help="knn_density: neighbours at the small scale (lone points).",
        ),
        click.option(
            "--k-fraction",
            type=float,
            default=KNN.k_fraction,
            show_default=True,
            help="knn_density: the large scale as a fraction of the class (groups) ...",
        ),
        click.option(
            "--k-max", type=int, default=KNN.k_max, show_default=True, help="... capped at this many neighbours."
        ),
        click.option(
            "--distance",
            type=choice(["mean", "kth"]),
            default=KNN.distance,
            show_default=True,
            help="knn_density: mean distance to the k neighbours, or distance to the k-th.",
        ),
        click.option(
            "--low-loss-weight",
            type=float,
            default=KNN.low_loss_weight,
            show_default=True,
            help="knn_density: weight of the 'too easy' (low proxy loss) term beside isolation.",
        ),
        click.option(
            "--class-alarm-p",
            type=float,
            default=KNN.class_alarm_p,
            show_default=True,
            help="knn_density: > 0 alarms classes with more flags than the other classes' spread explains (p < this / classes) ...",
        ),
        click.option(
            "--alarm-test",
            type=choice(ALARM_TESTS, "alarm test"),
            default=KNN.alarm_test,
            show_default=True,
            help="... tested against the other classes' rate with their dispersion (negative-binomial) or without (poisson) ...",
        ),
        click.option(
            "--alarm-group-fraction",
            type=float,
            default=KNN.alarm_group_fraction,
            show_default=True,
            help="... at least this fraction of the class grouped (flagged, as are most of their nearest neighbours) ...",
        ),
        click.option(
            "--alarm-z",
            type=float,
            default=KNN.alarm_z,
            show_default=True,
            help="... and flags their isolated, hard examples (combined z >= this) ...",
        ),
        click.option(
            "--alarm-rule",
            type=choice(ALARM_RULES, "alarm rule"),
            default=KNN.alarm_rule,
            show_default=True,
            help="... by that rule (hard), or the examples the proxy assigns to another class (misassigned), or both (either).",
        ),
        click.option(
            "--alarm-confidence",
            type=float,
            default=KNN.alarm_confidence,
            show_default=True,
            help="... misassigned: only those the proxy gives the other class at least this probability (0: any).",
        ),
        click.option(
            "--threshold",
            type=float,
            default=KNN.threshold,
            show_default=True,
            help="knn_density: flag examples with score >= this.",
        ),
        click.option(
            "--label-check/--no-label-check",
            default=KNN.label_check,
            show_default=True,
            help="knn_density, with --proxy-folds: flag the examples whose label the held-out proxies contradict.",
        ),
        click.option(
            "--label-rule",
            type=click.Choice(LABEL_RULES),
            default=KNN.label_rule,
            show_default=True,
            help="The label check's rule: confident learning's (a rival class above its own threshold), or disagree "
            "(any held-out prediction other than the label: for weights that never saw the data).",
        ),
        click.option(
            "--closed-group-conductance",
            type=float,
            default=KNN.closed_group_conductance,
            show_default=True,
            help="knn_density: > 0 alarms a class whose most closed set (its members one another's neighbours, rarely "
            "anyone else's) has a conductance below this, and flags the set ...",
        ),
        click.option(
            "--closed-group-min-fraction",
            type=float,
            default=KNN.closed_group_min_fraction,
            show_default=True,
            help="... a set of at least this fraction of its class ...",
        ),
        click.option(
            "--closed-group-max-fraction",
            type=float,
            default=KNN.closed_group_max_fraction,
            show_default=True,
            help="... and at most this fraction ...",
        ),
        click.option(
            "--closed-group-min-class",
            type=int,
            default=KNN.closed_group_min_class,
            show_default=True,
            help="... in classes of at least this many examples (small classes hold naturally closed styles).",
        ),
        click.option(
            "--closed-group-second-pass/--no-closed-group-second-pass",
            default=KNN.closed_group_second_pass,
            show_default=True,
            help="knn_density: a class the closed-group pass alarms also gets the class alarm's second pass (its hard "
            "and misassigned examples), for carriers that did not clump.",
        ),
        click.option(
            "--expected-poisons",
            type=int,
            default=None,
            help="Only for baselines whose rule needs a poison count (spectral_signatures, deep_knn); recorded as told.",
        ),
        click.option(
            "--epic-fraction",
            type=float,
            default=EpicOptions().epic_fraction,
            show_default=True,
            help="epic: medoids per class as a fraction of the class.",
        ),
        click.option(
            "--max-flagged-fraction",
            type=float,
            default=DEFAULTS.max_flagged_fraction,
            show_default=True,
            help="Gate: exit 1 when more is flagged.",
        ),
        click.option(
            "--fail-on-class-alarm/--no-fail-on-class-alarm",
            default=DEFAULTS.fail_on_class_alarm,
            show_default=True,
            help="Gate: exit 1 also when a class raises the class alarm (a flagged group of its own: a targeted attack's signature).",
        ),
        click.option(
            "--manifest",
            type=click.Path(exists=True),
            default=None,
            help="A poison manifest (or its folder): score the flags against it in the summary and report.",
        ),
        click.option(
            "--max-thumbnails",
            type=int,
            default=DEFAULTS.max_thumbnails,
            show_default=True,
            help="report.html: at most this many flagged examples as images.",
        ),
        device_option,
        precision_option,
        click.option(
            "--workers", type=int, default=DEFAULTS.workers, show_default=True, help="Data-loading processes."
        ),
        click.option(
            "--validation",
            type=choice(["header", "full"], "validation"),
            default=DEFAULTS.validation,
            show_default=True,
            help="Folders and shards: read headers up front and skip files that fail to decode when first read (header), or decode every file up front (full).",
        ),
        decoded_cache_option,
        click.option(
            "--seed", type=int, default=DEFAULTS.seed, show_default=True, help="Seeds the proxy and the index."
        ),
        click.option("--quiet", is_flag=True, help="No progress bars."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def print_summary(result: Any) -> None:
    summary = result.summary
    data, flagged, gate = summary["data"], summary["flagged"], summary["gate"]
    click.echo(
        f"data      {data['source']} ({data['kind']}, {plural(data['examples'], 'example')}, {plural(len(data['classes']), 'class')}, {len(data['skipped'])} skipped)"
    )
    click.echo(
        f"proxy     {summary['model']['name']}, accuracy on the data {summary['model']['train_accuracy_eval_mode']:.1%}"
    )
    worst = sorted(flagged["per_class"].items(), key=lambda kv: -kv[1])[:3]
    click.echo(
        f"flagged   {flagged['count']} ({flagged['fraction']:.2%}); most in {', '.join(f'{k}: {v}' for k, v in worst)}"
    )
    verdict = gate.get("verdict", "passed" if gate["passed"] else "failed").upper()
    click.echo(
        f"gate      {verdict} (flagged {gate['flagged_fraction']:.2%}, limit {gate['max_flagged_fraction']:.2%})"
    )
    if gate.get("caution"):
        click.echo(f"caution   no verdict: {gate['caution']}")
    if gate["alarmed_classes"]:
        consequence = (
            "the gate fails on it"
            if gate["fail_on_class_alarm"]
            else "the gate would fail without --no-fail-on-class-alarm"
        )
        click.echo(
            f"alarm     a flagged group of its own in {', '.join(gate['alarmed_classes'])}: a targeted attack's signature ({consequence})"
        )
    click.echo(
        f"time      {summary['seconds']['total']:.1f} s  "
        + ", ".join(f"{k} {v:.1f}" for k, v in summary["seconds"].items() if k != "total")
    )
    for note in data["notes"]:
        click.echo(f"note      {note}")
    click.echo(f"outputs   {', '.join(str(p) for p in result.files.values())}")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sanitize")
def cli() -> None:
    """Find isolated (likely poisoned) examples in image-classification training data.

    \b
    Exit codes: 0 passed, 1 the gate failed, 2 bad input or usage, 3 internal error, 4 no verdict (the data
    cannot be judged: one class, or a proxy too weak), 130 interrupted.
    """


@cli.command()
@click.argument("data", type=click.Path(path_type=Path))
@scan_options
@_handle_errors
def scan(data: Path, out: Path, **options: Any) -> None:
    """Scan DATA (an ImageFolder directory or a .npz) and gate on the flagged fraction."""
    from sanitize.scanner import scan as run

    result = run(data, out, **options)
    if is_main_process():  # under torchrun every rank has the verdict; one prints it
        try:
            print_summary(result)
            if result.summary["flagged"]["count"] and result.summary["gate"]["verdict"] != "inconclusive":
                command = shlex.join(
                    ["sanitize", "train", str(data), "--robust", "--exclude", str(result.files["flagged"])]
                )
                click.echo(f"next      {command}   (train on what the scan kept)")
        except BrokenPipeError:  # `sanitize scan ... | head -3`: the verdict still decides the exit code
            silence_stdout()
    sys.exit(VERDICT_EXIT[result.summary["gate"]["verdict"]])


@cli.command()
@click.argument("scans", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("sanitize-combined"),
    show_default=True,
    help="Output folder: summary.json (each scan's verdict and the combined one), flagged.txt (the union), report.html.",
)
@_handle_errors
def combine(scans: tuple[Path, ...], out: Path) -> None:
    """Read two or more finished scans of the same data (e.g. with two proxies) as one gate: it fails when any scan's
    fails, flagged.txt holds the union of their flags and report.html links each scan's report."""
    from sanitize.combine import combine_scans

    result = combine_scans(scans, out)
    summary, gate = result.summary, result.summary["gate"]
    for each in summary["scans"]:
        click.echo(
            f"scan      {each['folder']}: {each['verdict'].upper()} ({each['proxy']}, flagged "
            f"{each['flagged_fraction']:.2%}{', alarm in ' + ', '.join(each['alarmed_classes']) if each['alarmed_classes'] else ''})"
        )
    for note in summary["notes"]:
        click.echo(f"note      {note}")
    click.echo(f"flagged   {summary['flagged']['count']} ({summary['flagged']['fraction']:.2%}), the union")
    click.echo(f"gate      {gate['verdict'].upper()} (fails when any scan's gate fails)")
    click.echo(f"outputs   {', '.join(str(p) for p in result.files.values())}")
    sys.exit(VERDICT_EXIT[gate["verdict"]])


@cli.command()
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("sanitize-demo"),
    show_default=True,
    help="Where the demo's scan writes its outputs.",
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
@_handle_errors
def demo(out: Path, quiet: bool) -> None:
    """Scan a built-in dataset (scikit-learn's digits as PNGs) holding planted problems; no downloads.

    2% of the images are moved to a wrong class, and 25 images of one class carry a stamped pattern: a stand-in for
    a targeted attack's poisons (a tight group of its own in one class), which raises the class alarm.
    """
    refuse_torchrun("demo")
    from sanitize.data.digits import digits_arrays, mislabel, stamp_group, write_image_folder
    from sanitize.manifest import MANIFEST
    from sanitize.scanner import scan as run

    images, labels = digits_arrays()
    noisy, moved = mislabel(labels, 0.02)
    untouched = labels.copy()
    untouched[moved] = -1  # the stand-in group is drawn from images that kept their label
    stamped = stamp_group(images, untouched, label=3, count=25)
    names = [f"digit_{d}" for d in range(10)]
    with tempfile.TemporaryDirectory(prefix="sanitize-demo-data-") as folder:  # removed afterwards, even on a failure
        data_dir = Path(folder) / "digits"
        ids = write_image_folder(data_dir, images, noisy, names)
        manifest = Path(folder) / MANIFEST  # what the stand-in planted, so the report shows what was caught
        record = {"method": "demo stand-in (a stamped group)", "eps": 255, "target_class": 3, "intended_class": 3}
        manifest.write_text(json.dumps(record | {"poison_ids": [ids[i] for i in stamped]}))
        click.echo(
            f"demo data {len(ids)} digit images (a temporary folder): {len(moved)} moved to a wrong class folder, "
            f"{len(stamped)} of digit_3 stamped as a group (a stand-in for poisons aimed at one target)"
        )
        # no flips: a flipped digit is another digit
        result = run(
            data_dir,
            out,
            model="tiny",
            epochs=15,
            batch_size=32,
            augment=False,
            quiet=quiet,
            seed=0,
            manifest=str(manifest),
        )
    print_summary(result)
    flagged = set(result.flagged_ids)
    click.echo(
        f"planted   {len(flagged & {ids[i] for i in moved})} of {len(moved)} mislabeled images are among the flagged"
    )
    click.echo(
        f"planted   {len(flagged & {ids[i] for i in stamped})} of {len(stamped)} stamped images are among the flagged"
    )


@cli.command()
@click.argument("data", type=click.Path(path_type=Path))
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("sanitize-train"),
    show_default=True,
    help="Output directory (never inside DATA).",
)
@click.option(
    "--robust", is_flag=True, help="EPIC: drop isolated examples periodically while training; writes drop_log.json."
)
@click.option(
    "--model",
    type=choice(["auto", *MODELS], "model"),
    default="auto",
    show_default=True,
    help="Model from the registry; auto picks by image size.",
)
@click.option("--epochs", type=int, default=TRAIN_DEFAULTS.epochs, show_default=True, help="Training epochs.")
@click.option(
    "--batch-size", type=int, default=TRAIN_DEFAULTS.batch_size, show_default=True, help="Training batch size."
)
@click.option(
    "--lr",
    type=float,
    default=TRAIN_DEFAULTS.lr,
    show_default=True,
    help="Initial learning rate (SGD with Nesterov momentum), the peak under --schedule onecycle.",
)
@click.option(
    "--schedule",
    type=choice(list(SCHEDULES), "schedule"),
    default=TRAIN_DEFAULTS.schedule,
    show_default=True,
    help=SCHEDULE_HELP[0].upper() + SCHEDULE_HELP[1:],
)
@click.option(
    "--augment/--no-augment",
    default=TRAIN_DEFAULTS.augment,
    show_default=True,
    help="Random crop + flip while training.",
)
@click.option(
    "--noise-eps",
    type=float,
    default=TRAIN_DEFAULTS.noise_eps,
    show_default=True,
    help="Random noise while training: every pixel moved by +-this many levels of 255, a fresh random sign each "
    "batch (friendly noise's random component, a defense against poisons; 0: off).",
)
@click.option(
    "--friendly-eps",
    type=float,
    default=TRAIN_DEFAULTS.friendly_eps,
    show_default=True,
    help="Friendly noise: per example the largest change within +-this many levels that keeps the model's prediction, "
    "found once at 1/8 of the epochs and added from then on (~30 passes over the data more; 0: off).",
)
@click.option(
    "--fraction",
    type=float,
    default=ROBUST_DEFAULTS.fraction,
    show_default=True,
    help="Robust: medoids per class as a share of the class.",
)
@click.option("--every", type=int, default=None, help="Robust: epochs between rounds [default: epochs / 8].")
@click.option(
    "--warmup", type=int, default=ROBUST_DEFAULTS.warmup, show_default=True, help="Robust: first epoch a round may run."
)
@click.option(
    "--max-dropped-fraction",
    type=float,
    default=ROBUST_DEFAULTS.max_dropped_fraction,
    show_default=True,
    help="Robust: cap on the share dropped.",
)
@click.option(
    "--spread-cap",
    is_flag=True,
    default=ROBUST_DEFAULTS.spread_cap,
    help="Robust: reach the cap evenly over the rounds (after round r of R at most cap x r / R dropped), so that "
    "late rounds still drop.",
)
@click.option(
    "--pool-runs",
    type=int,
    default=ROBUST_DEFAULTS.pool_runs,
    show_default=True,
    help="Robust: pool the first round over this many independently seeded runs (this one and N - 1 scouts trained "
    "from scratch to the first round only; 1: off).",
)
@click.option(
    "--pool-votes",
    type=int,
    default=ROBUST_DEFAULTS.pool_votes,
    show_default=True,
    help="Robust, with --pool-runs: the first round drops an example that at least this many runs isolate.",
)
@test_option
@exclude_option
@click.option(
    "--max-thumbnails",
    type=int,
    default=48,
    show_default=True,
    help="report.html: at most this many dropped examples as images.",
)
@image_size_option
@device_option
@precision_option
@click.option("--workers", type=int, default=0, show_default=True, help="Data-loading processes.")
@decoded_cache_option
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the model and the data order.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@_handle_errors
def train(data: Path, out: Path, **options: Any) -> None:
    """Train a model from scratch on DATA; with --robust, EPIC drops isolated examples as it goes."""
    from sanitize.trainer import train as run

    result = run(data, out, **options)
    if not is_main_process():
        return
    model = result.summary["model"]
    _echo_training(result, f"{model['name']}, {model['trained_epochs']} epochs")


def _echo_training(result: Any, model: str) -> None:
    """What `train` and `finetune` print: exclusions, the model and its accuracy, drops, time and outputs."""
    summary = result.summary
    if summary["excluded"]:
        click.echo(f"excluded  {summary['excluded']['examples']} listed in {summary['excluded']['list']}")
    click.echo(
        f"model     {model}, accuracy on the data {summary['train_accuracy']:.1%}"
        + (f", test {summary['test_accuracy']:.1%}" if "test_accuracy" in summary else "")
    )
    if summary["robust"]:
        robust = summary["robust"]
        click.echo(
            f"dropped   {robust['dropped']} ({robust['dropped_fraction']:.2%}) in rounds at epochs {robust['rounds']}"
        )
    click.echo(f"time      {summary['seconds']:.1f} s")
    click.echo(f"outputs   {', '.join(str(p) for p in result.files.values())}")


@cli.command()
@click.argument("data", type=click.Path(path_type=Path))
@click.option(
    "--checkpoint",
    type=click.Path(exists=True, dir_okay=False),
    required=True,
    help="The pretrained network to fine-tune (a state dict, loaded with weights_only=True).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("sanitize-finetune"),
    show_default=True,
    help="Output directory (never inside DATA).",
)
@click.option(
    "--model",
    type=choice(["auto", *MODELS], "model"),
    default=FINETUNE_DEFAULTS.model,
    show_default=True,
    help="The checkpoint's architecture; auto picks by image size.",
)
@click.option(
    "--mode",
    type=click.Choice(FINETUNE_MODES),
    default=FINETUNE_DEFAULTS.mode,
    show_default=True,
    help="linear: retrain the last layer; end-to-end: every weight.",
)
@click.option(
    "--robust",
    is_flag=True,
    help="EPIC: drop isolated examples after every epoch of the first quarter; writes drop_log.json.",
)
@click.option("--epochs", type=int, default=FINETUNE_DEFAULTS.epochs, show_default=True, help="Fine-tuning epochs.")
@click.option("--batch-size", type=int, default=FINETUNE_DEFAULTS.batch_size, show_default=True, help="Batch size.")
@click.option(
    "--lr", type=float, default=None, help="Adam's rate, x0.1 at 1/2 and 3/4 [default: 0.1 linear, 1e-4 end-to-end]."
)
@click.option("--weight-decay", type=float, default=None, help="[default: 0 linear, 5e-4 end-to-end].")
@exclude_option
@test_option
@image_size_option
@device_option
@precision_option
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the data order.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@_handle_errors
def finetune(data: Path, out: Path, **options: Any) -> None:
    """Fine-tune a pretrained network on DATA (the transfer learner); with --robust, EPIC drops isolated examples."""
    from sanitize.finetuner import finetune as run

    result = run(data, out, **options)
    recipe = result.summary["model"]["recipe"]
    _echo_training(
        result, f"{result.summary['model']['name']} fine-tuned ({recipe['mode']}, {recipe['epochs']} epochs)"
    )


@cli.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--data",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="Where the run's data is now (default: the source in summary.json).",
)
@click.option(
    "--max-thumbnails",
    type=int,
    default=DEFAULTS.max_thumbnails,
    show_default=True,
    help="At most this many flagged examples as images.",
)
@click.option(
    "--max-projection-classes",
    type=int,
    default=10,
    show_default=True,
    help="Classes offered in the 2-D embedding view.",
)
@_handle_errors
def report(run_dir: Path, data: Path | None, max_thumbnails: int, max_projection_classes: int) -> None:
    """Re-render RUN_DIR/report.html from a scan's, combined scans', training run's or evaluation's outputs."""
    refuse_torchrun("report")
    from sanitize.report import write_report

    path = write_report(run_dir, data, max_thumbnails=max_thumbnails, max_projection_classes=max_projection_classes)
    click.echo(f"report    {path} ({path.stat().st_size / 1024:.0f} KiB)")


def evaluation_data(fn: Callable) -> Callable:
    """DATA and --test, alike in both evaluations."""
    fn = click.option(
        "--test",
        "test_data",
        type=click.Path(path_type=Path),
        required=True,
        help="Test set the targets are drawn from and clean accuracy is measured on.",
    )(fn)
    return click.argument("data", type=click.Path(path_type=Path))(fn)


override_craft_options = click.option(
    "--craft-option",
    "craft_options",
    multiple=True,
    metavar="NAME=VALUE",
    help="Override one of the attack's own options (repeatable).",
)


def parse_name_value(text: str, option: str) -> tuple[str, Any]:
    """'class_alarm_p=0.1' -> ('class_alarm_p', 0.1): the value as JSON where it parses (numbers, true/false, null),
    else the text."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise SanitizeError(f"{option} takes NAME=VALUE, not {text!r}")
    try:
        return name, json.loads(value)
    except ValueError:
        return name, value


def parse_scan_options(texts: Iterable[str]) -> dict[str, Any]:
    """Repeated --scan-option NAME=VALUE as one dict, checked together against the scan's options (an unknown name
    or a bad value fails here, before any training; options that only work together, such as reduced_side and
    reduced_epochs, are checked as a set)."""
    options = dict(parse_name_value(text, "--scan-option") for text in texts)
    ScanConfig.from_options(**options)
    return options


def parse_keys(text: str, option: str = "--keys") -> tuple[int, ...]:
    """'0-7' or '0,3,5' or '2' -> a tuple of keys (or of `option`'s numbers)."""
    keys: list[int] = []
    try:
        for part in text.split(","):
            low, _, high = part.partition("-")
            keys.extend(range(int(low), int(high) + 1) if high else [int(low)])
    except ValueError:
        raise SanitizeError(f"bad {option} {text!r}; use e.g. 0-7 or 0,3,5") from None
    return tuple(keys)


@cli.command()
@click.argument("data", type=click.Path(path_type=Path))
@click.option(
    "--test",
    "test_data",
    type=click.Path(path_type=Path),
    required=True,
    help="Test set the target image is drawn from.",
)
@click.option(
    "--method",
    type=choice(ATTACKS, "attack"),
    default="gradient-matching",
    show_default=True,
    help="The attack, from the registry.",
)
@click.option(
    "--key", type=int, default=0, show_default=True, help="Poison key: picks target, intended class and poisons."
)
@click.option("--budget", type=float, default=0.01, show_default=True, help="Fraction of the training set to perturb.")
@click.option("--eps", type=float, default=16.0, show_default=True, help="l-inf radius in 0..255 units.")
@click.option(
    "--surrogate",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Surrogate weights; default: train one on DATA.",
)
@click.option(
    "--epochs",
    type=int,
    default=40,
    show_default=True,
    help="Surrogate training epochs when no --surrogate (the cpu scale's 40).",
)
@click.option(
    "--model", type=choice(MODELS, "model"), default="convnet", show_default=True, help="The surrogate's model."
)
@click.option("--iterations", type=int, default=250, show_default=True, help="Crafting iterations per restart.")
@click.option(
    "--restarts",
    type=int,
    default=8,
    show_default=True,
    help="Crafting restarts; the one with the lowest loss is kept.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Where the poisoned copy and poison_manifest.json go.",
)
@click.option(
    "--craft-option",
    "craft_options",
    multiple=True,
    metavar="NAME=VALUE",
    help="Set one of the attack's own options (repeatable).",
)
@device_option
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the surrogate and the crafting.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@_handle_errors
def attack(
    data: Path,
    test_data: Path,
    method: str,
    key: int,
    budget: float,
    eps: float,
    surrogate: str | None,
    epochs: int,
    model: str,
    iterations: int,
    restarts: int,
    out: Path,
    craft_options: tuple[str, ...],
    device: str,
    seed: int,
    quiet: bool,
) -> None:
    """Craft poisons against DATA and write a poisoned copy (lossless) with its ground-truth manifest."""
    refuse_torchrun("attack")
    from attacks import parse_option
    from attacks.api import attack_dataset

    options = {"iterations": iterations, "restarts": restarts} | dict(
        parse_option(method, text) for text in craft_options
    )

    manifest = attack_dataset(
        data,
        test_data,
        out,
        method=method,
        key=key,
        budget=budget,
        eps=eps,
        surrogate=surrogate,
        epochs=epochs,
        model=model,
        device=device,
        seed=seed,
        progress=not quiet,
        **options,
    )
    click.echo(
        f"poisoned  {len(manifest['poison_ids'])} images of class {manifest['intended_class']} for target {manifest['target_id']} (class {manifest['target_class']})"
    )
    click.echo(f"outputs   {out}")


@cli.command()
@evaluation_data
@click.option(
    "--attack",
    "attack_name",
    type=choice(ATTACKS, "attack"),
    default="gradient-matching",
    show_default=True,
    help="The attack, from the registry.",
)
@click.option("--keys", default="0-7", show_default=True, help="Poison keys, e.g. 0-7 or 0,3,5.")
@click.option("--victims", type=int, default=4, show_default=True, help="Victims per key and arm (seeds 0..victims-1).")
@click.option(
    "--seeds",
    default=None,
    help="The victims' seeds, e.g. 4-7 (default 0..victims-1): to split one run's victims across processes.",
)
@click.option(
    "--scale",
    type=choice(["smoke", "cpu", "full", "paper"], "scale"),
    default="cpu",
    show_default=True,
    help="Data, model, recipe and attack effort (docs/protocol.md).",
)
@click.option("--eps", type=float, default=16.0, show_default=True, help="l-inf radius in 0..255 units.")
@click.option("--budget", type=float, default=0.01, show_default=True, help="Fraction of the training set to perturb.")
@click.option(
    "--arms",
    default="clean,undefended,random-noise",
    show_default=True,
    help="Comma-separated: clean, undefended, random-noise, scan, epic, deep_knn, spectral_signatures, activation_clustering, robust, scan-robust (the scan, then robust training on what it keeps), scan-combined (the default scan and the --scan-option scan as one gate, sanitize combine: trained on what neither flagged), noise-training (random noise while training, --noise-eps), friendly-noise (friendly and random noise), perfect-filter, random-filter.",
)
@click.option(
    "--model", type=choice(MODELS, "model"), default=None, help="Override the scale's model (surrogate and victims)."
)
@click.option("--epochs", type=int, default=None, help="Override the scale's victim epochs.")
@click.option("--restarts", type=int, default=None, help="Override the scale's crafting restarts.")
@click.option("--iterations", type=int, default=None, help="Override the scale's crafting iterations.")
@click.option(
    "--augment/--no-augment", default=None, help="Override the scale's crop + flip for surrogate and victims."
)
@click.option("--lr", type=float, default=None, help="Override the scale's learning rate for surrogate and victims.")
@click.option(
    "--surrogates", type=int, default=1, show_default=True, help="Craft against an ensemble of this many surrogates."
)
@override_craft_options
@click.option(
    "--scan-option",
    "scan_options",
    multiple=True,
    metavar="NAME=VALUE",
    help="The scan arm's option where it differs from sanitize scan's default, e.g. class_alarm_p=0.1 (repeatable; "
    "rows record it and summaries keep them apart as a variant of the arm).",
)
@click.option(
    "--robust-option",
    "robust_options",
    multiple=True,
    metavar="NAME=VALUE",
    help="The robust arms' option where it differs from sanitize train --robust's default, e.g. "
    "max_dropped_fraction=0.05 (repeatable; fraction, every, warmup, max_dropped_fraction, spread_cap, pool_runs, pool_votes; rows record "
    "it and summaries keep them apart as a variant of the arm).",
)
@click.option(
    "--noise-eps",
    type=float,
    default=PAPER_NOISE_EPS,
    show_default=True,
    help="The noise arms' victims: sanitize train --noise-eps (every pixel +-this many levels a batch), and for "
    "friendly-noise also --friendly-eps, both at this eps.",
)
@click.option(
    "--craft-only",
    is_flag=True,
    help="Craft (or find) each key's poisons, cache and publish them under OUT/poisons, and train no victim.",
)
@click.option(
    "--cache",
    type=click.Path(file_okay=False),
    default=None,
    help="Surrogates, victims and poisons (default OUT/cache).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Where results.jsonl, the summaries, poisons and surrogates go.",
)
@device_option
@precision_option
@click.option("--quiet", is_flag=True, help="No progress bars.")
@_handle_errors
def evaluate(
    data: Path,
    test_data: Path,
    attack_name: str,
    keys: str,
    victims: int,
    seeds: str | None,
    scale: str,
    eps: float,
    budget: float,
    arms: str,
    model,
    epochs,
    restarts,
    iterations,
    augment,
    lr,
    surrogates,
    craft_options,
    scan_options,
    robust_options,
    noise_eps,
    craft_only,
    cache,
    out: Path,
    device: str,
    precision: str,
    quiet: bool,
) -> None:
    """Train victims from scratch on clean / poisoned / control data; append one JSON line per victim to OUT."""
    refuse_torchrun("evaluate")
    from attacks import parse_option
    from attacks.evaluate import run_evaluation
    from attacks.scales import EvaluationConfig

    config = EvaluationConfig(
        attack=attack_name,
        scale=scale,
        keys=parse_keys(keys),
        victims=victims,
        seeds=parse_keys(seeds, "--seeds") if seeds else None,
        eps=eps,
        budget=budget,
        arms=tuple(a.strip() for a in arms.split(",")),
        model=model,
        epochs=epochs,
        restarts=restarts,
        iterations=iterations,
        augment=augment,
        lr=lr,
        surrogates=surrogates,
        craft_options=dict(parse_option(attack_name, text) for text in craft_options),
        scan_options=parse_scan_options(scan_options),
        robust_options=dict(parse_name_value(text, "--robust-option") for text in robust_options),
        noise_eps=noise_eps,
        craft_only=craft_only,
        device=device,
        precision=precision,
        cache=cache,
    )
    run_evaluation(data, test_data, out, config, progress=not quiet, command="sanitize " + " ".join(sys.argv[1:]))
    if craft_only:
        click.echo(f"poisons: {out / 'poisons'}")
    else:
        click.echo((out / "summary.md").read_text())


@cli.command("evaluate-transfer")
@evaluation_data
@click.option(
    "--attack",
    "attack_name",
    type=choice(ATTACKS, "attack"),
    default="bullseye-polytope",
    show_default=True,
    help="The attack, from the registry (crafted against the victims' own extractor: white-box).",
)
@click.option(
    "--mode",
    type=click.Choice(FINETUNE_MODES),
    default="linear",
    show_default=True,
    help="Victims retrain the last layer (linear) or fine-tune every weight.",
)
@click.option("--keys", default="0-7", show_default=True, help="Poison keys, e.g. 0-7 or 0,3,5.")
@click.option("--victims", type=int, default=2, show_default=True, help="Victims per key and arm.")
@click.option("--eps", type=float, default=25.0, show_default=True, help="l-inf radius in 0..255 units.")
@click.option("--poisons", type=int, default=5, show_default=True, help="Poisons per target.")
@click.option(
    "--arms",
    default="clean,undefended,random-noise",
    show_default=True,
    help="Comma-separated: clean, undefended, random-noise, scan, scan-extractor, scan-held-out-extractor, "
    "deep_knn-extractor, robust, scan-held-out-robust.",
)
@click.option(
    "--substitutes",
    default="",
    help="Black-box: comma-separated architectures the attacker pretrains on the same data (another seed) and crafts "
    "against, instead of the victims' extractor (white-box, the default).",
)
@override_craft_options
@click.option(
    "--cache", type=click.Path(file_okay=False), default=None, help="The extractor and poisons (default OUT/cache)."
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Where results.jsonl and the summaries go.",
)
@device_option
@precision_option
@_handle_errors
def evaluate_transfer(
    data: Path,
    test_data: Path,
    attack_name: str,
    mode: str,
    keys: str,
    victims: int,
    eps: float,
    poisons: int,
    arms: str,
    substitutes: str,
    craft_options: tuple[str, ...],
    cache: str | None,
    out: Path,
    device: str,
    precision: str,
) -> None:
    """Fine-tune a pretrained extractor on clean / poisoned / control data (the transfer setting); one JSON line per
    victim in OUT."""
    refuse_torchrun("evaluate-transfer")
    from attacks import parse_option
    from attacks.evaluate_transfer import run_transfer_evaluation
    from attacks.transfer import TransferConfig

    config = TransferConfig(
        attack=attack_name,
        mode=mode,
        keys=parse_keys(keys),
        victims=victims,
        eps=eps,
        poisons=poisons,
        arms=tuple(a.strip() for a in arms.split(",")),
        substitutes=tuple(name.strip() for name in substitutes.split(",") if name.strip()),
        craft_options=dict(parse_option(attack_name, text) for text in craft_options),
        device=device,
        precision=precision,
        cache=cache,
    )
    run_transfer_evaluation(data, test_data, out, config, command="sanitize " + " ".join(sys.argv[1:]))
    click.echo((out / "summary.md").read_text())


@cli.command("evaluate-back-gradient")
@click.argument("data", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--learner",
    type=click.Choice(["logistic", "adaline", "mlp", "convnet"]),
    default="logistic",
    show_default=True,
    help="The learner the attacker differentiates through and the victims train.",
)
@click.option(
    "--victim-learner",
    type=click.Choice(["logistic", "adaline", "mlp", "convnet"]),
    default=None,
    help="Victims of another learner than the attacker's (transfer); default: the attacker's.",
)
@click.option(
    "--goal",
    type=click.Choice(["generic", "specific"]),
    default="generic",
    show_default=True,
    help="Raise the test error (generic) or push --source images into --destination (specific).",
)
@click.option("--source", type=int, default=8, show_default=True, help="The specific goal's source class.")
@click.option("--destination", type=int, default=3, show_default=True, help="The specific goal's destination class.")
@click.option(
    "--fractions",
    default="0.01,0.03,0.06",
    show_default=True,
    help="Poisons per clean training point, comma-separated.",
)
@click.option("--seeds", default="0-4", show_default=True, help="Splits (and victims), e.g. 0-4 or 0,2.")
@click.option("--iterations", type=int, default=60, show_default=True, help="The attacker's steps.")
@click.option(
    "--arms",
    default="clean,label-flip,undefended,scan",
    show_default=True,
    help="Comma-separated: clean, label-flip, undefended, scan, or a baseline detector's name (deep_knn, epic, ...).",
)
@click.option(
    "--threshold",
    type=float,
    default=None,
    help="The scan arm's knn_density threshold (as sanitize scan --threshold; default: the scan's).",
)
@click.option(
    "--proxy-epochs",
    type=int,
    default=None,
    help="The scan arm's proxy epochs (as sanitize scan --epochs; default: the scan's).",
)
@click.option(
    "--proxy-folds",
    type=int,
    default=None,
    help="The scan arm's out-of-fold proxies for the label check (as sanitize scan --proxy-folds; default: off).",
)
@click.option(
    "--trusted-proxy",
    is_flag=True,
    help="The scan arm scans with weights the defender trained on clean data it trusts (the seed's validation "
    "split), held out (as sanitize scan --checkpoint W --held-out-checkpoint), instead of a proxy trained on the data.",
)
@click.option(
    "--label-rule",
    type=click.Choice(LABEL_RULES),
    default=None,
    help="The scan arm's label check rule (as sanitize scan --label-rule; default: the scan's).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Where results.jsonl, summary.md and the cached poisons go.",
)
@_handle_errors
def evaluate_back_gradient(
    data: Path | None,
    learner: str,
    victim_learner: str | None,
    goal: str,
    source: int,
    destination: int,
    fractions: str,
    seeds: str,
    iterations: int,
    arms: str,
    threshold: float | None,
    proxy_epochs: int | None,
    proxy_folds: int | None,
    trusted_proxy: bool,
    label_rule: str | None,
    out: Path,
) -> None:
    """Back-gradient poisoning (added points with chosen labels) against a known learner, on DATA (.npz; default
    scikit-learn's digits): victims' test error on clean, label-flipped, poisoned and scanned data."""
    refuse_torchrun("evaluate-back-gradient")
    from attacks.back_gradient import BackGradientOptions
    from attacks.evaluate_back_gradient import BackGradientConfig, run_back_gradient_evaluation

    try:
        parsed_fractions = tuple(float(f) for f in fractions.split(","))
    except ValueError:
        raise SanitizeError(f"--fractions must be comma-separated numbers, not {fractions!r}") from None
    attack = BackGradientOptions(learner, goal, source, destination, iterations)
    config = BackGradientConfig(
        attack,
        parsed_fractions,
        parse_keys(seeds, "--seeds"),
        tuple(a.strip() for a in arms.split(",")),
        scan_threshold=threshold,
        scan_epochs=proxy_epochs,
        scan_folds=proxy_folds,
        scan_trusted=trusted_proxy,
        scan_label_rule=label_rule,
        victim_learner=victim_learner,
    )
    run_back_gradient_evaluation(data, out, config, command="sanitize " + " ".join(sys.argv[1:]))
    click.echo((out / "summary.md").read_text())


def main() -> None:
    try:
        cli(prog_name="sanitize")
    except KeyboardInterrupt:  # outside a command's own handler (while starting): quiet as well
        click.echo("interrupted", err=True)
        sys.exit(130)
