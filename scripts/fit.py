"""Which formula to trust, and refit its constants: `python scripts/fit.py PATH... [--calibrate]`.

    python scripts/fit.py outputs/multirun/2026-11-25_10-00-00            # error tables + plots
    python scripts/fit.py SWEEP1 SWEEP2 results.parquet --calibrate        # + calibrated YAMLs
    python scripts/fit.py SWEEP --calibrate detailed seed_korthikanti --out /tmp/formulas

PATHs are sweep directories or results Parquet files with measured rows (measure=fake|cpu|cuda).
It writes, into --report (default: <first sweep>/fit), `fit_errors.parquet` (every formula, overall
and by model, precision, workload, recompute and seq bucket: count, mean signed error, MAPE,
median, p90, worst and where), `fit_summary.md` (also printed) and three PNGs. Rows whose
measurement failed (oom, skipped, error) are listed, not dropped silently.

--calibrate [FORMULA ...] refits each formula's calibratable constants by non-negative least
squares on relative error and writes `<formula>_calibrated.yaml` into conf/formula/ (or --out), with
its provenance: data files, row count, date, error before and after, and held-out error
(leave-one-model-out and a random 70/30 split). Use it with `python sweep.py formula=<name>`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import polars as pl  # noqa: E402
import yaml  # noqa: E402

from memsweep import plots  # noqa: E402
from memsweep.calibrate import calibrate, constants_dict, held_out, mape  # noqa: E402
from memsweep.errors import ConfigError  # noqa: E402
from memsweep.fit import (  # noqa: E402
    GROUPINGS, error_tables, load_tables, measured_jobs, unmeasured, with_errors,
)
from memsweep.formulas import FORMULAS, get_formula  # noqa: E402
from memsweep.presets import CONF_DIR  # noqa: E402
from memsweep.results import markdown_table, write_parquet_atomic, write_text_atomic  # noqa: E402


def errors_report(table: pl.DataFrame, report: Path, heatmap: str) -> list[str]:
    errors = with_errors(table)
    failed = unmeasured(table)
    lines = [f"# Fit errors ({errors['job_id'].n_unique()} measured jobs)", ""]
    if failed.height:
        lines += [f"Not measured ({failed.height} jobs):", "", markdown_table(failed.select(
            "model", "workload", "seq", "batch", "dtype", "status", "error")), ""]
    tables = error_tables(errors)
    parts = []
    for grouping, t in tables.items():
        lines += [f"## {'Overall' if grouping == 'overall' else 'By ' + grouping}", "",
                  markdown_table(t.drop("worst_signed_pct", *(["worst_config"] if grouping != "overall" else []))), ""]
        group = pl.lit("all") if grouping == "overall" else pl.col(grouping).cast(pl.String)
        parts.append(t.with_columns(pl.lit(grouping).alias("grouping"), group.alias("group"))
                     .select("grouping", "group", *[c for c in t.columns if c not in (grouping,)]))
    write_parquet_atomic(pl.concat(parts, how="vertical_relaxed"), report / "fit_errors.parquet")
    if errors.height:
        plots.predicted_vs_measured(errors, report / "predicted_vs_measured.png")
        plots.error_vs_seq(errors, report / "error_vs_seq.png")
        if heatmap in set(errors["formula"]):
            plots.residual_heatmap(errors, heatmap, report / f"residuals_{heatmap}.png")
    return lines


def calibrate_all(table: pl.DataFrame, names: list[str], out_dir: Path, sources: list[str]) -> list[str]:
    jobs, cols, measured = measured_jobs(table)
    if not len(measured):
        raise ConfigError("PATH", ", ".join(sources), "sweeps with measured rows (measure=fake|cpu|cuda)")
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        formula = get_formula(name)
        result = calibrate(formula, cols, measured)
        before, after = mape(formula, cols, measured), mape(result.formula, cols, measured)
        held = held_out(formula, cols, measured, jobs["model"].to_list())
        doc = {
            "name": result.formula.name,
            "base": formula.name if formula.name in FORMULAS else name,
            "constants": constants_dict(result.formula),
            "provenance": {
                "calibrated_from": name, "fitted": list(result.fitted) if result.improved else [],
                "note": "" if result.improved else "the refit did not lower the error: constants kept",
                "data": sources,
                "rows": int(len(measured)), "models": sorted(set(jobs["model"])),
                "backends": sorted(set(jobs["measure_backend"].drop_nulls())),
                "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "mape_before_pct": round(before, 4), "mape_after_pct": round(after, 4),
                **{k: round(v, 4) for k, v in held.items()},
            },
        }
        header = (f"# Calibrated by scripts/fit.py from {len(measured)} measured jobs; select with "
                  f"`python sweep.py formula={result.formula.name}`.\n")
        path = out_dir / f"{result.formula.name}.yaml"
        write_text_atomic(header + yaml.safe_dump(doc, sort_keys=False), path)
        rows.append({"formula": name, "rows": len(measured), "mape_before_pct": before,
                     "mape_after_pct": after, **held, "yaml": str(path)})
    return ["## Calibration (MAPE %, in sample and held out)", "", markdown_table(pl.DataFrame(rows)), ""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, help="sweep directories or results Parquet files")
    parser.add_argument("--calibrate", nargs="*", metavar="FORMULA",
                        help="refit these formulas (default: every built-in formula)")
    parser.add_argument("--out", type=Path, help="where calibrated YAMLs go (default conf/formula/)")
    parser.add_argument("--report", type=Path, help="where tables and plots go (default <first path>/fit)")
    parser.add_argument("--heatmap", default="detailed", help="formula for the residual heatmap")
    args = parser.parse_args(argv)
    try:
        table = load_tables(args.paths)
        first = args.paths[0] if args.paths[0].is_dir() else args.paths[0].parent
        report = args.report or first / "fit"
        report.mkdir(parents=True, exist_ok=True)
        lines = errors_report(table, report, args.heatmap)
        if args.calibrate is not None:
            names = args.calibrate or list(FORMULAS)
            for n in names:
                get_formula(n, key="--calibrate")
            lines += calibrate_all(table, names, args.out or CONF_DIR / "formula",
                                   [str(p) for p in args.paths])
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = "\n".join(lines)
    write_text_atomic(text + "\n", report / "fit_summary.md")
    print(text)
    print(f"\nwritten: {report}/fit_errors.parquet, fit_summary.md, *.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
