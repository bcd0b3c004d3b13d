"""Resume after a crash on the real SmolLM2-135M-Instruct (issue #23; run by hand, not in CI).

One uninterrupted run of the shipped llama-w8a8 practice (smooth_quant + W8A8, layer_wise, a small calibration
set), then N runs killed with SIGKILL at random moments, each continued with `--resume`. A moment is drawn in
units of progress, not seconds (on a shared machine a run takes 90 to 260 s): a point x uniform in [0, blocks + 1)
(every other kill in [blocks - 3, blocks + 1), the last blocks and the saving); the kill comes once floor(x)
blocks are checkpointed, after the fraction x - floor(x) of the fresh run's mean block time (of its saving time
when x >= blocks). For each: which phase the kill hit
(blocks finished, read from the checkpoint), whether the resumed output is byte-identical to the uninterrupted
one, the resumed run's wall time against the fresh run's, and the time the fresh run spent on the blocks the
resumed run did not compute (from the moments the fresh run's checkpoints appeared).

    python benchmarks/resume_smollm2.py --kills 10 [--checkpoint_seconds auto|0|S]

Every run imports a copy of msmodelslim taken at the start, compiled to bytecode before the first run (the
fingerprint covers the source files: a working tree edited meanwhile would make the resumes refuse).
"""
from __future__ import annotations

import argparse
import compileall
import hashlib
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = Path.home() / ".cache" / "msmodelslim" / "demo" / "SmolLM2-135M-Instruct"
PRACTICE = ROOT / "msmodelslim" / "lab_practice" / "llama" / "llama-w8a8.yaml"
CALIB = ROOT / "msmodelslim" / "lab_calib" / "mix_calib.jsonl"
STATE = Path(".resume") / "state.json"


def digest(out: Path) -> dict[str, str]:
    """sha256 of every output file but the marker (it records the writing process's pid and time)."""
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file() and p.name != ".msmodelslim.json"}


def staging_dirs(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.partial-*"))


def finished_blocks(out: Path) -> int:
    for staging in staging_dirs(out):
        try:
            return json.loads((staging / STATE).read_text())["next_block"]
        except (OSError, ValueError, KeyError):
            continue
    return 0


class Run:
    schedule = "auto"  # MSMODELSLIM_CHECKPOINT_SECONDS of every run (--checkpoint_seconds)

    def __init__(self, work: Path, model: Path, config: Path, out: Path, resume: bool = False) -> None:
        argv = [sys.executable, "-m", "msmodelslim", "quant", "--model_path", str(model), "--save_path", str(out),
                "--device", "cpu", "--model_type", "SmolLM2-135M-Instruct", "--config_path", str(config)]
        # the kills are drawn in units of checkpointed blocks; where a schedule skips blocks, a kill loses the
        # blocks since the last checkpoint
        env = {**os.environ, "PYTHONPATH": str(work / "code"), "MSMODELSLIM_LOG_LEVEL": "info",
               "MSMODELSLIM_CHECKPOINT_SECONDS": self.schedule}
        self.log = open(work / f"{out.name}{'-resume' if resume else ''}.log", "w")
        self.started = time.perf_counter()
        self.cpu_before = children_cpu_seconds()
        self.process = subprocess.Popen(argv + (["--resume"] if resume else []), stdout=self.log,
                                        stderr=subprocess.STDOUT, env=env, cwd=work / "code")

    def wait(self) -> tuple[int, float]:
        code = self.process.wait()
        self.log.close()
        self.cpu_seconds = children_cpu_seconds() - self.cpu_before
        return code, time.perf_counter() - self.started


def children_cpu_seconds() -> float:
    """User + system CPU seconds of every child reaped so far. The runs are sequential (each is reaped before the
    next starts), so the difference across one run is that run's CPU time: on a machine shared with other jobs it
    varies far less than the wall time, which waits for the cores the other jobs hold."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


IN_PLACE = -1  # key of watch_checkpoints' answer: when the output was moved into place


def watch_checkpoints(out: Path, run: Run) -> dict[int, float]:
    """{finished blocks: seconds since the start when that checkpoint appeared, IN_PLACE: when the finished output
    appeared at `out`}, polled every 10 ms."""
    seen: dict[int, float] = {}

    def poll() -> None:
        while run.process.poll() is None:
            blocks = finished_blocks(out)
            if blocks and blocks not in seen:
                seen[blocks] = time.perf_counter() - run.started
            if IN_PLACE not in seen and out.exists():
                seen[IN_PLACE] = time.perf_counter() - run.started
            time.sleep(0.01)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    run.wait()
    thread.join()
    return seen


def in_process_seconds(log: Path) -> float:
    """quant's own time (from its last log line), without the interpreter start and imports, which on a loaded
    machine vary by tens of seconds from run to run."""
    return float(re.search(r"saved .* in ([0-9.]+) s, peak RSS", log.read_text()).group(1))


def block_seconds(checkpoints: dict[int, float], blocks: int) -> float:
    """Time the fresh run spent on its first `blocks` blocks: from the start of block 0 (its first checkpoint
    minus the mean block time) to the checkpoint after block `blocks`-1."""
    if not blocks:
        return 0.0
    ks = sorted(checkpoints)
    mean = (checkpoints[ks[-1]] - checkpoints[ks[0]]) / max(1, ks[-1] - ks[0])
    start = checkpoints[ks[0]] - ks[0] * mean
    known = max(k for k in ks if k <= blocks)
    return checkpoints[known] + (blocks - known) * mean - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--calib_samples", type=int, default=16, help="first samples of mix_calib.jsonl")
    parser.add_argument("--model", type=Path, default=DEMO_MODEL)
    parser.add_argument("--work_dir", type=Path, default=Path("/tmp/msmodelslim-resume-bench"))
    parser.add_argument("--seed", type=int, default=23)
    parser.add_argument("--checkpoint_seconds", default="auto",
                        help="MSMODELSLIM_CHECKPOINT_SECONDS of every run (the default: the user's default)")
    args = parser.parse_args()
    Run.schedule = args.checkpoint_seconds
    work = args.work_dir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shutil.copytree(ROOT / "msmodelslim", work / "code" / "msmodelslim", ignore=shutil.ignore_patterns("__pycache__"))
    # bytecode compiled before any timed run: otherwise the fresh run alone pays for it and every resume looks faster
    compileall.compile_dir(work / "code" / "msmodelslim", quiet=1)
    calib = work / "calib.jsonl"
    calib.write_text("".join(CALIB.read_text().splitlines(keepends=True)[: args.calib_samples]))
    practice = yaml.safe_load(PRACTICE.read_text())
    practice["spec"].update(runner="layer_wise", dataset=str(calib))
    config = work / "config.yaml"
    config.write_text(yaml.safe_dump(practice))

    fresh_out = work / "fresh"
    fresh = Run(work, args.model, config, fresh_out)
    checkpoints = watch_checkpoints(fresh_out, fresh)
    # the saving: from the last block's checkpoint to the output in place (not the interpreter's exit after it)
    in_place = checkpoints.pop(IN_PLACE, None)
    code, fresh_s = fresh.process.returncode, time.perf_counter() - fresh.started
    assert code == 0, (work / "fresh.log").read_text()[-3000:]
    reference = digest(fresh_out)
    fresh_quant_s = in_process_seconds(work / "fresh.log")
    total = json.loads((args.model / "config.json").read_text())["num_hidden_layers"]
    fresh_cpu = fresh.cpu_seconds
    print(f"fresh run: {fresh_s:.1f} s ({fresh_quant_s:.1f} s in quant, {fresh_cpu:.1f} CPU s), {total} blocks, first "
          f"checkpoint at {checkpoints[min(checkpoints)]:.1f} s, last at {checkpoints[max(checkpoints)]:.1f} s")

    rng = random.Random(args.seed)
    ks = sorted(checkpoints)
    mean_block_s = (checkpoints[ks[-1]] - checkpoints[ks[0]]) / max(1, ks[-1] - ks[0])
    saving_s = (in_place if in_place is not None else fresh_s) - checkpoints[ks[-1]]
    rows = []
    for i in range(args.kills):
        x = rng.uniform(0, total + 1) if i % 2 == 0 else rng.uniform(total - 3, total + 1)
        blocks_before = int(x)
        out = work / f"kill{i}"
        run = Run(work, args.model, config, out)
        while finished_blocks(out) < blocks_before and run.process.poll() is None:
            time.sleep(0.01)
        time.sleep((x - blocks_before) * (saving_s if blocks_before >= total else mean_block_s))
        moment = time.perf_counter() - run.started
        run.process.send_signal(signal.SIGKILL)
        code, _ = run.wait()
        if out.exists():  # the output was complete (moved into place) before the signal came
            identical = digest(out) == reference
            rows.append((i, moment, f"after the output was in place ({'identical' if identical else 'DIFFERENT'})",
                         None, None, None, None))
            print(rows[-1], flush=True)
            continue
        blocks = finished_blocks(out)
        phase = "saving" if blocks == total else f"{blocks} blocks finished"
        resumed = Run(work, args.model, config, out, resume=True)
        code, resume_s = resumed.wait()
        log = (work / f"{out.name}-resume.log").read_text()
        assert code == 0, log[-3000:]
        computed = re.search(r"resumed run: computed (\d+) of", log)
        identical = digest(out) == reference
        rows.append((i, moment, phase, identical, (resume_s, in_process_seconds(work / f"{out.name}-resume.log"),
                                                   resumed.cpu_seconds),
                     block_seconds(checkpoints, blocks), int(computed.group(1)) if computed else total))
        print(rows[-1], flush=True)
        shutil.rmtree(out)
    print(f"\nfresh: {fresh_s:.1f} s wall, {fresh_quant_s:.1f} s in quant, {fresh_cpu:.1f} CPU s. 'finished blocks' = "
          f"the seconds the fresh run spent on the blocks the resume did not compute; their CPU share = that time's "
          f"fraction of the fresh wall time times the fresh run's CPU seconds; saved = fresh - resumed")
    print("\n| kill | at s | phase | bytes identical | blocks computed on resume | resume s wall (in quant) | "
          "saved s wall (in quant) | finished blocks s | saved in quant >= finished blocks | resume CPU s | "
          "saved CPU s | finished blocks' CPU share | saved CPU >= share |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for i, moment, phase, identical, times, blocks_s, computed in rows:
        if identical is None:
            print(f"| {i} | {moment:.1f} | {phase} | | | | | | | | | | |")
            continue
        (wall, inside, cpu), saved = times, fresh_quant_s - times[1]
        cpu_share = fresh_cpu * blocks_s / fresh_s
        print(f"| {i} | {moment:.1f} | {phase} | {'yes' if identical else 'NO'} | {computed} of {total} | "
              f"{wall:.1f} ({inside:.1f}) | {fresh_s - wall:.1f} ({saved:.1f}) | {blocks_s:.1f} | "
              f"{'yes' if saved >= blocks_s else 'no'} | {cpu:.1f} | {fresh_cpu - cpu:.1f} | {cpu_share:.1f} | "
              f"{'yes' if fresh_cpu - cpu >= cpu_share else 'no'} |")


if __name__ == "__main__":
    main()
