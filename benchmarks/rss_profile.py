"""Where a command's memory goes: its resident set sampled over time, next to its own log lines.

Runs a command (for example ``python -m hf_qret.cli train ...``), samples ``VmRSS``, ``RssAnon`` (heap: tensors,
arrays, FAISS) and ``RssFile`` (mapped file pages: memory maps, safetensors reads) of the command's process every
``--interval`` seconds from ``/proc/PID/status``, and timestamps every line the command prints. It writes a JSON
record: the peak ``VmRSS`` (and its anonymous and file parts at that moment), the last log line before the peak (the
phase that peaked), the peak after each log line, and the full time series; ``--log`` keeps the command's output.

Usage:
    python benchmarks/rss_profile.py --json_out rss.json --log train.log -- \
        python -m hf_qret.cli train recipes/scifact.yaml --data_dir DIR --output_dir OUT ...

``ru_maxrss`` of the finished command is recorded too (the kernel's peak, which a sampler can miss between samples).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

_FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem")


def read_status(pid: int) -> dict[str, int] | None:
    """The memory fields of ``/proc/PID/status`` in bytes, ``None`` once the process is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in _FIELDS:
            out[key] = int(value.split()[0]) * 1024
    return out or None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json_out", required=True)
    parser.add_argument("--log", default=None, help="also write the command's output (timestamped) here")
    parser.add_argument("--interval", type=float, default=0.1)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --")
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    samples: list[tuple[float, dict[str, int]]] = []
    lines: list[tuple[float, str]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            status = read_status(child.pid)
            if status:
                samples.append((time.perf_counter() - start, status))
            time.sleep(args.interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    log = open(args.log, "w", encoding="utf-8") if args.log else None
    for raw in child.stdout:
        # progress bars rewrite one line with carriage returns: keep the last state of each
        for line in raw.rstrip("\n").split("\r"):
            if not line.strip():
                continue
            stamp = time.perf_counter() - start
            lines.append((stamp, line[:300]))
            if log:
                log.write(f"[{stamp:8.2f}s] {line}\n")
                log.flush()
    returncode = child.wait()
    done.set()
    sampler.join()
    if log:
        log.close()
    wall = time.perf_counter() - start
    ru_maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    peak_t, peak = max(samples, key=lambda s: s[1].get("VmRSS", 0)) if samples else (0.0, {})

    def phase_at(t: float) -> str:
        before = [line for stamp, line in lines if stamp <= t]
        return before[-1] if before else "(start)"

    # the highest VmRSS between one log line and the next: which phase holds how much
    phases = []
    bounds = [(0.0, "(start)")] + lines + [(wall + 1, "(end)")]
    for (t0, line), (t1, _) in zip(bounds, bounds[1:]):
        window = [s for t, s in samples if t0 <= t < t1]
        if window:
            top = max(window, key=lambda s: s.get("VmRSS", 0))
            phases.append({"from_s": round(t0, 2), "line": line[:160], **{k: top.get(k, 0) for k in _FIELDS}})
    record = {
        "command": command,
        "returncode": returncode,
        "wall_s": round(wall, 1),
        "ru_maxrss_bytes": ru_maxrss,
        "peak_vmrss_bytes": peak.get("VmRSS", 0),
        "peak_at_s": round(peak_t, 2),
        "peak_parts": peak,
        "peak_phase": phase_at(peak_t),
        "phases": phases,
        "samples": [(round(t, 2), s.get("VmRSS", 0), s.get("RssAnon", 0), s.get("RssFile", 0)) for t, s in samples],
    }
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    gb = 1e9
    print(
        f"rss_profile: peak VmRSS {record['peak_vmrss_bytes'] / gb:.2f} GB (anon {peak.get('RssAnon', 0) / gb:.2f}, "
        f"file {peak.get('RssFile', 0) / gb:.2f}) at {peak_t:.1f}s during: {record['peak_phase'][:120]}; "
        f"ru_maxrss {ru_maxrss / gb:.2f} GB; wall {wall:.0f}s; rc {returncode}",
        file=sys.stderr,
    )
    return record


if __name__ == "__main__":
    sys.exit(main()["returncode"])
