#!/usr/bin/env python3
"""Merge the per-call JSON files of one day's GPU runs into ``<date>-<gpu>.json`` (each row keeps its source).

Usage: python bench/merge_results.py bench/results/2026-11-22-h100.json bench/results/2026-11-22-h100-*.json
"""
import json
import sys
from pathlib import Path


def main(out: str, *inputs: str) -> None:
    docs = [(Path(p), json.loads(Path(p).read_text())) for p in inputs if Path(p).resolve() != Path(out).resolve()]
    rows = []
    for path, doc in docs:
        for row in doc["rows"]:
            rows.append({**row, "source": path.name, "commit": doc.get("commit")})
    first = docs[0][1]
    merged = dict(gpu=first.get("gpu"), commit=sorted({d.get("commit") for _, d in docs if d.get("commit")}),
                  date=first.get("date"), sources={p.name: d.get("info") for p, d in docs}, rows=rows)
    Path(out).write_text(json.dumps(merged, indent=1))
    print(f"{out}: {len(rows)} rows from {len(docs)} files")


if __name__ == "__main__":
    main(*sys.argv[1:])
