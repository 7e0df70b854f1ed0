"""summary.json and summary.md of an evaluation: mean +- standard error per (attack, scale, model, epochs, eps, arm,
variant), and every defended arm paired with the undefended victims of the same key, seed and poisons."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attacks.arms import CONTROL_ARMS, UNPOISONED_ARMS
from attacks.rows import attack_changes, attack_variant, defense_variant, read_rows, variant
from sanitize.report import write_report


def aggregate(out: Path, command: str | None = None) -> dict[str, Any]:
    """summary.json and summary.md: mean +- standard error per (attack, scale, model, epochs, eps, arm, variant): a
    detector arm's rows scanned under an older default, and rows whose poisons were crafted with other options, are
    their own variant (`attacks.rows.variant`). Without `command` the summary keeps the one it already names."""
    if command is None and (out / "summary.json").exists():
        command = json.loads((out / "summary.json").read_text()).get("command")
    groups: dict[tuple, list[dict]] = {}
    for row in read_rows(out):
        groups.setdefault(
            (row["attack"], row["scale"], row["model"], row["epochs"], row["eps"], row["arm"], variant(row)), []
        ).append(row)
    table = []
    for group, rows in sorted(groups.items()):
        success = np.array([r["success"] for r in rows], float)
        accuracy = np.array([r["clean_acc"] for r in rows], float)
        p_intended = [r["p_intended"] for r in rows if r.get("p_intended") is not None]
        cost, basis = _cost_vs_plain(rows, groups.get(_undefended_group(group, rows, groups), []))
        table.append(
            _group_fields(group)
            | {
                "victims": len(rows),
                "keys": len({r["poison_key"] for r in rows}),
                "success_mean": float(success.mean()),
                "success_se": float(success.std(ddof=1) / math.sqrt(len(rows))) if len(rows) > 1 else None,
                "p_intended_median": float(np.median(p_intended)) if p_intended else None,
                "clean_acc_mean": float(accuracy.mean()),
                "clean_acc_se": float(accuracy.std(ddof=1) / math.sqrt(len(rows))) if len(rows) > 1 else None,
                "victim_seconds_mean": float(np.mean([r["seconds"]["victim_training"] for r in rows])),
                "dropped_fraction_mean": float(np.mean([r["dropped_fraction"] for r in rows])),
                "poison_precision_mean": _mean_of(rows, "poison_precision"),
                "poison_recall_mean": _mean_of(rows, "poison_recall"),
                "auroc_mean": _mean_of(rows, "auroc"),
                "cost_vs_plain_training": cost,
                "cost_basis": basis,
            }
        )
    paired = paired_with_undefended(groups)
    sweeps = weight_sweeps(groups)
    summary = {
        "kind": "evaluation",
        "command": command,
        "git_commit": git_commit(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "table": table,
        "paired": paired,
        "weight_sweeps": sweeps,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    lines = [
        "| attack | scale | model | epochs | eps | arm | victims (keys) | success | median p(intended) | clean accuracy | dropped "
        "| poison precision | poison recall | AUROC | victim s | cost vs plain |",
        "|" + " --- |" * 16,
    ]
    for t in table:
        lines.append(
            f"| {t['attack']} | {t['scale']} | {t['model']} | {t['epochs']} | {t['eps']:g} | {_arm_label(t)} | {t['victims']} ({t['keys']}) "
            f"| {t['success_mean']:.1%}{_se(t['success_se'], '.1%')} | {_cell(t['p_intended_median'], '.3f')} | {t['clean_acc_mean']:.2%} | {t['dropped_fraction_mean']:.2%} "
            f"| {_cell(t['poison_precision_mean'], '.2f')} | {_cell(t['poison_recall_mean'], '.2f')} | {_cell(t['auroc_mean'], '.3f')} "
            f"| {t['victim_seconds_mean']:.0f} | {_cell(t['cost_vs_plain_training'], '.2f')}{' (' + t['cost_basis'] + ')' if t['cost_basis'] else ''} |"
        )
    if paired:
        lines += [
            "",
            "Paired with the undefended victims of the same key and seed (defended arms may cover fewer keys than the table's undefended row):",
            "",
            "| eps | epochs | arm | pairs (keys) | undefended success | arm success | where the twin flipped: pairs, arm success | clean accuracy change | recall of carriers / other poisons |",
            "|" + " --- |" * 9,
        ]
        for t in paired:
            lines.append(
                f"| {t['eps']:g} | {t['epochs']} | {_arm_label(t)} | {t['pairs']} ({t['keys']}) | {t['undefended_success']:.1%} | {t['arm_success']:.1%} "
                f"| {t['flipped_twins']}, {_cell(t['arm_success_where_twin_flipped'], '.1%')} "
                f"| {t['clean_acc_change']:+.2%}{_se(t['clean_acc_change_se'], '.2%')} | {_cell(t.get('carrier_recall'), '.2f')} / {_cell(t.get('rest_recall'), '.2f')} |"
            )
    if sweeps:
        lines += [
            "",
            "Success against the adaptive attacker's weight (0: the plain attack), today's defenses:",
            "",
            "| eps | epochs | term | crafted with | arm | weight: success (victims) |",
            "|" + " --- |" * 6,
        ]
        for t in sweeps:
            points = ", ".join(f"{p['weight']:g}: {p['success']:.1%} ({p['victims']})" for p in t["points"])
            lines.append(f"| {t['eps']:g} | {t['epochs']} | {t['term']} | {t['base'] or '-'} | {t['arm']} | {points} |")
    (out / "summary.md").write_text(
        f"Command: `{command}`\n\nCommit: {summary['git_commit']}\n\n" + "\n".join(lines) + "\n"
    )
    write_report(out)
    return summary


def paired_with_undefended(groups: dict[tuple, list[dict]]) -> list[dict[str, Any]]:
    """Every arm but the controls against the undefended victims of the same (key, seed, poisons): success on the same
    pairs and the change in clean accuracy, so that an arm run on a few keys is not read against every key's rate.
    Rows from before rows named their poisons pair among themselves (they shared one cache of poisons)."""
    paired = []
    for group, rows in sorted(groups.items()):
        if _group_fields(group)["arm"] in CONTROL_ARMS:
            continue
        plain = {_pair_key(r): r for r in groups.get(_undefended_group(group, rows, groups), [])}
        pairs = [(plain[_pair_key(r)], r) for r in rows if _pair_key(r) in plain]
        if not pairs:
            continue
        change = np.array([d["clean_acc"] - u["clean_acc"] for u, d in pairs])
        flipped = [d for u, d in pairs if u["success"]]  # where the twin was poisoned: what a defense must undo
        paired.append(
            _group_fields(group)
            | {
                "pairs": len(pairs),
                "keys": len({u["poison_key"] for u, _ in pairs}),
                "undefended_success": float(np.mean([u["success"] for u, _ in pairs])),
                "arm_success": float(np.mean([d["success"] for _, d in pairs])),
                "flipped_twins": len(flipped),
                "arm_success_where_twin_flipped": float(np.mean([d["success"] for d in flipped])) if flipped else None,
                "clean_acc_change": float(change.mean()),
                "clean_acc_change_se": float(change.std(ddof=1) / math.sqrt(len(change))) if len(change) > 1 else None,
                "carrier_recall": _mean_of([d for _, d in pairs], "carrier_recall"),
                "rest_recall": _mean_of([d for _, d in pairs], "rest_recall"),
            }
        )
    return paired


ADAPTIVE_TERMS = ("anchor", "evade")  # the adaptive attacker's weights (attacks.adaptive); 0 in the plain attack
# what a weight sweep varies; any other changed option is its base
SWEEP_OPTIONS = (*ADAPTIVE_TERMS, "evade_variant", "evade_scope")


def weight_sweeps(groups: dict[tuple, list[dict]]) -> list[dict[str, Any]]:
    """Success against the adaptive attacker's weight per setting, term and arm, under today's defenses: each weight
    the rows were crafted with, and the plain attack's rows as weight 0. The attack's other changed options (`base`,
    e.g. MetaPoison's `ensemble=1`) are part of the setting: a sweep's weight 0 is the plain attack crafted with the
    same ones."""
    plain: dict[tuple, dict] = {}
    adaptive: dict[tuple, list[dict]] = {}
    for group, rows in groups.items():
        fields, changes = _group_fields(group), attack_changes(rows[0])
        terms = [term for term in ADAPTIVE_TERMS if changes.get(term)]
        if defense_variant(rows[0]) or len(terms) > 1:
            continue
        base = attack_variant(rows[0], leaving_out=SWEEP_OPTIONS)
        setting = (*(fields[name] for name in ("attack", "scale", "model", "epochs", "eps")), base)
        point = {"success": float(np.mean([r["success"] for r in rows])), "victims": len(rows)}
        if not terms:
            plain[(*setting, fields["arm"])] = {"weight": 0.0} | point
            continue
        scope = ", all poisons" if changes.get("evade_scope", "batch") != "batch" else ""
        term = terms[0] + (f" ({changes.get('evade_variant', 'spread')}{scope})" if terms[0] == "evade" else "")
        adaptive.setdefault((*setting, term, fields["arm"]), []).append({"weight": float(changes[terms[0]])} | point)
    sweeps = []
    for (*setting, term, arm), points in sorted(adaptive.items()):
        start = [plain[(*setting, arm)]] if (*setting, arm) in plain else []
        sweeps.append(
            dict(zip(("attack", "scale", "model", "epochs", "eps", "base"), setting))
            | {"term": term, "arm": arm, "points": start + sorted(points, key=lambda p: p["weight"])}
        )
    return sweeps


GROUP_FIELDS = ("attack", "scale", "model", "epochs", "eps", "arm", "variant")  # what a summary row is per


def _group_fields(group: tuple) -> dict[str, Any]:
    return dict(zip(GROUP_FIELDS, group))


def _undefended_group(group: tuple, rows: list[dict[str, Any]], groups: dict[tuple, list[dict]]) -> tuple:
    """The group of the undefended victims a group's rows compare with: the same setting and attack variant; for the
    controls trained on no poisons, the setting's undefended victims when they are of one variant."""
    own = (*group[:5], "undefended", attack_variant(rows[0]))
    if own in groups or group[5] not in UNPOISONED_ARMS:
        return own
    undefended = [g for g in groups if g[:6] == own[:6]]
    return undefended[0] if len(undefended) == 1 else own


def _arm_label(entry: dict[str, Any]) -> str:
    return f"{entry['arm']} ({entry['variant']})" if entry["variant"] else entry["arm"]


def _pair_key(row: dict[str, Any]) -> tuple:
    return row["poison_key"], row["victim_seed"], row.get("poisons_sha256")


def _cost_vs_plain(rows: list[dict[str, Any]], plain: list[dict[str, Any]]) -> tuple[float | None, str | None]:
    """An arm's mean scan + training cost over the undefended victims' mean training cost, with its basis: model
    FLOPs when every row has them (sanitize.work: no machine's load changes them), else process CPU seconds
    (single-thread runs sharing a machine: wall time would measure the sharing), else wall seconds."""
    if not plain:
        return None, None
    for basis in COST_BASES:
        spent, base = [_spent(r, basis) for r in rows], [_spent(r, basis) for r in plain]
        if None not in spent and None not in base:
            scan, training = np.mean([s for s, _ in spent]), np.mean([t for _, t in spent])
            return float((scan + training) / np.mean([t for _, t in base])), basis
    return None, None


COST_BASES = ("flops", "cpu", "wall")  # the first that every row of a comparison has


def _spent(row: dict[str, Any], basis: str) -> tuple[float, float] | None:
    """(scan, victim training) of a row in `basis`, or None when the row does not have it (older rows); a row whose
    arm scanned needs the scan's cost in that basis too (wall seconds excepted: every row has them)."""
    seconds = row["seconds"]
    if basis == "flops":
        work = row.get("flops") or {}
        scan, training, needs_scan = work.get("scan"), work.get("victim_training"), "scan" in seconds
    elif basis == "cpu":
        scan, training, needs_scan = seconds.get("scan_cpu"), seconds.get("victim_training_cpu"), "scan" in seconds
    else:
        scan, training, needs_scan = seconds.get("scan"), seconds.get("victim_training"), False
    if training is None or (needs_scan and scan is None):
        return None
    return scan or 0.0, training


def _se(value: float | None, spec: str) -> str:
    return "" if value is None else f" +- {format(value, spec)}"


def _mean_of(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return float(np.mean(values)) if values else None


def _cell(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def git_commit() -> str | None:
    """The checkout's commit, or None outside a git checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
