"""The plan as Markdown: one section per workload x precision, a table per question, the runner-up
beside each answer, the excluded combinations, and the comparison with measurement."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import polars as pl

from memsweep.formulas import Formula
from memsweep.plan.cases import precision_label
from memsweep.presets import workload_spec
from memsweep.units import GIB

if TYPE_CHECKING:
    from memsweep.plan import Plan

NONE, INVALID = "—", "n/a"


def fmt_int(v: int) -> str:
    return f"{v:,}"


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def variant_label(row: Mapping[str, Any]) -> str:
    """'' without techniques, else e.g. 'full' / 'sel' / 'full, offload optimizer'."""
    parts = [] if row["recompute"] in (None, "none") else ["sel" if row["recompute"] == "selective" else "full"]
    parts += [] if row["offload"] in (None, "none") else [f"offload {row['offload']}"]
    return ", ".join(parts)


def answer_cell(row: Mapping[str, Any], answer: str, max_seq: int) -> str:
    if row["status"] == "invalid":
        return INVALID
    if row["status"] == "none_fits":
        return NONE
    notes = [variant_label(row)] if variant_label(row) else []
    text = fmt_int(row[answer])
    if row["capped"]:  # at the bound: a search cap (more may fit) or all the model's context takes
        if answer == "seq" and row["limit"] != max_seq:
            notes.insert(0, "max")
        else:
            text = f"≥{text}"
    return f"{text} ({', '.join(notes)})" if notes else text


def layout_parts(row: Mapping[str, Any]) -> list[str]:
    """['tp2 pp2 zero3 dp2 ep2', 'micro 4 × 8']: the layout's parallel ranks, and the split of a
    global batch; nothing for one GPU at one micro-batch."""
    ranks = [f"{k}{row[k]}" for k in ("tp", "pp") if row[k] and row[k] > 1]
    if row["dp"] and row["dp"] > 1:
        ranks.append(f"zero{row['zero']} dp{row['dp']}" if row["zero"] else f"dp{row['dp']}")
    if row["ep"] and row["ep"] > 1:
        ranks.append(f"ep{row['ep']}")
    parts = [" ".join(ranks)] if ranks else []
    if row["grad_accum"] and row["grad_accum"] > 1:
        parts.append(f"micro {row['batch']} × {row['grad_accum']}")
    return parts


def layout_text(row: Mapping[str, Any]) -> str:
    """'4 (zero3 dp4, full)', '2 (tp2)', '8 (tp2 pp2 zero1 dp2 ep2, micro 2 × 16)'."""
    parts = layout_parts(row)
    how = variant_label(row)
    parts += [how] if how else []
    return f"{row['gpus']} ({', '.join(parts)})" if parts else str(row["gpus"])


def speed_text(row: Mapping[str, Any]) -> str:
    """'4.2k tok/s/GPU, 5.6k GPU-h' (formulas.timing; '' where the hardware has no speeds)."""
    tps = row.get("est_tokens_per_s")
    if tps is None or not tps == tps:  # null or NaN
        return ""
    text = f"{_si(tps)} tok/s/GPU"
    hours = row.get("gpu_hours")
    return text + (f", {_si(hours)} GPU-h" if hours is not None and hours == hours else "")


def _si(v: float) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if v >= scale:
            return f"{v / scale:.3g}{unit}"
    return f"{v:.3g}"


def gpus_cell(row: Mapping[str, Any] | None) -> str:
    if row is None or row["status"] == "invalid":
        return INVALID
    if row["status"] != "ok":
        return NONE
    speed = speed_text(row)
    return f"{layout_text(row)}, +{row['headroom_gib']:.1f} GiB" + (f", {speed}" if speed else "")


def overhead_note(formula: Formula) -> str:
    overhead = getattr(formula.constants, "overhead_bytes", None)
    if overhead is None:
        return f"`{formula.name}` has no overhead term"
    if overhead == 0:
        return f"`{formula.name}` has overhead_bytes = 0 (uncalibrated)"
    return (f"`{formula.name}`'s calibrated overhead_bytes = {overhead / GIB:.2f} GiB is part of "
            "every total (not added again)")


def _by_key(df: pl.DataFrame, keys: Sequence[str]) -> dict[tuple, dict[int, dict[str, Any]]]:
    """Rows grouped by `keys`, each group as {rank: row}."""
    out: dict[tuple, dict[int, dict[str, Any]]] = {}
    for r in df.iter_rows(named=True):
        out.setdefault(tuple(r[k] for k in keys), {})[r["rank"]] = r
    return out


def render_markdown(plan: Plan) -> str:
    s, t = plan.spec, plan.table
    hw_names = [h.name for h in plan.hardware]
    hw_head = [f"{h.name} ({c / GIB:.1f} GiB)" for h, c in zip(plan.hardware, plan.capacity_bytes)]
    seq_text = " / ".join(fmt_int(x) for x in s.seqs)
    lay = s.layouts
    context = ("each model's context (max_positions)" if s.rope_scaling is None
               else f"{s.rope_scaling:g} × each model's context (rope_scaling; learned positions do not stretch)")
    split = (f"a global batch of {s.global_batch} sequences split into dp × micro-batch × accumulation"
             if s.global_batch else f"batch {s.gpus_batch} per GPU")
    lines = [
        "# Capacity plan", "",
        f"Formula `{s.formula}`; {overhead_note(plan.formula)}. Optimizer {s.optimizer}, attention "
        f"{s.attention}; the batch and sequence tables use the layout `{s.parallel}`. Memory is per GPU; "
        f"sequences stop at {context}.", "",
        f"Searched: recompute {{{', '.join(s.recompute)}}} × offload {{{', '.join(s.offload)}}} for training; "
        f"fewest GPUs over tp {{{', '.join(map(str, lay.tp))}}} × pp {{{', '.join(map(str, lay.pp))}}} × "
        f"dp {{{', '.join(map(str, lay.dp))}}} with ZeRO {{{', '.join(map(str, lay.zero))}}} (ep "
        f"{{{', '.join(map(str, lay.ep))}}} for MoE)"
        f"{', tensor-parallel training with sequence parallel' if s.sequence_parallel else ''}, at {split}. "
        "Order: fewest GPUs, then no offload, "
        "then least recompute, then the largest micro-batch, then the fewest pipeline stages, then the most headroom; the largest batch "
        "and longest sequence are the largest any variant reaches (ties: the cheapest). `· or` gives the "
        f"runner-up. Doubling dp must save {s.min_saving:.0%} of the capacity per GPU.", "",
        f"Capacity = (memory − reserved) × (1 − margin), margin = {s.margin:g} (memsweep.capacity, the "
        "sweep's `fits` too): the reserve is what the CUDA context, driver and workspaces keep; the margin "
        "leaves room for allocator fragmentation and cache, and for what the formula misses.", "",
    ]
    lines += md_table(["hardware", "memory MiB", "reserved MiB", "usable GiB", "capacity GiB"],
                      [[h.name, fmt_int(h.memory_mib), fmt_int(h.reserved_mib), f"{h.usable_bytes / GIB:.2f}",
                        f"{c / GIB:.2f}"] for h, c in zip(plan.hardware, plan.capacity_bytes)])
    lines += ["", f"Cells: `{NONE}` = nothing searched fits; `{INVALID}` = not a valid configuration (see "
              "Excluded); `(full)`, `(sel)` = the recompute the answer needs; `≥N` = the search limit "
              "(max_batch, max_seq) was reached; `N (max)` = the model's context allows no longer sequence.", ""]
    for label, workload, dtype, precision in plan.sections:
        sec = t.filter((pl.col("workload") == workload) & (pl.col("dtype") == dtype)
                       & (pl.col("precision") == precision))
        if (sec["status"] == "invalid").all():  # listed under Excluded, no table of n/a
            continue
        lines += [f"## {label}", ""]
        serve = workload_spec(workload).kind == "serve"
        if serve:  # a serving engine's batch is its concurrent sequences, in its own budget
            lines += [f"Concurrent sequences at context {seq_text} (the paged KV cache in `gpu_util` of the "
                      "memory, less the reserve, weights, the profiled prefill peak and graphs):", ""]
        else:
            lines += [f"Largest batch per GPU at seq {seq_text}:", ""]
        lines += _answer_table(sec, "max_batch", "batch", "seq", plan.models, hw_names, hw_head, s.max_seq)
        lines += [f"Longest {'context of one sequence' if serve else 'sequence'} at batch "
                  f"{' / '.join(map(str, s.batches))}:", ""]
        lines += _answer_table(sec, "max_seq", "seq", "batch", plan.models, hw_names, hw_head, s.max_seq)
        if s.objective != "fastest":
            goal = "Fewest GPUs"
        elif s.max_gpus:
            goal = f"Fastest layout of at most {s.max_gpus} GPUs (max_gpus)"
        else:  # search.py's budget: the fewest whole nodes that fit
            goal = ("Fastest layout on the fewest whole nodes that fit (each hardware's gpus_per_node; "
                    "max_gpus=N allows more)")
        budget = f", and the GPU-hours for {s.tokens:.3g} tokens" if s.tokens else ""
        lines += [f"{goal} at {split}: the headroom left per GPU, the estimated tokens/s per GPU{budget}:", ""]
        grouped = _by_key(sec.filter(pl.col("question") == "min_gpus"), ("model", "seq", "hardware"))
        rows = []
        for m in plan.models:
            for q in s.seqs:
                cells = []
                for h in hw_names:
                    ranks = grouped.get((m, q, h), {})
                    cell = gpus_cell(ranks.get(1))
                    if 2 in ranks and cell not in (NONE, INVALID):
                        cell += f" · or {gpus_cell(ranks[2])}"
                    cells.append(cell)
                rows.append([m, fmt_int(q), *cells])
        lines += md_table(["model", "seq", *hw_head], rows) + [""]
    lines += _excluded(plan)
    if plan.comparison is not None:
        lines += _measured_section(plan)
    return "\n".join(lines).rstrip() + "\n"


def _answer_table(sec: pl.DataFrame, question: str, answer: str, across: str, models: Sequence[str],
                  hw_names: Sequence[str], hw_head: Sequence[str], max_seq: int) -> list[str]:
    """Rows: models; columns: hardware; a cell lists the answers across `across`, e.g. '8 / 2 (full) / —',
    each followed by its runner-up."""
    grouped = _by_key(sec.filter(pl.col("question") == question), ("model", "hardware", across))
    rows = []
    for m in models:
        cells = []
        for h in hw_names:
            keys = sorted(k for k in grouped if k[0] == m and k[1] == h)
            texts = []
            for k in keys:
                ranks = grouped[k]
                text = answer_cell(ranks[1], answer, max_seq)
                if 2 in ranks:
                    text += f" · or {answer_cell(ranks[2], answer, max_seq)}"
                texts.append(text)
            cells.append(" / ".join(texts))
        rows.append([m, *cells])
    return md_table(["model", *hw_head], rows) + [""]


def _excluded(plan: Plan) -> list[str]:
    bad = (plan.table.filter((pl.col("status") == "invalid") & (pl.col("rank") == 1))
           .group_by(["model", "workload", "dtype", "precision", "reason"], maintain_order=True)
           .agg(pl.col("seq").drop_nulls().unique().sort()))
    if bad.height == 0:
        return []
    lines = ["## Excluded (not valid configurations)", ""]
    for r in bad.iter_rows(named=True):
        where = f" at seq {', '.join(fmt_int(x) for x in r['seq'])}" if r["reason"].startswith("seq >") else ""
        label = precision_label(r["workload"], r["dtype"], r["precision"])
        lines.append(f"- {r['model']} · {r['workload']} · {label}{where}: {r['reason']}")
    return [*lines, ""]


def _measured_section(plan: Plan) -> list[str]:
    c = plan.comparison
    assert c is not None
    rows = c.rows
    lines = ["## Against measurement", "",
             f"{rows.height} measured cuda configurations ({int(rows['measured_fits'].sum())} ok, "
             f"{int((~rows['measured_fits']).sum())} oom) from `{plan.spec.results or 'results'}`; predicted "
             f"with `{plan.formula.name}` and the plan's capacity (margin {plan.spec.margin:g}).", ""]
    lines += md_table(["predicted \\ measured", "ok", "oom"],
                      [[r["predicted"], str(r["measured_ok"]), str(r["measured_oom"])]
                       for r in c.confusion.iter_rows(named=True)]) + [""]
    if c.boundary.height:
        lines += ["Largest batch: measured bracket against the plan's boundary:", ""]
        lines += md_table(["model", "workload", "seq", "dtype", "hardware", "largest ok", "smallest oom",
                           "predicted largest", "predicted boundary"],
                          [[r["model"], r["workload"], fmt_int(r["seq"]), r["dtype"], r["hardware"],
                            "—" if r["measured_max_ok"] is None else str(r["measured_max_ok"]),
                            "—" if r["measured_min_oom"] is None else str(r["measured_min_oom"]),
                            str(r["predicted_max_batch"]), r["predicted_boundary"]]
                           for r in c.boundary.iter_rows(named=True)]) + [""]
    disagree = rows.filter(~pl.col("agree"))
    if rows.height == 0:
        lines += ["No measured cuda rows with status ok or oom to compare.", ""]
    elif disagree.height:
        lines += ["Rows that disagree:", ""]
        lines += md_table(["model", "workload", "seq", "batch", "dtype", "hardware", "measured peak GiB",
                           "predicted GiB", "capacity GiB", "verdict"],
                          [[r["model"], r["workload"], fmt_int(r["seq"]), str(r["batch"]), r["dtype"], r["hardware"],
                            "—" if r["measured_peak_bytes"] is None else f"{r['measured_peak_bytes'] / GIB:.2f}",
                            f"{r['predicted_total_bytes'] / GIB:.2f}", f"{r['capacity_bytes'] / GIB:.2f}",
                            r["verdict"]] for r in disagree.iter_rows(named=True)]) + [""]
    else:
        lines += ["Every measured row agrees with the prediction.", ""]
    if c.skipped.height:
        lines += [f"Skipped {c.skipped.height} measured rows the planner could not rebuild:", ""]
        lines += [f"- {r['model']} seq={r['seq']} batch={r['batch']} {r['hardware']}: {r['reason']}"
                  for r in c.skipped.iter_rows(named=True)] + [""]
    return lines
