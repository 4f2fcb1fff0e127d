"""Does pretraining help? The paper's Table 7 (pretraining tasks) and Table 8 (block vs i.i.d.
masking) at demo scale, several seeds, next to the from-scratch baseline and the bag-of-codes
floor measured in the same run, and beside the paper's own numbers.

    python bench/effect.py [--home DIR] [--grids grids/table7-demo.yaml,grids/table8-demo.yaml,grids/st-mae-demo.yaml]
                           [--seeds 0,1,2] [--scale 1] [--record]

It makes the demo corpus and its tokens in the data root when they are not there (the demo's
own data stages: `vimpac demo` shares them), runs each grid through the evaluate flow (recipe
rows are pretrained on demand and cached by run key, so a rerun only reports), and prints per
grid the report (mean +- std over seeds, n) and the paired differences against `scratch` with
95% confidence intervals. `--record` appends the tables, the machine and the wall time to
bench/RESULTS.md. The third default grid, grids/st-mae-demo.yaml, puts HVM-1's ST-MAE rows (pixels,
pretrained and from scratch) beside the token scratch row (issue 17). Measured on an idle 2-core CPU
with 3 seeds: Table 7 23-28 min, Table 8 6-7 min, ST-MAE 13-16 min alone (its token scratch cells are
Table 7's, cached), 45-51 minutes in all.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]

# The paper's numbers (small model, 5 x 128 px, Appendix F), top-1 %.
PAPER = {
    "table7": """Paper, Table 7 (small model; SSV2 / Diving48 temporally heavy, UCF101 / HMDB51 / K400 spatially heavy):

| MP | CL | SSV2 | Diving48 | UCF101 | HMDB51 | K400 |
|---|---|---:|---:|---:|---:|---:|
| - | - | 1.2 | 10.0 | 41.3 | 19.0 | 41.0 |
| - | yes | 32.5 | 26.3 | 57.1 | 30.7 | 47.0 |
| yes | - | 41.4 | 37.2 | 68.3 | 35.3 | 53.7 |
| yes | yes | 41.1 | 37.5 | 69.4 | 37.8 | 54.5 |
""",
    "table8": """Paper, Table 8 (mask-then-predict only, UCF101 top-1 %; mask accuracy in brackets):

| strategy | 128 px | 256 px |
|---|---:|---:|
| block | 68.3 (17.6) | 69.5 (11.2) |
| i.i.d. | 63.5 (24.3) | 61.4 (19.5) |
""",
}


def ensure_demo_data(home: Path, scale: float, flows) -> None:
    """The demo corpus, frames and tokens (cached stages cost a lookup)."""
    from flows.cli import DEMO_DATA_STAGES, demo_pipeline_file
    from stages.config import resolve_pipeline
    from stages.demo_data import generate_demo_corpus

    out_dir = home / "demo-corpus"
    datasets = generate_demo_corpus(out_dir, scale=scale, progress=lambda _m: None)
    cfg = resolve_pipeline(demo_pipeline_file(out_dir, datasets), [DEMO_DATA_STAGES])
    flows.pipeline.pipeline(cfg, str(home), False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", type=Path, default=REPO / "vimpac-data" / "effect")
    ap.add_argument("--grids", default="grids/table7-demo.yaml,grids/table8-demo.yaml,grids/st-mae-demo.yaml")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--scale", type=float, default=1.0, help="demo corpus scale")
    ap.add_argument("--record", action="store_true", help="append the results to bench/RESULTS.md")
    args = ap.parse_args()

    os.environ.setdefault("VIMPAC_HOME", str(args.home))
    from flows.cli import _flows, load_grid
    from stages.evaluate.report import build_report
    from warehouse.catalog import Catalog

    started = time.perf_counter()
    root, flows = _flows(str(args.home))
    ensure_demo_data(root.home, args.scale, flows)
    data_s = time.perf_counter() - started
    seeds = f"[{args.seeds}]"
    sections = []
    for path in [REPO / g for g in args.grids.split(",") if g]:
        grid = load_grid(path, [f"seeds={seeds}"])
        t0 = time.perf_counter()
        outcome = flows.evaluate.evaluate(grid, str(root.home), False)
        elapsed = time.perf_counter() - t0
        try:
            report = build_report(Catalog(root.home), metric="top1", grid=grid.name, baseline="scratch")
        except ValueError as e:
            # A grid without a scratch row (a grid file of your own) has no paired differences:
            # print its table alone. Cells another grid computed first are in this grid's report
            # (the grid_cells view).
            print(f"{grid.name}: no paired differences ({e})")
            report = build_report(Catalog(root.home), metric="top1", grid=grid.name)
        key = "table7" if "table7" in grid.name else "table8" if "table8" in grid.name else ""
        text = (f"### Grid `{grid.name}` ({path.relative_to(REPO)}), seeds {args.seeds}: {len(outcome['cells'])} cells, "
                f"{elapsed / 60:.1f} min\n\n" + report.to_markdown() + "\n" + PAPER.get(key, ""))
        print(text)
        sections.append(text)
    total = time.perf_counter() - started
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}"
    summary = f"Data stages {data_s / 60:.1f} min; total {total / 60:.1f} min on {machine}."
    print(summary)
    if args.record:
        block = f"\n## Pretraining effect at demo scale (`python bench/effect.py`), {date.today().isoformat()}\n\n{summary}\n\n" + "\n".join(sections)
        with open(REPO / "bench" / "RESULTS.md", "a") as f:
            f.write(block)
        print("appended to bench/RESULTS.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
