"""What checking a device's data costs the agent: peak RSS and time of the data contract check.

The agent checks its whole local dataset against the model (shape, dtype, labels within the
classes, finite values) when it starts and whenever the files change, inside its own
process, whose memory counts against the board's budget. Each variant runs in a fresh
process and reports its VmHWM (peak RSS) and the seconds the check took:

  baseline   imports the runtime and opens the dataset, checks nothing
  check      LocalDataset.check: reads the .npy files in 1 MB slices with plain reads
  mmap-scan  the obvious alternative: numpy.load(mmap_mode="r") and one pass over it
             (every page read stays resident until unmapped)

    .venv/bin/python tools/bench_data_check.py                 # 60,000 Fashion-MNIST images (179 MB)
    .venv/bin/python tools/bench_data_check.py --rows 10000
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

VARIANT = r'''
import json, sys, time
import numpy as np
from pathlib import Path
from edge_runtime.memory import peak_rss_bytes
from edge_runtime.train.datasets import LocalDataset
d = LocalDataset(Path(sys.argv[1]))
variant = sys.argv[2]
len(d)
t = time.monotonic()
if variant == "check":
    d.check((1, 28, 28), 10)
elif variant == "mmap-scan":
    x, y = np.load(d.inputs_path, mmap_mode="r"), np.load(d.labels_path, mmap_mode="r")
    ok = all(bool(np.isfinite(x[i:i + 4096]).all()) for i in range(0, len(x), 4096))
    ok = ok and int(y.min()) >= 0 and int(y.max()) < 10
seconds = time.monotonic() - t
print(json.dumps({"variant": variant, "peak_bytes": peak_rss_bytes(), "seconds": seconds}))
'''


def _run(data: Path, variant: str) -> dict:
    out = subprocess.run([sys.executable, "-c", VARIANT, str(data), variant], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=60000, help="Fashion-MNIST training images in the dataset")
    p.add_argument("--repeat", type=int, default=3, help="runs per variant (the median is reported)")
    args = p.parse_args(argv)
    from edge_runtime.train.datasets import LocalDataset, load_fashion_mnist
    with tempfile.TemporaryDirectory() as tmp:
        x, y = load_fashion_mnist("train")
        data = LocalDataset.write(Path(tmp) / "data", x[:args.rows], y[:args.rows])
        size_mb = (data.inputs_path.stat().st_size + data.labels_path.stat().st_size) / 2**20
        del x, y
        print(f"dataset: {args.rows} rows, {size_mb:.0f} MB on disk; median of {args.repeat} fresh processes each")
        rows = {}
        for variant in ("baseline", "check", "mmap-scan"):
            runs = sorted((_run(data.root, variant) for _ in range(args.repeat)), key=lambda r: r["peak_bytes"])
            rows[variant] = runs[len(runs) // 2]
        base = rows["baseline"]["peak_bytes"]
        print(f"{'variant':<10} {'peak MB':>8} {'over baseline':>14} {'seconds':>8}")
        for variant, r in rows.items():
            print(f"{variant:<10} {r['peak_bytes'] / 2**20:8.1f} {(r['peak_bytes'] - base) / 2**20:11.1f} MB "
                  f"{r['seconds']:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
