"""`sanitize scan` as N grows, and after a kill in each phase (issue: `sanitize scan ./imagenet`).

Memory: ImageNet-labelled folders (1,000 class folders) of N small PNGs each (CIFAR-10 images from ../shared, else
noise; the pixels do not matter, the number of files and classes does), scanned by the CLI (the `tiny` proxy, one
epoch: the cost per image is not the question, ../imagenet-shaped measures a 224 px network) in a child process whose
/proc status is sampled: peak RSS (VmHWM), and its anonymous part (RssAnon: what the process allocated) apart from
the file-backed pages of the memory-mapped embeddings (RssFile), plus the output folder's size on disk.

Resume: the smallest folder scanned once straight through (2 proxy epochs, so a kill in the second has a finished one
to resume from), then once per phase killed (SIGKILL) while that phase's progress bar is under way and rerun with the
same command: whether the killed run left a verdict, whether the rerun's scores.csv and flagged.txt equal the
straight run's, what it says it resumed, and its time against the straight run's.

    python benchmarks/scan_scaling.py --sizes 10000,30000,100000 --root work-data/scan-scaling \\
        --out reports/scan-scaling

With --skip-memory, --sizes N and --phases, the resume part alone on the N-image folder in those phases (a pass of
10,000 images ends before the embedding pass first saves its rows, 60 s in: 30,000 shows that resume).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from imagenet_shaped import source_images  # run as a script: benchmarks/ is on the path
from PIL import Image
from run_record import write_results

# where each kill lands: a phase's progress bar and how far it has gone (the embedding pass saves its rows every 20,000
# or every minute, so a kill late in it has saved rows to resume from)
KILL_AT = {
    "validate": ("validate", 0.3),
    "proxy": ("proxy 2/", 0.3),
    "embed": ("embed", 0.8),
    "density": ("density", 0.3),
}
STATUS_FIELDS = ("VmHWM", "RssAnon", "RssFile")
PHASES = ("validate", "proxy", "embed", "density")  # progress bars in the order a scan draws them (density: and after)


def make_folder(root: Path, images: int, classes: int, shared: Path) -> Path:
    """An ImageFolder of `images` PNGs spread over `classes` folders, written once (a marker says it is complete)."""
    folder = root / f"n{images}"
    if (folder / ".complete").exists():
        return folder
    pixels = source_images(shared, images, seed=images)
    for i, image in enumerate(pixels):
        label = folder / f"n{i % classes:08d}"
        label.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(label / f"{i:07d}.png")
    (folder / ".complete").write_text("")
    return folder


def status_kb(pid: int) -> dict[str, int]:
    """The memory fields of a process's /proc status, in KiB (empty once it has ended)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    fields = (line.split(":") for line in lines)
    return {name: int(value.split()[0]) for name, value in fields if name in STATUS_FIELDS}


def disk_bytes(folder: Path) -> dict[str, int]:
    """Bytes on disk under each top-level entry of `folder`, and in all."""
    sizes = {}
    for entry in folder.iterdir():
        files = [entry] if entry.is_file() else [p for p in entry.rglob("*") if p.is_file()]
        sizes[entry.name] = sum(p.stat().st_size for p in files)
    return {"total": sum(sizes.values()), **dict(sorted(sizes.items()))}


class Scan:
    """One `sanitize scan` child: its stderr read as it comes, its memory sampled until it ends."""

    def __init__(self, folder: Path, out: Path, options: list[str]) -> None:
        command = [sys.executable, "-m", "sanitize", "scan", str(folder), "--out", str(out), *options]
        self.started = time.perf_counter()
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.stderr = ""
        self.phase = "start"  # the last progress bar drawn: each memory sample is charged to it
        self.peak = dict.fromkeys(STATUS_FIELDS, 0)
        self.anon_by_phase: dict[str, int] = {}
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while chunk := self.process.stderr.read(256):
            self.stderr += chunk
            drawn = {bar: chunk.rfind(bar) for bar in PHASES if bar in chunk}
            if drawn:
                self.phase = max(drawn, key=drawn.get)

    def sample(self) -> None:
        status = status_kb(self.process.pid)
        for name, value in status.items():
            self.peak[name] = max(self.peak[name], value)
        if "RssAnon" in status:
            self.anon_by_phase[self.phase] = max(self.anon_by_phase.get(self.phase, 0), status["RssAnon"])

    def bar_fraction(self, desc: str) -> float:
        """How far the last drawn progress bar named `desc` is (0 when none has been drawn)."""
        found = re.findall(re.escape(desc) + r"[^\r\n%]*?(\d+)%", self.stderr)
        return int(found[-1]) / 100 if found else (0.0 if desc not in self.stderr else 0.01)

    def wait(self, kill_in: str | None = None, at: float = 0.3) -> dict:
        """Samples until the scan ends, or kills it once the bar `kill_in` has reached `at`."""
        while self.process.poll() is None:
            self.sample()
            if kill_in and self.bar_fraction(kill_in) >= at:
                self.process.send_signal(signal.SIGKILL)
                break
            time.sleep(0.05)
        code = self.process.wait()
        self.reader.join()
        return {
            "exit": code,
            "seconds": round(time.perf_counter() - self.started, 1),
            "peak_mb": {name: round(kb / 1024, 1) for name, kb in self.peak.items()},
            "peak_anon_mb_by_phase": {phase: round(kb / 1024, 1) for phase, kb in self.anon_by_phase.items()},
        }


def memory_rows(folders: dict[int, Path], work: Path, options: list[str]) -> list[dict]:
    """One straight scan per size: peak memory, disk and the scan's own phase times."""
    rows = []
    for images, folder in folders.items():
        out = work / f"scan-n{images}"
        shutil.rmtree(out, ignore_errors=True)
        scan = Scan(folder, out, options)
        row = {"images": images, **scan.wait()}
        summary = json.loads((out / "summary.json").read_text())
        row["phase_seconds"] = summary["seconds"]
        row["disk_bytes"] = disk_bytes(out)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def same_outputs(a: Path, b: Path) -> bool:
    return all((a / name).read_bytes() == (b / name).read_bytes() for name in ("scores.csv", "flagged.txt"))


def resume_rows(folder: Path, work: Path, options: list[str], phases: list[str]) -> list[dict]:
    """A straight scan, then one killed in each of `phases` and rerun: equal outputs, what it resumed, its time."""
    straight = work / "resume-straight"
    shutil.rmtree(straight, ignore_errors=True)
    reference = Scan(folder, straight, options).wait()
    rows = [{"phase": None, "straight_seconds": reference["seconds"], "exit": reference["exit"]}]
    for phase in phases:
        bar, fraction = KILL_AT[phase]
        out = work / f"resume-{phase}"
        shutil.rmtree(out, ignore_errors=True)
        killed = Scan(folder, out, options).wait(kill_in=bar, at=fraction)
        if killed["exit"] != -signal.SIGKILL:
            rows.append({"phase": phase, "killed": False, "note": "the scan ended before its bar was reached"})
            continue
        verdict_left = (out / "summary.json").exists()
        rerun = Scan(folder, out, options)
        result = rerun.wait()
        said = [line.strip() for line in re.split(r"[\r\n]", rerun.stderr) if line.strip().startswith("resuming")]
        rows.append(
            {
                "phase": phase,
                "killed_after_seconds": killed["seconds"],
                "verdict_left_by_kill": verdict_left,
                "rerun_exit": result["exit"],
                "rerun_seconds": result["seconds"],
                "rerun_over_straight": round(result["seconds"] / reference["seconds"], 2),
                "same_scores_and_flags": same_outputs(straight, out),
                "rerun_said": sorted(set(said)),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,30000,100000")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=1, help="proxy epochs (the cost per image is not the question)")
    parser.add_argument("--model", default="tiny", help="the proxy (../imagenet-shaped measures a 224 px network)")
    parser.add_argument("--root", type=Path, default=Path("work-data/scan-scaling"))
    parser.add_argument("--shared", type=Path, default=Path("../shared"))
    parser.add_argument("--out", type=Path, default=Path("reports/scan-scaling"))
    parser.add_argument("--skip-resume", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--phases", default=",".join(KILL_AT), help="the phases to kill a scan in")
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    started = time.perf_counter()
    folders = {n: make_folder(args.root, n, args.classes, args.shared) for n in sizes}
    written = round(time.perf_counter() - started, 1)
    options = ["--model", args.model, "--epochs", str(args.epochs), "--no-augment"]
    resume_options = ["--model", args.model, "--epochs", "2", "--no-augment"]
    result = {
        "options": options,
        "resume_options": resume_options,
        "classes": args.classes,
        "folders_written_seconds": written,
        "memory": None if args.skip_memory else memory_rows(folders, args.root, options),
        "resume": None
        if args.skip_resume
        else resume_rows(folders[sizes[0]], args.root, resume_options, args.phases.split(",")),
    }
    write_results(args.out / "results.json", result)


if __name__ == "__main__":
    main()
