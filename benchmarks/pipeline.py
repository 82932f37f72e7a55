"""Pipeline training (``layerwise train --stages N``) against one process: speed, bubbles, memory.

Every measurement is a ``python -m layerwise train`` subprocess on a recipe written to a
temporary folder: nHSIC blocks of 512 (linear + relu, sigma 5, beta 100) and a detached linear
head, on MNIST at batch 256.

* **Speed.** One network, trained in four configurations: (a) one process with one thread,
  (b) one process with two threads, (c) 2 stages and (d) 4 stages of one thread each. The
  configurations are interleaved (a, b, c, d, a, b, c, d, ...) so that drift on the machine hits
  them all alike, and each one's median samples/s over ``--repeats`` is compared with (a)'s. An
  epoch's seconds are rank 0's ``train_seconds`` for one process and the slowest stage's
  ``stage_seconds`` for a pipeline (the last stage finishes last). The measured epoch is the
  last one (``--epochs``, default 2): in the first, each stage starts its clock when it is ready,
  and a stage that got ready early counts its wait for the earlier stages' start-up as pipeline
  time. Every pipeline's ``model.safetensors`` is compared with (a)'s, tensor by tensor.
* **Bubbles and communication.** For (c) and (d), each stage's wall and busy seconds (from
  ``metrics.jsonl``) and its idle share, ``1 - busy / wall``: the time it waited on its neighbours.
* **Memory.** The peak resident set (``VmHWM``) of every process of the launched tree (the CLI
  launcher, torchrun, and the workers, recognised by ``LOCAL_RANK`` in their environment),
  polled every 50 ms, for depths 8, 16 and 32 in one process and in 2 and 4 stages; and that of
  an idle process that only imported torch and layerwise, the share every process pays anyway.
  (``--quick`` reads the peaks from the first repeat's speed runs (a), (c) and (d) instead, to
  save process start-ups; only those of them that ``--configs`` names, if it is given.)

Writes ``docs/results/pipeline.json`` (every raw number) and ``docs/results/pipeline.md``.

    python benchmarks/pipeline.py                  # 8 blocks of 512, 10240 samples, 3 repeats
    python benchmarks/pipeline.py --quick --repeats 1   # 4 blocks of 128, to check the code
    python benchmarks/pipeline.py --quick --repeats 1 --configs a c   # only (a) and (c)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from layerwise.atomic import write_text_atomic
from layerwise.runs import METRICS_FILE, cpu_name, read_metrics

REPO = Path(__file__).resolve().parent.parent
NHSIC = {"name": "nhsic", "sigma": 5, "beta": 100}
CONFIGS = {
    "a": {"label": "one process, 1 thread", "stages": 1, "threads": 1},
    "b": {"label": "one process, 2 threads", "stages": 1, "threads": 2},
    "c": {"label": "2 stages, 1 thread each", "stages": 2, "threads": 1},
    "d": {"label": "4 stages, 1 thread each", "stages": 4, "threads": 1},
    # Not a way to train one network: two unrelated one-process runs side by side, the most that two
    # processes of this work can get out of this machine (its cores share caches and memory bandwidth).
    "e": {"label": "two separate one-process runs at once (the machine's ceiling for 2 processes)", "stages": 1,
          "threads": 1, "copies": 2},
}
POLL_SECONDS = 0.05
# Large blocks go straight to mmap and back to the OS when freed, so that the peak resident set
# is the memory really in use at once rather than glibc's heap high-water mark (as benchmarks/memory.py).
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


# ----------------------------------------------------------------------------- recipes and runs


def stack_recipe(depth: int, width: int, batch: int, train_limit: int, epochs: int) -> dict:
    """``depth`` nHSIC blocks of ``width`` and a detached linear head, as recipes/mnist_hsic.yaml."""
    blocks = [{"name": f"hsic{i + 1}", "layer": "linear", "out": width, "act": "relu", "objective": dict(NHSIC)}
              for i in range(depth)]
    return {"name": f"pipeline-{depth}x{width}", "seed": 0,
            "data": {"dataset": "mnist", "batch_size": batch, "train_limit": train_limit},
            "model": {"subnetworks": [{"name": "hsic", "blocks": blocks},
                                      {"name": "format", "blocks": [{"name": "head", "layer": "linear", "out": 10,
                                                                     "detach": True}]}]},
            "optim": {"local": {"name": "adam", "lr": 1.0e-3}, "global": {"name": "adam", "lr": 1.0e-3}},
            "train": {"epochs": epochs, "device": "cpu"}}


def write_recipe(folder: Path, recipe: dict) -> Path:
    path = folder / f"{recipe['name']}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def train_command(recipe: Path, stages: int, runs_dir: Path) -> list[str]:
    return [sys.executable, "-m", "layerwise", "train", str(recipe), *(["--stages", str(stages)] if stages > 1 else []),
            "--runs-dir", str(runs_dir), "--no-progress"]


def environment(threads: int, extra: dict | None = None) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), **(extra or {})}


def run_folder(runs_dir: Path) -> Path:
    """The one run folder a training wrote under ``runs_dir`` (``latest`` is a link to it)."""
    folders = [p for p in runs_dir.iterdir() if p.is_dir() and not p.is_symlink()]
    if len(folders) != 1:
        raise RuntimeError(f"{runs_dir}: expected one run folder, found {[p.name for p in folders]}")
    return folders[0]


def check_finished(code: int, command: list[str], log: Path) -> None:
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"exit code {code}: {' '.join(command)}\n{tail}")


# ----------------------------------------------------------------------------- speed


def timed_run(recipe: Path, stages: int, threads: int, work: Path, samples: int, watch: bool = False) -> dict:
    """Train once; the measured (last) epoch's seconds, samples/s and per-stage times (and with
    ``watch``, each process's peak memory under ``"memory"``)."""
    run, command_seconds, memory = train_once(recipe, stages, threads, work, watch)
    records = read_metrics(run / METRICS_FILE)
    last = records[-1]
    seconds = max(last["stage_seconds"]) if "stage_seconds" in last else last["train_seconds"]
    row = {"samples_per_s": round(samples / seconds, 1), "epoch_seconds": seconds,
           "train_seconds": last["train_seconds"], "epoch": last["epoch"], "command_seconds": command_seconds,
           "first_epoch": {key: records[0].get(key) for key in ("train_seconds", "stage_seconds", "stage_busy_seconds")
                           if key in records[0]},
           "weights": str(run / "model.safetensors")}
    if "stage_seconds" in last:
        row.update(stages=last["stages"], stage_seconds=last["stage_seconds"],
                   stage_busy_seconds=last["stage_busy_seconds"])
    if memory is not None:
        row["memory"] = memory
    return row


def timed_copies(recipe: Path, copies: int, work: Path, samples: int) -> dict:
    """Train ``copies`` one-process, one-thread runs of ``recipe`` at the same time; their samples/s
    together, over the slowest one's measured epoch."""
    folders = [Path(tempfile.mkdtemp(prefix="runs-", dir=work)) for _ in range(copies)]
    commands = [train_command(recipe, 1, folder) for folder in folders]
    processes = [subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                  env=environment(1), cwd=REPO) for command in commands]
    for process, command in zip(processes, commands, strict=True):
        if process.wait() != 0:
            raise RuntimeError(f"exit code {process.returncode}: {' '.join(command)}")
    seconds = max(read_metrics(run_folder(folder) / METRICS_FILE)[-1]["train_seconds"] for folder in folders)
    return {"samples_per_s": round(copies * samples / seconds, 1), "epoch_seconds": seconds,
            "weights": str(run_folder(folders[0]) / "model.safetensors")}


def same_weights(path: Path, reference: Path) -> bool:
    """Whether every tensor of two checkpoints is equal, bit for bit (and they hold the same names)."""
    from safetensors.torch import load_file

    a, b = load_file(str(path)), load_file(str(reference))
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def measure_speed(args, work: Path) -> dict:
    recipe = write_recipe(work, stack_recipe(args.depth, args.width, args.batch, args.train_limit, args.epochs))
    # --quick checks the code: the ceiling (two separate runs) says nothing about it, so it is left out.
    configs = {name: c for name, c in CONFIGS.items()
               if (name in args.configs if args.configs else not (args.quick and c.get("copies")))}
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    for repeat in range(args.repeats):
        for name, config in configs.items():
            watch = args.quick and repeat == 0 and config["threads"] == 1 and not args.skip_memory
            if config.get("copies"):
                row = timed_copies(recipe, config["copies"], work, args.train_limit)
            else:
                row = timed_run(recipe, config["stages"], config["threads"], work, args.train_limit, watch)
            runs[name].append(row)
            print(f"repeat {repeat + 1}/{args.repeats} ({name}) {config['label']}: "
                  f"{row['samples_per_s']:.1f} samples/s", file=sys.stderr, flush=True)
    reference = Path(runs["a"][0]["weights"])
    for rows in runs.values():
        for row in rows:
            row["weights_identical"] = same_weights(Path(row.pop("weights")), reference)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    base = statistics.median(r["samples_per_s"] for r in runs["a"])
    configurations = {}
    for name, config in configs.items():
        median = statistics.median(r["samples_per_s"] for r in runs[name])
        configurations[name] = {**config, "processes": config.get("copies", config["stages"]),
                                "oversubscribed": config["stages"] * config["threads"] > cores,
                                "median_samples_per_s": round(median, 1), "vs_a": round(median / base, 3),
                                "weights_identical": all(r["weights_identical"] for r in runs[name]),
                                "runs": runs[name]}
    bubbles = {}
    for name, config in configs.items():
        if config["stages"] > 1:
            rows = runs[name]
            bubbles[name] = [{"stage": s, "blocks": rows[0]["stages"][s],
                              "wall_s": statistics.median(r["stage_seconds"][s] for r in rows),
                              "busy_s": statistics.median(r["stage_busy_seconds"][s] for r in rows),
                              "idle_share": round(statistics.median(
                                  1 - r["stage_busy_seconds"][s] / r["stage_seconds"][s] for r in rows), 3)}
                             for s in range(config["stages"])]
    return {"network": {"depth": args.depth, "width": args.width, "batch": args.batch,
                        "train_samples": args.train_limit, "epochs": args.epochs, "measured_epoch": args.epochs},
            "cores": cores, "configurations": configurations, "bubbles": bubbles}


# ----------------------------------------------------------------------------- memory


def process_tree(root: int) -> list[int]:
    """``root`` and every process descended from it, read from ``/proc/*/stat``."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:  # it ended meanwhile
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the name in brackets may hold spaces
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def peak_kib(pid: int) -> int | None:
    """The process's peak resident set so far (``VmHWM``, KiB); None once it has ended."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def role(pid: int, root: int, stages: int) -> tuple[str, int | None] | None:
    """What a process of the tree is: ``("worker", rank)``, ``("launcher", None)``, ``("torchrun", None)``
    or None (anything else, e.g. ``git`` or a process between fork and exec)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        environ = dict(item.split(b"=", 1) for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                       if b"=" in item)
    except OSError:
        return None
    argv = [a.decode(errors="replace") for a in argv]
    module = argv[argv.index("-m") + 1:argv.index("-m") + 3] if "-m" in argv else []  # torchrun adds -u
    if module[:1] == ["layerwise.distributed"]:
        return "torchrun", None
    if module != ["layerwise", "train"]:
        return None
    if b"LOCAL_RANK" in environ:
        return "worker", int(environ.get(b"RANK", b"0"))
    if pid == root:
        return ("worker", 0) if stages == 1 else ("launcher", None)
    return None


def train_once(recipe: Path, stages: int, threads: int, work: Path, watch: bool,
               extra_env: dict | None = None) -> tuple[Path, float, dict | None]:
    """Train ``recipe`` once in ``stages`` processes of ``threads`` threads; return the run folder,
    the command's wall seconds and, with ``watch``, the peak resident set of each process (MiB):
    ``stage_peak_mib`` by rank, and ``launcher_peak_mib`` and ``torchrun_peak_mib`` for a pipeline."""
    runs_dir = Path(tempfile.mkdtemp(prefix="runs-", dir=work))
    command = train_command(recipe, stages, runs_dir)
    log = runs_dir.with_suffix(".log")
    peaks: dict[int, tuple[str, int | None, int]] = {}
    started = time.perf_counter()
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                   env=environment(threads, extra_env), cwd=REPO)
        while watch and process.poll() is None:
            for pid in process_tree(process.pid):
                what = role(pid, process.pid, stages)
                kib = peak_kib(pid)
                if what is not None and kib is not None:
                    peaks[pid] = (*what, max(kib, peaks.get(pid, (None, None, 0))[2]))
            time.sleep(POLL_SECONDS)
        process.wait()
    seconds = round(time.perf_counter() - started, 2)
    check_finished(process.returncode, command, log)
    if not watch:
        return run_folder(runs_dir), seconds, None
    workers = {rank: kib for kind, rank, kib in peaks.values() if kind == "worker"}
    if sorted(workers) != list(range(stages)):
        raise RuntimeError(f"{' '.join(command)}: saw the workers of ranks {sorted(workers)}, "
                           f"expected 0 to {stages - 1}")
    mib = lambda kib: round(kib / 1024, 1)  # noqa: E731
    memory = {"stage_peak_mib": [mib(workers[rank]) for rank in range(stages)],
              **{f"{kind}_peak_mib": mib(kib) for kind, _, kib in peaks.values() if kind != "worker"}}
    return run_folder(runs_dir), seconds, memory


def idle_baseline_mib(extra_env: dict) -> float:
    """The peak resident set of a process that only imported torch and layerwise's training code."""
    code = ("import torch, layerwise.train_run, pathlib; print(next(l.split()[1] for l in "
            "pathlib.Path('/proc/self/status').read_text().splitlines() if l.startswith('VmHWM:')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=environment(1, extra_env), cwd=REPO)
    return round(int(out.stdout.split()[-1]) / 1024, 1)


def measure_memory(args, work: Path, speed: dict | None) -> dict:
    """Each process's peak for every depth in 1, 2 and 4 stages; with ``--quick``, read from the
    first repeat's one-thread speed runs instead ((a), (c) and (d), or those --configs names), to save start-ups."""
    if args.quick and speed is not None:
        watched = [name for name, c in speed["configurations"].items() if "memory" in c["runs"][0]]
        rows = [{"depth": args.depth, "stages": speed["configurations"][name]["stages"],
                 **speed["configurations"][name]["runs"][0]["memory"]} for name in watched]
        return {"width": args.width, "batch": args.batch, "train_samples": args.train_limit, "epochs": args.epochs,
                "threads_per_process": 1, "env": {}, "poll_seconds": POLL_SECONDS, "from_speed_runs": True,
                "speed_runs": watched, "idle_process_mib": idle_baseline_mib({}), "rows": rows}
    rows = []
    for depth in args.memory_depths:
        recipe = write_recipe(work, stack_recipe(depth, args.width, args.batch, args.memory_train_limit, 1))
        for stages in (1, 2, 4):
            _, seconds, memory = train_once(recipe, stages, 1, work, watch=True, extra_env=MEMORY_ENV)
            rows.append({"depth": depth, "stages": stages, "command_seconds": seconds, **memory})
            print(f"memory: depth {depth}, {stages} stage(s): {memory['stage_peak_mib']} MiB", file=sys.stderr,
                  flush=True)
    return {"width": args.width, "batch": args.batch, "train_samples": args.memory_train_limit, "epochs": 1,
            "threads_per_process": 1, "env": MEMORY_ENV, "poll_seconds": POLL_SECONDS,
            "idle_process_mib": idle_baseline_mib(MEMORY_ENV), "rows": rows}


# ----------------------------------------------------------------------------- report


def yes_no(flag: bool) -> str:
    return "yes" if flag else "**no**"


def markdown(result: dict) -> list[str]:
    machine = result["machine"]
    lines = [f"Command: `{result['command']}`", "",
             f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}; each configuration "
             f"run {result['repeats']} time(s), interleaved, median shown.", ""]
    speed = result.get("speed")
    if speed:
        net = speed["network"]
        lines += ["Speed: one network trained in each configuration, every run a `layerwise train` process tree; "
                  f"{net['depth']} nHSIC blocks of {net['width']} and a detached linear head, batch {net['batch']}, "
                  f"{net['train_samples']} MNIST training samples, the last of {net['epochs']} epoch(s) timed "
                  "(samples/s = samples / epoch seconds; a pipeline's epoch is its slowest stage's wall time).", "",
                  "| configuration | processes x threads | samples/s | vs (a) | weights identical to one process |",
                  "|---|---|---|---|---|"]
        for name, c in speed["configurations"].items():
            label = c["label"] + (f" (oversubscribed: {c['processes'] * c['threads']} threads on {speed['cores']} "
                                  "cores)" if c["oversubscribed"] else "")
            same = "reference" if name == "a" else yes_no(c["weights_identical"])
            if c["stages"] == 1 and name != "a" and not c["weights_identical"]:
                same += " (threads may change the order of sums)"
            lines.append(f"| ({name}) {label} | {c['processes']} x {c['threads']} | {c['median_samples_per_s']:.1f} "
                         f"| {c['vs_a']:.2f} | {same} |")
        pipes = [c for c in speed["configurations"].values() if c["stages"] > 1]
        lines += ["", "Weights identical to one process: " + yes_no(all(c["weights_identical"] for c in pipes))
                  + " (every pipeline run's model.safetensors against (a)'s, torch.equal on every tensor).", "",
                  "Bubbles and communication: each stage's wall seconds of training, the seconds it was busy (not "
                  "waiting on its neighbours' sends and receives), and the idle share 1 - busy / wall (medians).", "",
                  "| configuration | stage | blocks | wall s | busy s | idle share |", "|---|---|---|---|---|---|"]
        for name, stages in speed["bubbles"].items():
            for s in stages:
                blocks = ", ".join(s["blocks"])
                lines.append(f"| ({name}) | {s['stage']} | {blocks} | {s['wall_s']:.2f} | {s['busy_s']:.2f} "
                             f"| {s['idle_share']:.0%} |")
        lines.append("")
    memory = result.get("memory")
    if memory:
        counts = sorted({r["stages"] for r in memory["rows"]})
        source = "one run each"
        if memory.get("from_speed_runs"):
            names = [f"({name})" for name in memory.get("speed_runs", ["a", "c", "d"])]
            listed = " and ".join([", ".join(names[:-1]), names[-1]]) if len(names) > 1 else names[0]
            source = f"read from the first repeat's speed run{'s' if len(names) > 1 else ''} {listed}"
        env = "".join(f", {k}={v}" for k, v in memory["env"].items())
        lines += [f"Memory: peak resident set (VmHWM, MiB) of each training process, polled every "
                  f"{memory['poll_seconds'] * 1000:.0f} ms, {source}; nHSIC blocks of {memory['width']}, "
                  f"batch {memory['batch']}, {memory['train_samples']} training samples, {memory['epochs']} epoch(s), "
                  f"1 thread per process{env}. Every process also holds the Python and torch runtime: an idle "
                  f"process that only imported torch and layerwise peaks at {memory['idle_process_mib']:.0f} MiB.", "",
                  "| depth | " + " | ".join("one process" if n == 1 else f"{n} stages: each stage" for n in counts)
                  + " | launcher, torchrun (2 stages; 4 stages) |",
                  "|---|" + "---|" * (len(counts) + 1)]
        for depth in dict.fromkeys(r["depth"] for r in memory["rows"]):
            rows = {r["stages"]: r for r in memory["rows"] if r["depth"] == depth}
            cells = [" / ".join(f"{m:.0f}" for m in rows[n]["stage_peak_mib"]) for n in counts]
            helpers = "; ".join(f"{rows[n].get('launcher_peak_mib', 0):.0f}, {rows[n].get('torchrun_peak_mib', 0):.0f}"
                                for n in counts if n > 1)
            lines.append(f"| {depth} | " + " | ".join(cells) + f" | {helpers} |")
        lines.append("")
    return lines


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Pipeline stages against one process: speed, bubbles, memory.")
    parser.add_argument("--quick", action="store_true", help="4 blocks of 128, 1024 samples: to check the code")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--depth", type=int, default=None, help="blocks of the speed network (default 8)")
    parser.add_argument("--width", type=int, default=None, help="block width (default 512)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--train-limit", type=int, default=None, help="training samples (default 10240)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per speed run; the last is timed")
    parser.add_argument("--memory-depths", type=int, nargs="+", default=None, help="default 8 16 32")
    parser.add_argument("--memory-train-limit", type=int, default=512)
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=None, metavar="NAME",
                        help="speed configurations to run, of " + ", ".join(sorted(CONFIGS)) + " (default: all; "
                             "with --quick, all but e); a, the reference, must be one")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results")
    args = parser.parse_args(argv)
    if args.configs is not None and "a" not in args.configs:
        parser.error("--configs: a (one process, 1 thread) is the reference the others are compared with; "
                     "include it")
    quick = args.quick
    args.depth = args.depth or (4 if quick else 8)
    args.width = args.width or (128 if quick else 512)
    args.train_limit = args.train_limit or (1024 if quick else 10240)
    args.memory_depths = args.memory_depths or ([4] if quick else [8, 16, 32])

    command = "python benchmarks/pipeline.py " + " ".join(argv if argv is not None else sys.argv[1:])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    result: dict = {"command": command.strip(),
                    "machine": {"cpu": cpu_name(), "cores": cores, "torch": torch.__version__,
                                "python": sys.version.split()[0]},
                    "repeats": args.repeats}
    with tempfile.TemporaryDirectory(prefix="layerwise-pipeline-bench-") as folder:
        work = Path(folder)
        if not args.skip_speed:
            result["speed"] = measure_speed(args, work)
        if not args.skip_memory:
            result["memory"] = measure_memory(args, work, result.get("speed"))
    args.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out / "pipeline.json", json.dumps(result, indent=2) + "\n")
    lines = markdown(result)
    write_text_atomic(args.out / "pipeline.md", "\n".join(lines))
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
