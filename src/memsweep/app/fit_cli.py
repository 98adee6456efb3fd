"""Which formula to trust, and refit its constants: `memsweep fit PATH... [--calibrate]`
(or `python scripts/fit.py ...`, the same command).

    memsweep fit outputs/multirun/2026-11-25_10-00-00            # error tables + plots
    memsweep fit SWEEP1 SWEEP2 results.parquet --calibrate        # + calibrated YAMLs
    memsweep fit SWEEP --calibrate detailed seed_korthikanti --out /tmp/formulas
    memsweep fit SWEEP --calibrate time --time-backend cpu       # the time model only, cpu-timed rows

PATHs are sweep directories or results Parquet files with measured rows (measure=fake|cpu|cuda).
It writes, into --report (default: <first sweep>/fit), `fit_errors.parquet` (every formula, overall
and by model, precision, workload, recompute and seq bucket: count, mean signed error, MAPE,
median, p90, worst and where), `fit_summary.md` (also printed) and three PNGs. Rows whose
measurement failed (oom, skipped, error) are listed, not dropped silently.

Step time (docs/time.md, "Calibrating the time model"): whenever rows were timed (measure=cuda;
`--time-backend cpu` or `cuda,cpu` takes measure=cpu rows instead or too: real times, but no
GPU's), fit_summary.md gains a "Step time" section, signed % error of each estimated phase (step,
forward, backward, optimizer, prefill, decode_token) by phase, model, workload and hardware, and
`time_errors.parquet` holds every (job, phase) row. Without timed rows it says so in one line.

--calibrate [FORMULA ...] refits each formula's calibratable constants by non-negative least
squares on relative error. Constants the data cannot inform (their column is zero, constant or
collinear with others in the design) keep their values. The refit is judged on held-out rows
(leave-one-model-out and a random 70/30 split) before it is written: one that does worse there
than the formula it came from is not written. The rows must be able to tell: jobs of one model
are refused (one `error:` line, nothing written), and so is a formula named with --calibrate when,
with any one model held out, the jobs left are no more than the constants it fits (a plain
--calibrate reports such a formula as not written). `<formula>_calibrated.yaml` goes beside the report
(or --out; never into the package's conf/), with its provenance. Nothing joins a sweep by itself:

    memsweep fit --install REPORT/detailed_calibrated.yaml --into ~/memsweep-conf
    memsweep --config-dir ~/memsweep-conf formula=detailed_calibrated     # or python sweep.py ...
    memsweep plan formula=REPORT/detailed_calibrated.yaml                 # or python scripts/plan.py ...

With timed rows, --calibrate (no names, or the name `time` among them) also refits the time
model's constants that the rows can tell apart (log-ratio error of every phase, each job weighing
the same; held out: leave-one-model-out, or 5-fold with fewer than three models) into
`time_calibrated.yaml` beside the report (or --out), written only when it lowers the held-out
error. It needs no install, the path is the selection:

    memsweep time=REPORT/time_calibrated.yaml model=llama3-8b           # or python sweep.py ...
    memsweep plan time=REPORT/time_calibrated.yaml tokens=1e12           # or python scripts/plan.py ...
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import sys
from pathlib import Path

import polars as pl
import yaml

from memsweep import plots
from memsweep.calibrate import calibrate, constants_dict, held_out, mape, too_few_models, too_few_rows
from memsweep.errors import ConfigError
from memsweep.fit import (
    error_summary, error_tables, load_tables, measured_jobs, phase_errors, unmeasured, with_errors,
)
from memsweep.formulas import FORMULAS, get_formula, load_calibrated
from memsweep.presets import CONF_DIR
from memsweep.formulas.timing import CONSTANTS_KEY, TimeConstants, constants_to_dict, dump_constants
from memsweep.results import OutputError, markdown_table, write_parquet_atomic, write_text_atomic
from memsweep.time_fit import (
    FIT_BOUNDS, IDENTIFY_REL, calibrate_time, error_tables as time_error_tables, held_out as time_held_out,
    parse_backends, time_data, time_errors, timed_elsewhere, timed_jobs, too_few_jobs,
)

TIME_YAML = "time_calibrated.yaml"


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
    by_phase = phase_errors(table)
    if by_phase.height:  # issue 25: each phase's peak beside the measured one, not only the total
        write_parquet_atomic(by_phase, report / "phase_errors.parquet")
        lines += ["## By phase (the peak of each measured phase)", "",
                  markdown_table(error_summary(by_phase, by=("formula", "phase")).drop("worst_signed_pct")), ""]
    if errors.height:
        plots.predicted_vs_measured(errors, report / "predicted_vs_measured.png")
        plots.error_vs_seq(errors, report / "error_vs_seq.png")
        if heatmap in set(errors["formula"]):
            plots.residual_heatmap(errors, heatmap, report / f"residuals_{heatmap}.png")
    return lines


def check_calibration(table: pl.DataFrame, names: list[str], named: bool, sources: list[str]) -> dict[str, str]:
    """Before anything is written: can these measured jobs identify the constants? Jobs of one
    model (or none) judge no refit: a ConfigError. A formula with as many constants to fit as the
    jobs left when a model is held out (or more) is one too: when named (`--calibrate NAME`), else
    its row says why it was not written. Returns {formula: why} for those rows."""
    jobs, cols, measured = measured_jobs(table)
    if not len(measured):
        raise ConfigError("PATH", ", ".join(sources), "sweeps with measured rows (measure=fake|cpu|cuda)")
    models = jobs["model"].to_list()
    why = too_few_models(models)
    if why:
        raise ConfigError("PATH", ", ".join(sources), f"for --calibrate, {why}; nothing written")
    skip = {}
    for name in names:
        why = too_few_rows(get_formula(name), cols, measured, models)
        if why and named:
            raise ConfigError("--calibrate", name, f"{why}; nothing written")
        if why:
            skip[name] = why
    return skip


def calibrate_all(table: pl.DataFrame, names: list[str], out_dir: Path, sources: list[str],
                  skip: dict[str, str] | None = None) -> list[str]:
    """Refit each formula; written only when judged better on held-out rows. `skip`: formulas the
    rows cannot identify (check_calibration) and why: reported, not fitted."""
    jobs, cols, measured = measured_jobs(table)
    if not len(measured):
        raise ConfigError("PATH", ", ".join(sources), "sweeps with measured rows (measure=fake|cpu|cuda)")
    check_out_dir(out_dir)
    rows = []
    for name in names:
        formula = get_formula(name)
        if skip and name in skip:
            rows.append({"formula": name, "rows": len(measured), "mape_before_pct": mape(formula, cols, measured),
                         "yaml": f"not written: too few jobs: needs {skip[name]}"})
            continue
        result = calibrate(formula, cols, measured)
        before, after = mape(formula, cols, measured), mape(result.formula, cols, measured)
        held = held_out(formula, cols, measured, jobs["model"].to_list())
        # judged on rows it was not fitted to: written only when it does better there, nowhere worse
        judged = [k for k in ("lomo", "split") if f"{k}_after_pct" in held]
        worse = [k for k in judged if held[f"{k}_after_pct"] > held[f"{k}_before_pct"] + 1e-9]
        better = [k for k in judged if held[f"{k}_after_pct"] < held[f"{k}_before_pct"] - 1e-9]
        if not result.fitted or not result.improved or worse or not better:
            rises = ", ".join(f"{k} {held[k + '_before_pct']:.2f} -> {held[k + '_after_pct']:.2f} %" for k in worse)
            why = ("the data inform none of its constants" if not result.fitted else
                   "the refit does not lower the error" if not result.improved else
                   f"held-out error rises ({rises})" if worse else
                   "no held-out improvement (too few rows or models to judge it)")
            rows.append({"formula": name, "rows": len(measured), "mape_before_pct": before,
                         "mape_after_pct": after, **held, "yaml": f"not written: {why}"})
            continue
        doc = {
            "name": result.formula.name,
            "base": formula.name if formula.name in FORMULAS else name,
            "constants": constants_dict(result.formula),
            "provenance": {
                "calibrated_from": name, "fitted": list(result.fitted),
                "kept": [n for n in constants_dict(formula) if n not in result.fitted],
                "data": sources,
                "rows": int(len(measured)), "models": sorted(set(jobs["model"])),
                "backends": sorted(set(jobs["measure_backend"].drop_nulls())),
                "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "mape_before_pct": round(before, 4), "mape_after_pct": round(after, 4),
                **{k: round(v, 4) for k, v in held.items()},
            },
        }
        header = (f"# Calibrated by scripts/fit.py from {len(measured)} measured jobs. Install it with "
                  f"`python scripts/fit.py --install THIS --into DIR`, then select it with "
                  f"`python sweep.py --config-dir DIR formula={result.formula.name}`.\n")
        path = out_dir / f"{result.formula.name}.yaml"
        write_text_atomic(header + yaml.safe_dump(doc, sort_keys=False), path)
        rows.append({"formula": name, "rows": len(measured), "mape_before_pct": before,
                     "mape_after_pct": after, **held, "yaml": str(path)})
    table = pl.DataFrame(rows)
    table = table.select(*[c for c in table.columns if c != "yaml"], "yaml")  # rows differ in their held-out keys
    return ["## Calibration (MAPE %, in sample and held out)", "", markdown_table(table), ""]


def time_report(table: pl.DataFrame, backends: tuple[str, ...], report: Path) -> tuple[list[str], pl.DataFrame]:
    """The "Step time" section (and time_errors.parquet): estimated vs measured phase times of
    the timed jobs; one line when there are none. Returns the lines and the timed jobs."""
    jobs = timed_jobs(table, backends)
    which = "/".join(backends)
    lines = ["## Step time", ""]
    if not jobs.height:
        others = timed_elsewhere(table, backends)
        hint = (f" ({', '.join(f'{n} timed by {b}' for b, n in others.items())}: --time-backend "
                f"{','.join(others)} takes them)" if others else " (measure=cuda times every phase)")
        return [*lines, f"No rows timed by {which}{hint}.", ""], jobs
    errors = time_errors(jobs)
    write_parquet_atomic(errors, report / "time_errors.parquet")
    plural = "s" if jobs.height != 1 else ""
    lines += [f"{jobs.height} job{plural} timed by {which}, {errors.height} phase rows; error = (estimated - "
              f"measured) / measured, % (est_* as the sweep recorded them; decode_token: one decoded token).", ""]
    if "cpu" in backends:
        lines += ["cpu times are real, but no GPU's: each estimate is for its job's hardware preset.", ""]
    for grouping, t in time_error_tables(errors).items():
        shown = t.drop("worst_signed_pct", *(["worst_config"] if grouping != "phase" else []))
        lines += [f"### By {grouping}", "", markdown_table(shown), ""]
    return lines, jobs


def calibrate_time_report(jobs: pl.DataFrame, out_dir: Path, sources: list[str],
                          backends: tuple[str, ...]) -> tuple[list[str], Path | None]:
    """Refit the time model's constants on the timed jobs; `time_calibrated.yaml` only when the
    refit lowers the held-out error (and not the in-sample one's opposite)."""
    check_out_dir(out_dir)
    data = time_data(jobs)
    cal = calibrate_time(data)
    too_few = too_few_jobs(data)
    held = time_held_out(data, cal.start)
    before, after = constants_to_dict(cal.start), constants_to_dict(cal.constants)
    kept = [n for n in before if n not in cal.fitted]
    one_gpu = bool((jobs["tp"].fill_null(1) * jobs["pp"].fill_null(1) * jobs["dp"].fill_null(1) == 1).all())
    why = (f"no estimated phase time moves by more than {IDENTIFY_REL:.1%} when they change"
           + ("; every row is one GPU's, which never communicates" if one_gpu else ""))
    judged = "held_out_after_pct" in held
    better = judged and held["held_out_after_pct"] < held["held_out_before_pct"] - 1e-9
    path: Path | None = None
    if not cal.fitted:
        verdict = "not written: the rows inform none of the constants"
    elif too_few:
        verdict = f"not written: too few jobs: needs {too_few}"
    elif cal.mape_after_pct > cal.mape_before_pct + 1e-9 and not better:
        verdict = "not written: the refit does not lower the error"
    elif not judged:
        verdict = f"not written: no held-out error to judge it ({held['held_out']})"
    elif not better:
        verdict = (f"not written: held-out error does not drop ({held['held_out_before_pct']:.2f} -> "
                   f"{held['held_out_after_pct']:.2f} %)")
    else:
        models = sorted(set(jobs["model"]))
        provenance = {
            "fitted": list(cal.fitted), "kept": kept,
            **({"kept_why": why} if kept else {}),
            **({"at_bound": list(cal.at_bound)} if cal.at_bound else {}),
            "bounds": {n: list(FIT_BOUNDS[n]) for n in cal.fitted},
            "data": sources, "backends": list(backends), "jobs": cal.jobs, "rows": cal.rows,
            "models": models, "hardware": sorted(set(jobs["hardware"].drop_nulls())),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "mape_before_pct": round(cal.mape_before_pct, 4), "mape_after_pct": round(cal.mape_after_pct, 4),
            "held_out": held["held_out"], "held_out_before_pct": round(held["held_out_before_pct"], 4),
            "held_out_after_pct": round(held["held_out_after_pct"], 4),
        }
        header = (f"# Calibrated by scripts/fit.py from {cal.jobs} jobs timed by {'/'.join(backends)}. Select it "
                  f"with `python sweep.py time=THIS` or `python scripts/plan.py time=THIS` (no install needed).\n")
        path = out_dir / TIME_YAML
        constants = TimeConstants(**{n: round(v, 6) for n, v in after.items()})
        write_text_atomic(dump_constants(constants, provenance, header), path)
        verdict = str(path)
    rows = [{"constant": n, "before": before[n], "after": after[n],
             "fitted": "yes" if n in cal.fitted else "no: the rows cannot tell"} for n in before]
    summary = {"jobs": cal.jobs, "rows": cal.rows, "mape_before_pct": cal.mape_before_pct,
               "mape_after_pct": cal.mape_after_pct, **held, "yaml": verdict}
    lines = ["## Step time calibration (MAPE % of the phase rows, in sample and held out)", "",
             markdown_table(pl.DataFrame([summary])), "", markdown_table(pl.DataFrame(rows), float_precision=4), ""]
    if kept:
        lines += [f"Kept at their defaults, as these rows cannot tell them: {', '.join(kept)} ({why}).", ""]
    if cal.at_bound:
        lines += [f"At a bound of its range: {', '.join(cal.at_bound)} (the rows want a value beyond it: "
                  f"another hardware than the rows' preset, or cpu times?).", ""]
    return lines, path


def precheck_calibration(args: argparse.Namespace, table: pl.DataFrame, measured_rows: int, timed: pl.DataFrame,
                         backends: tuple[str, ...]) -> dict[str, str]:
    """--calibrate's refusals, before the report is written (one line, nothing written): formula
    names, too few measured jobs or models (check_calibration), `time` without timed rows or with
    too few. Returns the formulas a plain --calibrate reports as not identifiable."""
    if args.calibrate is None:
        return {}
    wanted = args.calibrate or [*FORMULAS, "time"]
    names = [n for n in wanted if n != "time"]
    for n in names:
        get_formula(n, key="--calibrate")
    skip = {}
    if names and (measured_rows or args.calibrate):
        skip = check_calibration(table, names, bool(args.calibrate), [str(p) for p in args.paths])
    if "time" in args.calibrate:
        if not timed.height:
            raise ConfigError("--calibrate", "time", f"rows timed by {'/'.join(backends)} (measure=cuda; "
                              "--time-backend cpu for measure=cpu rows)")
        why = too_few_jobs(time_data(timed))
        if why:
            raise ConfigError("--calibrate", "time", f"{why}; nothing written")
    return skip


def check_out_dir(out: Path, key: str = "--out") -> None:
    """A directory memsweep may write calibrated formulas into: not the package's own conf/."""
    if out.exists() and not out.is_dir():
        raise ConfigError(key, str(out), "a directory (this is a file)")
    for parent in (out, *out.parents):
        if parent.exists() and not parent.is_dir():
            raise ConfigError(key, str(out), f"a directory ({parent} is a file)")
    if out.resolve() == CONF_DIR.resolve() or CONF_DIR.resolve() in out.resolve().parents:
        raise ConfigError(key, str(out), f"a directory outside the package's {CONF_DIR} (a user config folder)")


def install(yaml_path: Path, into: Path, force: bool) -> str:
    """Copy a calibrated formula into a user config folder (DIR/formula/NAME.yaml), which
    `python sweep.py --config-dir DIR formula=NAME` puts on Hydra's search path."""
    if not yaml_path.exists():
        summary = yaml_path.parent / "fit_summary.md"
        where = f"its row in {summary}" if summary.is_file() else "the Calibration table of fit_summary.md"
        raise ConfigError("--install", str(yaml_path), f"an existing file; this one does not exist (--calibrate writes "
                          f"<formula>_calibrated.yaml only when the refit lowers the held-out error: {where} says "
                          f"why it was not written)")
    if not yaml_path.is_file():
        raise ConfigError("--install", str(yaml_path), "a calibrated formula YAML written by --calibrate (a file)")
    try:
        doc = yaml.safe_load(yaml_path.read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        doc = None
    if isinstance(doc, dict) and CONSTANTS_KEY in doc:
        raise ConfigError("--install", str(yaml_path), f"a calibrated formula YAML ({yaml_path.name} needs no "
                          f"install: select it with python sweep.py time={yaml_path} or scripts/plan.py time=...)")
    try:
        formula = load_calibrated(yaml_path)
    except (OSError, ValueError, AttributeError) as exc:
        raise ConfigError("--install", str(yaml_path), f"a calibrated formula YAML ({type(exc).__name__})") from None
    if formula.name in FORMULAS:
        raise ConfigError("--install", str(yaml_path), f"a formula not named like a built-in ({formula.name})")
    check_out_dir(into, "--into")
    target = into / "formula" / f"{formula.name}.yaml"
    if target.exists() and target.read_bytes() != yaml_path.read_bytes() and not force:
        raise ConfigError("--into", str(into), f"a folder without another {target.name} (or --force to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(yaml_path, target)
    return (f"installed {target}; use it with: python sweep.py --config-dir {into} formula={formula.name}")


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("paths", nargs="*", type=Path, help="sweep directories or results Parquet files")
    parser.add_argument("--calibrate", nargs="*", metavar="FORMULA",
                        help="refit these formulas, `time` for the time model's constants (default: every "
                             "built-in formula, and the time model when rows were timed)")
    parser.add_argument("--time-backend", default="cuda", metavar="BACKEND",
                        help="whose timed rows the Step time section and its calibration use: cuda (default), "
                             "cpu, or cuda,cpu")
    parser.add_argument("--out", type=Path, help="where calibrated YAMLs go (default: the report directory)")
    parser.add_argument("--install", type=Path, metavar="YAML", help="copy a calibrated YAML into --into DIR/formula/")
    parser.add_argument("--into", type=Path, metavar="DIR", help="a user config folder for --install")
    parser.add_argument("--force", action="store_true", help="--install may replace a different file")
    parser.add_argument("--report", type=Path, help="where tables and plots go (default <first path>/fit)")
    parser.add_argument("--heatmap", default="detailed", help="formula for the residual heatmap")
    args = parser.parse_args(argv)
    try:
        if args.install is not None:
            if args.into is None:
                raise ConfigError("--into", None, "a user config folder (DIR) for --install")
            print(install(args.install, args.into, args.force))
            return 0
        if not args.paths:
            raise ConfigError("PATH", None, "one or more sweep directories or results Parquet files")
        backends = parse_backends(args.time_backend)
        table = load_tables(args.paths)
        measured_rows = with_errors(table).height if table.height else 0
        timed = timed_jobs(table, backends)
        if not measured_rows and not timed.height:
            raise ConfigError("PATH", ", ".join(map(str, args.paths)),
                              "sweeps with measured rows (run them with measure=fake|cpu|cuda)")
        first = args.paths[0] if args.paths[0].is_dir() else args.paths[0].parent
        report = args.report or first / "fit"
        check_out_dir(report, "--report")
        skip = precheck_calibration(args, table, measured_rows, timed, backends)  # before anything is written
        if args.calibrate is not None and args.out is not None:
            check_out_dir(args.out)
        report.mkdir(parents=True, exist_ok=True)
        written = []
        if measured_rows:
            lines = errors_report(table, report, args.heatmap)
            written += ["fit_errors.parquet"]
        else:
            lines = ["# Fit errors (no measured peaks)", "",
                     "No row has a measured peak: no memory errors (measure=fake|cpu|cuda measure them).", ""]
        written += sorted(p.name for p in report.glob("*.png")) if measured_rows else []
        time_lines, timed = time_report(table, backends, report)
        lines += time_lines
        written += ["time_errors.parquet"] if timed.height else []
        if args.calibrate is not None:
            wanted = args.calibrate or [*FORMULAS, "time"]
            names = [n for n in wanted if n != "time"]
            sources = [str(p) for p in args.paths]
            if names and (measured_rows or args.calibrate):
                lines += calibrate_all(table, names, args.out or report, sources, skip)
            elif names:
                lines += ["## Calibration", "", "No measured peaks: no formula calibrated.", ""]
            if "time" in wanted and timed.height:
                time_cal, path = calibrate_time_report(timed, args.out or report, sources, backends)
                lines += time_cal
                written += [str(path)] if path is not None else []
        text = "\n".join(lines)
        write_text_atomic(text + "\n", report / "fit_summary.md")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc.strerror if isinstance(exc, OutputError) else exc}", file=sys.stderr)
        return 1
    print(text)
    print(f"\nwritten: {report}/fit_summary.md" + "".join(f", {p}" for p in written))
    return 0
