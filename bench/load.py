"""Load test: N concurrent chat clients x T turns each against `python app.py`, bounded in time.

For each decoder (the batched engine, `--max-batch 8`; and per-session decoding, `--max-batch 0
--max-concurrency 2`, the baseline), starts the app as users do (`python app.py`, the demo model unless
told otherwise) on a free port, then runs one session alone and then N `gradio_client` sessions at once. Each session's first
turn uploads an image only it has (a hold-out shapes scene, never in the gallery) and asks about it; the
next turns ask for pictures (at the app's default `[RET]` scale), so images are retrieved. Checks that every turn
completes and that no session ever sees another session's upload or message, and reports time to first
token (submit -> first streamed reply token or image, as the client sees it, queueing included): median
and p95 over all turns, alone and under load, and their ratio.

The clients share the app's CPUs, so they are kept light, as a browser on another machine would be to the
server: they do not download the chat's images at every streamed update (gradio_client's default, one new
HTTP client and TLS context per file per update), only each distinct image once at the end for the
isolation check, and they look for updates every 10 ms instead of gradio_client's 1 ms. The CPU time of the
app and of the clients is reported for each run.

    python -m bench.load                       # 8 clients x 3 turns on the demo model, both decoders
    python -m bench.load --clients 32 --turns 2 --decoders batched
    python -m bench.load --checkpoint runs/mine --clients 4 --turns 2 --max-new-tokens 24

Prints a table and writes bench/results/load.json (load-<N>-clients.json for other N). Exits non-zero if a check fails or the run
outlasts --timeout.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
from gradio_client import Client, handle_file
from gradio_client.client import Job
from PIL import Image

from model.lm import QUANTIZE_CHOICES
from model.world import shapes

REPO = Path(__file__).resolve().parent.parent

RESULTS = REPO / "bench" / "results"
POLL_S = 0.01  # how often a client looks for streamed updates: the resolution of its time to first token
REQUESTS = ("Show me a picture of a large red circle.", "Show me a small blue square on the left.",
            "Can you show me a yellow star?", "Find an image of a green triangle at the top.")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


DECODERS = ("batched", "per-session")


def start_app(args: argparse.Namespace, decoder: str, port: int, log_path: Path) -> subprocess.Popen:
    command = [sys.executable, "app.py", "--port", str(port), "--checkpoint", args.checkpoint]
    command += (["--max-batch", str(args.max_batch)] if decoder == "batched"
                else ["--max-batch", "0", "--max-concurrency", str(args.max_concurrency)])
    if args.quantize:
        command += ["--quantize", args.quantize]
    log = open(log_path, "w")
    return subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def wait_until_up(url: str, app: subprocess.Popen, deadline: float, log_path: Path) -> None:
    while time.monotonic() < deadline:
        if app.poll() is not None:
            sys.exit(f"the app exited with {app.returncode} before serving:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    sys.exit(f"the app did not come up in time:\n{log_path.read_text()[-3000:]}")


def pixels_digest(image: str | Path | io.BytesIO) -> str:
    return hashlib.sha256(Image.open(image).convert("RGB").tobytes()).hexdigest()


def file_urls(chat: list[dict]) -> set[str]:
    """Where the images in a chat are served (gradio_client without downloads gives their `FileData`)."""
    return {c["file"]["url"] for m in chat for c in m["content"] if c["type"] == "file"}


def updates(job: Job) -> Iterator:
    """A streaming job's outputs as they come, looked for every `POLL_S`; raises the app's error, if any."""
    seen = 0
    while True:
        done = job.done()  # before reading: once done, the outputs read next are all of them
        outputs = job.outputs()
        yield from outputs[seen:]
        seen = len(outputs)
        if done:
            job.result()
            return
        time.sleep(POLL_S)


def user_texts(chat: list[dict]) -> list[str]:
    return [c["text"] for m in chat if m["role"] == "user" for c in m["content"] if c["type"] == "text"]


def has_reply(chat: list[dict]) -> bool:
    """The reply's message exists: the app adds it with the first generated token or image (a place in the
    batched decoder's line is shown there too, and is not a reply)."""
    last = chat[-1] if chat else None
    waiting = last is not None and any('class="waiting"' in c.get("text", "") for c in last["content"])
    return bool(last and last["role"] == "assistant" and not last.get("metadata") and not waiting)


class Session(threading.Thread):
    """One simulated user: its own client (own Gradio session), its own image, T turns in a row."""

    def __init__(self, number: int, url: str, args: argparse.Namespace, folder: Path):
        super().__init__(daemon=True)
        self.number, self.url, self.args = number, url, args
        self.image = folder / f"client-{number}.png"
        shapes.sample("holdout", number, image_size=256).image.save(self.image)  # never in the gallery
        self.digest = pixels_digest(str(self.image))
        self.ttft: list[float] = []
        self.turn_s: list[float] = []
        self.chat: list[dict] = []
        self.seen: set[str] = set()  # digests of the pixels of every image in its chat at the end
        self.texts: list[str] = []
        self.error: str | None = None

    def run(self) -> None:
        try:
            client = Client(self.url, verbose=False, download_files=False)
            rng = random.Random(self.number)
            for turn in range(self.args.turns):
                text = (f"I am client {self.number}. What is in this picture?" if turn == 0
                        else f"Client {self.number} asks: {rng.choice(REQUESTS)}")
                files = [handle_file(str(self.image))] if turn == 0 else []
                self.texts.append(text)
                start = time.perf_counter()
                job = client.submit({"text": text, "files": files}, max_new_tokens=self.args.max_new_tokens,
                                    max_images=1, api_name="/chat")
                first = None
                for chat, _ in updates(job):
                    if first is None and has_reply(chat):
                        first = time.perf_counter() - start
                    self.chat = chat
                self.turn_s.append(time.perf_counter() - start)
                if first is None:
                    raise RuntimeError(f"turn {turn} ended without a reply: {self.chat[-1:]}")
                self.ttft.append(first)
            with httpx.Client() as http:
                self.seen = {pixels_digest(io.BytesIO(http.get(url).raise_for_status().content))
                             for url in file_urls(self.chat)}
        except Exception as e:  # reported in the table, and the run fails
            self.error = f"{type(e).__name__}: {e}"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def run_sessions(sessions: list[Session], app: psutil.Process, deadline: float) -> dict[str, float]:
    """Run the sessions at once: the wall time, and the CPU time the app and these clients took meanwhile."""
    app_cpu, clients_cpu, start = sum(app.cpu_times()[:2]), time.process_time(), time.perf_counter()
    for s in sessions:
        s.start()
    for s in sessions:
        s.join(timeout=max(0.0, deadline - time.monotonic()))
    return {"wall_s": time.perf_counter() - start, "app_cpu_s": sum(app.cpu_times()[:2]) - app_cpu,
            "clients_cpu_s": time.process_time() - clients_cpu}


def check(sessions: list[Session]) -> list[str]:
    """Every turn done, and nobody's chat holds another session's upload or words."""
    problems = [f"client {s.number}: {s.error}" for s in sessions if s.error]
    problems += [f"client {s.number}: still running at the deadline" for s in sessions if s.is_alive()]
    for s in sessions:
        if user_texts(s.chat) != s.texts:
            problems.append(f"client {s.number}: its history holds other messages: {user_texts(s.chat)}")
        problems += [f"client {s.number} was shown client {o.number}'s upload"
                     for o in sessions if o is not s and o.digest in s.seen]
    return problems


def figures(sessions: list[Session]) -> dict[str, float | None]:
    ttft = [t for s in sessions for t in s.ttft]
    turns = [t for s in sessions for t in s.turn_s]
    return {"completed_turns": len(ttft),
            "ttft_median_s": statistics.median(ttft) if ttft else None,
            "ttft_p95_s": percentile(ttft, 0.95) if ttft else None,
            "turn_median_s": statistics.median(turns) if turns else None,
            "turn_p95_s": percentile(turns, 0.95) if turns else None}


def measure(args: argparse.Namespace, decoder: str, deadline: float) -> dict:
    """One app with this decoder: one client alone, then all of them at once."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    work = Path(tempfile.mkdtemp(prefix=f"load-{decoder}-"))
    log_path = work / "app.log"
    app = start_app(args, decoder, port, log_path)
    try:
        started = time.monotonic()
        wait_until_up(url, app, deadline, log_path)
        startup_s = time.monotonic() - started
        process = psutil.Process(app.pid)
        alone = [Session(args.clients, url, args, work)]  # one user, nobody waiting
        alone_times = run_sessions(alone, process, deadline)
        crowd = [Session(i, url, args, work) for i in range(args.clients)]
        times = run_sessions(crowd, process, deadline)
    finally:
        app.terminate()
        app.wait(timeout=30)
    problems = check(alone) + check(crowd)
    baseline, loaded = figures(alone), figures(crowd)
    ratio = (loaded["ttft_median_s"] / baseline["ttft_median_s"]
             if loaded["ttft_median_s"] and baseline["ttft_median_s"] else None)
    return {"decoder": decoder, **loaded, **times, "turns_per_min": 60 * loaded["completed_turns"] / times["wall_s"],
            "alone": {**baseline, **alone_times}, "ttft_median_vs_alone": ratio, "startup_s": startup_s,
            "isolation_ok": not any("shown" in p or "history" in p for p in problems), "problems": problems}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="demo")
    parser.add_argument("--quantize", choices=QUANTIZE_CHOICES)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--decoders", nargs="+", choices=DECODERS, default=list(DECODERS))
    parser.add_argument("--max-batch", type=int, default=8, help="the batched decoder's rows")
    parser.add_argument("--max-concurrency", type=int, default=2, help="per-session decoding's replies at once")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds for the whole run, start-up included")
    args = parser.parse_args(argv)

    deadline = time.monotonic() + args.timeout
    runs = [measure(args, decoder, deadline) for decoder in args.decoders]
    print(f"{args.clients} clients x {args.turns} turns, {args.max_new_tokens} new tokens, {os.cpu_count()} CPUs; "
          f"batched: --max-batch {args.max_batch}; per-session: --max-concurrency {args.max_concurrency}")
    print(f"{'':<26}{'turns':>7}{'TTFT median':>13}{'TTFT p95':>10}{'turn median':>13}{'wall':>8}{'turns/min':>11}"
          f"{'vs alone':>10}{'CPU s, app':>12}{'clients':>9}")
    for run in runs:
        for name, row in ((f"{run['decoder']}, 1 client", run["alone"]),
                          (f"{run['decoder']}, {args.clients} clients", run)):
            cells = [f"{row[k]:.2f}" if row[k] is not None else "-"
                     for k in ("ttft_median_s", "ttft_p95_s", "turn_median_s")]
            per_min = 60 * row["completed_turns"] / row["wall_s"]
            ratio = f"{run['ttft_median_vs_alone']:.1f}x" if row is run and run["ttft_median_vs_alone"] else ""
            print(f"{name:<26}{row['completed_turns']:>7}{cells[0]:>13}{cells[1]:>10}{cells[2]:>13}"
                  f"{row['wall_s']:>8.1f}{per_min:>11.1f}{ratio:>10}{row['app_cpu_s']:>12.1f}{row['clients_cpu_s']:>9.1f}")
    problems = [f"{run['decoder']}: {p}" for run in runs for p in run["problems"]]
    print(f"isolation: {'ok' if all(run['isolation_ok'] for run in runs) else 'VIOLATED'}")
    for problem in problems:
        print("  problem:", problem)
    result = {"checkpoint": args.checkpoint, "quantize": args.quantize or "app default", "clients": args.clients,
              "turns_per_client": args.turns, "max_new_tokens": args.max_new_tokens, "max_batch": args.max_batch,
              "max_concurrency": args.max_concurrency, "expected_turns": args.clients * args.turns,
              "cpu_count": os.cpu_count(), "runs": runs}
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "load.json" if args.clients == 8 else f"load-{args.clients}-clients.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2) + "\n")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
