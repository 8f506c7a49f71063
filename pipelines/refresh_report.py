"""The refresh report (`models/<version>/refresh.html`) and the gate's per-dataset comparison it shows.

Like evaluate's report (whose table helpers it uses): the data each dataset added, champion against
candidate on the held-out subjects with 95% bootstrap intervals (over subjects), and the decision with its
reason. Evaluate's own report.html beside it has the plots.
"""
from __future__ import annotations

import html

from pipelines.report import CI_COLUMNS, CSS, html_table, with_ci


def gate_rows(metric_rows: list[dict], candidate: str, champion: str | None, rule: dict) -> list[dict]:
    """Per held-out dataset: the gate metric of candidate and champion (None where a model has no score) with
    their intervals, and both models' cohort rows for the report."""
    metric = rule["metric"]
    cohort = {(r["model"], r["dataset"]): r for r in metric_rows if r["level"] == "cohort"}
    out = []
    for dataset in sorted({d for _, d in cohort}):
        row = {"dataset": dataset}
        for side, model in (("candidate", candidate), ("champion", champion)):
            found = cohort.get((model, dataset)) or {}
            row[side] = found.get(metric)
            row[f"{side}_lo"], row[f"{side}_hi"] = found.get(f"{metric}_lo"), found.get(f"{metric}_hi")
            row[f"{side}_row"] = {k: v for k, v in found.items() if isinstance(v, (int, float)) or v is None}
        out.append(row)
    return out


def refresh_html(row: dict, changes: dict, gate: list[dict], split: dict, rule: dict) -> str:
    """The page: the decision, the data added per dataset, champion vs candidate per held-out dataset."""
    decision = f"{row['decision']}: {row['reason']}"
    data = html_table(["dataset", "new recordings", "changed", "gone", "ok in all", "new subjects"],
                       [[name, str(c["new"]), str(c["changed"]), str(c["gone"]), str(c["ok"]),
                         ", ".join(c["new_subjects"]) or "-"] for name, c in sorted(changes.items())])
    header = ["held-out dataset", "model"] + [h for h, *_ in CI_COLUMNS] + ["subjects", "recordings"]
    lines = []
    for g in gate:
        for side, name in (("champion", row.get("champion_before") or "-"), ("candidate", row.get("candidate"))):
            r = g[f"{side}_row"]
            if side == "champion" and not r:
                continue
            lines.append([g["dataset"], f"{side} {name}"]
                         + [with_ci(r, v, lo, hi, d) if r else "-" for _, v, lo, hi, d in CI_COLUMNS]
                         + [str(r.get("n_subjects", "-")), str(r.get("n_recordings", "-"))])
    about = html_table(["refresh", ""], [[k, str(row.get(k) or "-")] for k in
                                          ("refresh_id", "started", "champion_before", "champion_after", "candidate",
                                           "data_fingerprint", "command")])
    return "\n".join([
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>pulsepipe refresh</title><style>{CSS}</style>"
        f"</head><body><h1>pulsepipe refresh</h1><h2>Decision</h2><p><b>{html.escape(decision)}</b></p>",
        f"<p>Gate: candidate {html.escape(rule['metric'])} + {rule['margin']:g} below the champion's on every "
        f"held-out dataset. Intervals in brackets: 95% bootstrap intervals resampling subjects.</p>",
        "<h2>Champion and candidate on the held-out subjects</h2>", html_table(header, lines),
        f"<p>{len(split['subjects'])} held-out subjects, frozen {html.escape(split['frozen'])} "
        f"({html.escape(split['method'])}, fraction {split['fraction']:g}, seed {split['seed']}); subjects that "
        "arrive later train. Plots: <a href='report.html'>the evaluation report</a>.</p>",
        "<h2>Data added</h2>", data, "<h2>Run</h2>", about, "</body></html>"])
