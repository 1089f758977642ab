"""Run the mutation catalogue (tests/mutations/catalogue.py): every mutant is one realistic bug, a one-line patch,
and the tests named with it must catch it.

For each of ``--jobs`` workers the runner copies the repository's files (tracked, plus untracked ones git does not
ignore) into a scratch folder as ``<scratch>/concept_express/`` and puts ``<scratch>`` first on PYTHONPATH, so that
``import concept_express`` there finds the scratch copy before an installed (editable) one: the check below asserts
it, once per worker, before any mutant runs. A worker then applies one mutant at a time to its copy (the original
snippet must occur exactly once in the file: otherwise the catalogue has rotted and the run fails), runs only the
named tests (``pytest -x``, no bytecode written, so a restored file is never shadowed by a mutant's .pyc) and
restores the file. A mutant is caught when pytest reports failed tests (exit status 1); it survives when they pass
(0); any other status (collection error, usage error, timeout) is an error. The run fails if any mutant survives,
any snippet is missing, or any error occurs.

Usage: python tests/mutations/run.py [--jobs 2] [--baseline] [--only ID ...] [--list]

Time (measured 2026-12-03): all 65 mutants and --baseline in 269 s wall (an earlier run of 60 under heavier load:
383 s) with --jobs 2 on the shared 2-core CI VM (Intel Xeon, Linux, CPU only, TRITON_INTERPRET=1, a long training job
on the same cores, load average 5-7), command
``TRITON_INTERPRET=1 .venv/bin/python tests/mutations/run.py --jobs 2 --baseline``: 4-7 s per kernel, capture and
localization mutant, 7-20 s per training mutant (mostly interpreter start and tiny-model building), 20-30 s for the
baseline. Each pytest runs with OMP_NUM_THREADS=1: on the loaded VM torch's default two threads made the training tests ~15x
slower (tests/test_train_reach.py: 212 s against 12 s).
"""

from __future__ import annotations

import argparse
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from catalogue import MUTANTS  # noqa: E402

TIMEOUT_S = 600


def repository_files(root: Path) -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        check=True,
        capture_output=True,
    ).stdout
    return [name for name in out.decode().split("\0") if name and (root / name).is_file()]


def make_copy(root: Path, files: list[str], scratch: Path) -> Path:
    package = scratch / "concept_express"
    for name in files:
        target = package / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, target)
    return package


def environment(scratch: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(scratch) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.setdefault("TRITON_INTERPRET", "1")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def check_import(package: Path, env: dict[str, str]) -> None:
    """The scratch copy, not the installed package, must be what ``import concept_express`` finds."""
    code = "import concept_express.uce_core.train as t; print(t.__file__)"
    where = subprocess.run(
        [sys.executable, "-c", code], cwd=package, env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    if not Path(where).resolve().is_relative_to(package.resolve()):
        raise SystemExit(f"the scratch copy is shadowed: concept_express imports from {where}, not {package}")


def check_catalogue(root: Path) -> list[str]:
    problems, seen = [], set()
    for m in MUTANTS:
        if m["id"] in seen:
            problems.append(f"{m['id']}: duplicate id")
        seen.add(m["id"])
        path = root / m["file"]
        text = path.read_text(encoding="utf-8") if path.is_file() else ""
        count = text.count(m["original"])
        if count != 1:
            problems.append(f"{m['id']}: the original snippet occurs {count} times in {m['file']} (catalogue rot)")
        if m["original"] == m["replacement"]:
            problems.append(f"{m['id']}: the replacement is the original")
        for test in m["tests"]:
            if not (root / test.split("::")[0]).is_file():
                problems.append(f"{m['id']}: no test file {test.split('::')[0]}")
    return problems


def run_mutant(package: Path, env: dict[str, str], mutant: dict) -> tuple[str, float, str]:
    path = package / mutant["file"]
    original = path.read_text(encoding="utf-8")
    path.write_text(original.replace(mutant["original"], mutant["replacement"], 1), encoding="utf-8")
    started = time.perf_counter()
    try:
        command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--rootdir", str(package)]
        proc = subprocess.run(
            command + list(mutant["tests"]),
            cwd=package,
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
        status = {0: "SURVIVED", 1: "caught"}.get(proc.returncode, f"ERROR (pytest exit {proc.returncode})")
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
    except subprocess.TimeoutExpired:
        status, tail = f"ERROR (over {TIMEOUT_S} s)", ""
    finally:
        path.write_text(original, encoding="utf-8")
    return status, time.perf_counter() - started, tail


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--only", nargs="*", help="mutant ids to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the catalogue and exit")
    parser.add_argument(
        "--baseline", action="store_true", help="first run every named test on the unmutated scratch copy (must pass)"
    )
    args = parser.parse_args(argv)
    if args.list:
        for m in MUTANTS:
            print(f"{m['id']:40s} {m['kind']:14s} {m['file']}")
        return 0
    problems = check_catalogue(ROOT)
    if problems:
        print("\n".join(problems))
        return 1
    chosen = [m for m in MUTANTS if not args.only or m["id"] in args.only]
    files = repository_files(ROOT)
    started = time.perf_counter()
    work: queue.Queue = queue.Queue()
    for m in chosen:
        work.put(m)
    results, lock = [], threading.Lock()
    with tempfile.TemporaryDirectory(prefix="mutants-") as tmp:
        if args.baseline:
            package = make_copy(ROOT, files, Path(tmp) / "baseline")
            env = environment(package.parent)
            check_import(package, env)
            tests = sorted({t for m in chosen for t in m["tests"]})
            status, seconds, tail = run_mutant(
                package, env, dict(file="README.md", original="", replacement="", tests=tests)
            )
            print(
                f"baseline: every named test on the unmutated copy: {'passed' if status == 'SURVIVED' else status} in {seconds:.0f} s"
            )
            if status != "SURVIVED":
                print(tail)
                return 1

        def worker(k: int) -> None:
            scratch = Path(tmp) / f"w{k}"
            package = make_copy(ROOT, files, scratch)
            env = environment(scratch)
            check_import(package, env)
            while True:
                try:
                    m = work.get_nowait()
                except queue.Empty:
                    return
                status, seconds, tail = run_mutant(package, env, m)
                with lock:
                    results.append((m, status, seconds, tail))
                    print(f"[{len(results)}/{len(chosen)}] {status:8s} {seconds:6.1f} s  {m['id']}", flush=True)
                    if status != "caught":
                        print("    " + tail.replace("\n", "\n    "), flush=True)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(max(1, min(args.jobs, len(chosen))))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    bad = [(m, s) for m, s, _, _ in results if s != "caught"]
    missing = len(chosen) - len(results)
    print(
        f"{len(results) - len(bad)} of {len(chosen)} mutants caught in {time.perf_counter() - started:.0f} s"
        + (f"; not caught: {', '.join(m['id'] for m, _ in bad)}" if bad else "")
        + (f"; {missing} not run (a worker failed)" if missing else "")
    )
    return 1 if bad or missing else 0


if __name__ == "__main__":
    sys.exit(main())
