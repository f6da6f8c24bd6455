"""Do multi-process runs end cleanly? Runs `torchrun -m dsmoe train` (and `dsmoe bench ep`, which spawns its
ranks itself) again and again while busy processes load the machine, and counts the runs that did not exit 0
or whose output shows a rank aborted (`terminate called`, SIGABRT, a negative exit code).

    python benchmarks/exit_soak.py [--runs 30] [--procs 2 4] [--load 1] [--bench-ep-every 10]

A rank that aborts at exit after a good run makes a scheduler mark the job failed (and maybe rerun it over the
good checkpoint); this is the check that it does not. Each run trains the debug preset for a few steps into a
fresh folder. Prints one line per run and a summary; exits 1 if any run failed.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time

ABORT_SIGNS = ("terminate called", "SIGABRT", "Signal 6", "exitcode  : -", "core dumped")


def _spin(stop) -> None:
    while not stop.is_set():
        pass


def _command(procs: int, out: str, bench_ep: bool) -> list[str]:
    if bench_ep:
        return [sys.executable, "-m", "dsmoe", "bench", "ep", "--worlds", str(procs), "--repeats", "1",
                "--warmup", "0", "--tokens", "64"]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "-m", "dsmoe", "train",
            "--preset", "debug", "--steps", "4", "--quiet", "--out", out, "--set", "eval_every=0",
            "--set", "eval_batches=2"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=30, help="runs in all, alternating over --procs")
    p.add_argument("--procs", type=int, nargs="+", default=[2, 4], help="processes per run")
    p.add_argument("--load", type=int, default=1, help="busy processes beside the runs")
    p.add_argument("--bench-ep-every", type=int, default=10, help="every Nth run is `dsmoe bench ep` (0: never)")
    p.add_argument("--timeout", type=float, default=600, help="seconds one run may take")
    args = p.parse_args()
    stop = multiprocessing.Event()
    spinners = [multiprocessing.Process(target=_spin, args=(stop,), daemon=True) for _ in range(args.load)]
    for s in spinners:
        s.start()
    failed = 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(args.runs):
                procs = args.procs[i % len(args.procs)]
                bench_ep = args.bench_ep_every > 0 and (i + 1) % args.bench_ep_every == 0
                what = f"bench ep --worlds {procs}" if bench_ep else f"torchrun x{procs} train"
                t0 = time.perf_counter()
                try:
                    r = subprocess.run(_command(procs, os.path.join(tmp, f"run{i}"), bench_ep), env=env,
                                       capture_output=True, text=True, timeout=args.timeout)
                    rc, output = r.returncode, r.stdout + r.stderr
                except subprocess.TimeoutExpired as e:
                    rc, output = "timeout", str(e.stdout or "") + str(e.stderr or "")
                signs = [s for s in ABORT_SIGNS if s in output]
                ok = rc == 0 and not signs
                failed += not ok
                print(f"run {i + 1:>3}/{args.runs}  {what:<24} rc {rc!s:<7} {time.perf_counter() - t0:6.1f} s  "
                      + ("ok" if ok else f"FAILED {signs}"), flush=True)
                if not ok:
                    print("    " + "\n    ".join(output.strip().splitlines()[-15:]), flush=True)
    finally:
        stop.set()
        for s in spinners:
            s.join()
    print(f"{args.runs - failed}/{args.runs} runs ended cleanly with {args.load} busy process(es) beside them "
          f"({os.cpu_count()} cores)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
