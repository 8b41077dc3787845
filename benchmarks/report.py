"""Results out: the terminal table, the JSON file and the PNG plots."""

from __future__ import annotations

import json
import os
from collections import defaultdict

UNIT = {"attention": "TFLOP/s", "softmax": "GB/s"}


def rate(row: dict):
    return row.get("tflops") if row["op"] == "attention" else row.get("gbps")


def _fmt(v, width: int, scale: float = 1.0) -> str:
    if v is None:
        return f"{'-':>{width}}"
    v *= scale
    return f"{v:>{width}.1f}" if abs(v) >= 10 else f"{v:>{width}.3g}"


# (header, row key, scale): attention rows carry both rates; GB/s and its share only for the forward
COLUMNS = {
    "attention": [("ms", "ms", 1), ("TFLOP/s", "tflops", 1), ("%mm", "fraction_of_matmul", 100),
                  ("GB/s", "gbps", 1), ("%copy", "fraction_of_copy", 100), ("+MiB", "peak_extra_mib", 1)],
    "softmax": [("ms", "ms", 1), ("GB/s", "gbps", 1), ("%copy", "fraction_of_copy", 100),
                ("+MiB", "peak_extra_mib", 1)],
}


def table(rows: list, ceilings: dict) -> str:
    """One block per op with the measured rows, then each provider's reasons for the rows it did not run
    (once per distinct reason, with the number of rows)."""
    lines = [f"ceilings measured in this run: copy {ceilings['copy_gbps']:.0f} GB/s (%copy), matmul "
             f"{ceilings['matmul_tflops']:.1f} TFLOP/s (%mm); +MiB: extra memory of one call; check: max error vs "
             f"the high-precision reference <= 2x the naive low-precision error"]
    for op in ("attention", "softmax"):
        op_rows = [r for r in rows if r["op"] == op]
        if not op_rows:
            continue
        measured = [r for r in op_rows if r["status"] == "ok"]
        cols = COLUMNS[op]
        lines.append("")
        lines.append(f"{op.upper()}: {len(measured)} of {len(op_rows)} rows measured")
        if measured:
            width = max(len(r["label"]) for r in measured)
            lines.append(f"{'workload':<{width}}  {'provider':<14}" + "".join(f" {h:>8}" for h, _, _ in cols)
                         + "  check")
            for r in measured:
                check = ""
                if r.get("check"):
                    op_sign = "<=" if r["check"] == "ok" else ">"
                    check = f"{r['check']} ({r['max_err']:.1e} {op_sign} {r['err_bound']:.1e})"
                lines.append(f"{r['label']:<{width}}  {r['provider']:<14}"
                             + "".join(f" {_fmt(r.get(k), 8, sc)}" for _, k, sc in cols) + f"  {check}")
        not_run = defaultdict(lambda: defaultdict(int))
        for r in op_rows:
            if r["status"] != "ok":
                not_run[r["provider"]][r["status"]] += 1
        if not_run:
            lines.append("not measured:")
            for provider, reasons in not_run.items():
                for reason, count in reasons.items():
                    lines.append(f"  {provider} ({count} rows): {reason}")
    return "\n".join(lines)


def write_json(path: str, payload: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1, default=str)
    os.replace(tmp, path)  # a run killed mid-write leaves the previous complete file


def plot(rows: list, out_dir: str, title_suffix: str) -> list:
    """One PNG per group of workloads that differ only in length: rate vs length, one line per provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["status"] == "ok" and rate(r) is not None:
            groups[r["group"]][r["provider"]].append((r["x"], rate(r)))
    os.makedirs(out_dir, exist_ok=True)
    for old in os.listdir(out_dir):  # plots of an earlier run would read as this run's
        if old.endswith(".png"):
            os.remove(os.path.join(out_dir, old))
    written = []
    for group, lines in sorted(groups.items()):
        xs = {x for pts in lines.values() for x, _ in pts}
        if len(xs) < 2:  # a single length is a table entry, not a curve
            continue
        op = "attention" if group.startswith("attention") else "softmax"
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for provider, pts in sorted(lines.items()):
            pts.sort()
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=provider)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(xs))
        ax.set_xticklabels([f"{x // 1024}k" if x >= 1024 else str(x) for x in sorted(xs)])
        ax.set_xlabel("sequence length" if op == "attention" else "row length (columns)")
        ax.set_ylabel(UNIT[op])
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.set_title(f"{group}\n{title_suffix}", fontsize=9)
        ax.legend(fontsize=8)
        path = os.path.join(out_dir, f"{group}.png")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
