"""`main.py bench`: load generator, serving-overhead, GPU and accuracy benchmarks (work in scripts/benchmarks/).

    python main.py bench cpu                                   # the CPU targets, one command -> results/cpu/
    python main.py bench run --url http://127.0.0.1:8080 --concurrency 1,4,16 --num-requests 64
    python main.py bench run --rate 0.5,1,2 --max-concurrency 32 --dataset my.jsonl --no-ignore-eos
    python main.py bench run --api openai-chat --base-url http://vllm:8000 --model meta-llama/Llama-3.1-8B-Instruct
    python main.py bench direct --concurrency 1,8                # same requests, backend in-process
    python main.py bench compare results/direct.json results/bench.json
    python main.py bench plot docs/benchmarks/gpu-h200.json --dpi 80    # the PNGs of a results file, again
    python main.py bench dataset --out data/synthetic.jsonl --input-tokens normal:512,64 --output-tokens fixed:128
    python main.py bench accuracy                              # greedy identity + ROUGE vs transformers
    python main.py bench gpu --out results/gpu                 # on a CUDA machine: backend vs generate vs bandwidth
    python main.py bench guided                                # structured output: constrained vs free ms/token

Datasets are synthetic (`--input-tokens`/`--output-tokens`: fixed:N, normal:MEAN,STD, uniform:LOW,HIGH) or a
JSON-lines file in TensorRT-LLM's prepare_dataset.py format (`--dataset`), so trtllm-bench can run it too.
Each command imports its heavy modules (torch, transformers, aiohttp) itself, so main.py's other commands
start quickly.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scripts import REPO_ROOT
from scripts.cli import CliError

if TYPE_CHECKING:
    from scripts.benchmarks.datasets import BenchRequest, PromptCodec
    from scripts.benchmarks.loadgen import LoadLevel, OpenSender

RESULTS = REPO_ROOT / "results"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    commands = parser.add_subparsers(dest="bench_command", metavar="BENCH_COMMAND", required=True)

    run = commands.add_parser("run", help="load-test a running server over HTTP (streaming)")
    run.add_argument(
        "--url", "--base-url", dest="url", default="http://127.0.0.1:8080", help="server base URL (default %(default)s)"
    )
    run.add_argument(
        "--api",
        choices=("predict", "openai-chat", "openai-completions"),
        default="predict",
        help="this server's :predict, or the OpenAI chat / completions routes any OpenAI-compatible server has "
        "(default %(default)s)",
    )
    run.add_argument("--model", help="the model name OpenAI requests send (default: 'model')")
    _codec_args(run)
    _dataset_args(run)
    _load_args(run)
    run.add_argument("--out", type=Path, default=RESULTS / "bench", help="result prefix (default %(default)s)")
    run.set_defaults(func=_run)

    direct = commands.add_parser("direct", help="the same load through the backend in-process (no HTTP)")
    _dataset_args(direct)
    _load_args(direct)
    direct.add_argument("--out", type=Path, default=RESULTS / "direct", help="result prefix (default %(default)s)")
    direct.set_defaults(func=_direct)

    compare = commands.add_parser("compare", help="two result files side by side as B/A ratios")
    compare.add_argument("a", type=Path, help="baseline results JSON (A)")
    compare.add_argument("b", type=Path, help="results JSON to compare (B)")
    compare.add_argument(
        "--in-order",
        action="store_true",
        help="pair the i-th run of A with the i-th of B even when their labels (load levels) differ",
    )
    compare.set_defaults(func=_compare)

    plot = commands.add_parser("plot", help="draw a results JSON's throughput and latency PNGs again")
    plot.add_argument("results", type=Path, help="a results JSON (bench run, direct, cpu or gpu)")
    plot.add_argument("--out", type=Path, help="PNG prefix (default: the results file without .json)")
    plot.add_argument("--dpi", type=int, help="resolution (default: as bench run draws them; 80 keeps docs/ small)")
    plot.set_defaults(func=_plot)

    dataset = commands.add_parser("dataset", help="write a synthetic dataset in prepare_dataset.py format")
    _dataset_args(dataset)
    _codec_args(dataset)
    dataset.add_argument("--num-requests", type=int, default=100, help="requests to write (default %(default)s)")
    dataset.add_argument("--out", type=Path, required=True, help="JSON-lines file to write")
    dataset.set_defaults(func=_dataset)

    cpu = commands.add_parser("cpu", help="the CPU targets against the embedded default (starts its own server)")
    cpu.add_argument("--input-tokens", default="fixed:128", help="prompt length distribution (default %(default)s)")
    cpu.add_argument("--output-tokens", default="fixed:64", help="output length distribution (default %(default)s)")
    cpu.add_argument("--requests-c1", type=int, default=2, help="requests per round at c=1 (default %(default)s)")
    cpu.add_argument("--requests-c8", type=int, default=8, help="requests per round at c=8 (default %(default)s)")
    cpu.add_argument(
        "--requests-probe", type=int, default=10, help="2-token TTFT probes per round (default %(default)s)"
    )
    cpu.add_argument("--rounds", type=int, default=3, help="alternating direct/HTTP rounds (default %(default)s)")
    cpu.add_argument("--seed", type=int, default=0)
    cpu.add_argument("--out", type=Path, default=RESULTS / "cpu", help="result folder (default %(default)s)")
    cpu.set_defaults(func=_cpu)

    gpu = commands.add_parser("gpu", help="on a CUDA GPU: torch backend vs transformers generate vs bandwidth limit")
    gpu.add_argument("--concurrency", default="1,8,32,64", help="batch sizes / concurrencies (default %(default)s)")
    gpu.add_argument("--input-len", type=int, default=128, help="prompt tokens (default %(default)s)")
    gpu.add_argument("--output-len", type=int, default=128, help="new tokens (default %(default)s)")
    gpu.add_argument("--out", type=Path, default=RESULTS / "gpu", help="result folder (default %(default)s)")
    gpu.set_defaults(func=_gpu)

    guided = commands.add_parser("guided", help="structured output: per-token cost, constrained vs free, in process")
    guided.add_argument("--model-dir", type=Path, help="model (or, with --random-weights, tokenizer) folder")
    guided.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="(default %(default)s)")
    guided.add_argument(
        "--random-weights",
        choices=("config", "mistral-7b"),
        help="random weights of the folder's or Mistral-7B's shape",
    )
    guided.add_argument("--max-tokens", type=int, default=96, help="new tokens at most (default %(default)s)")
    guided.add_argument("--repeats", type=int, default=3, help="measured rounds (default %(default)s)")
    guided.add_argument("--concurrency", type=int, default=8, help="batched requests (default %(default)s)")
    guided.add_argument("--out", type=Path, default=RESULTS / "guided.json", help="(default %(default)s)")
    guided.set_defaults(func=_guided)

    accuracy = commands.add_parser("accuracy", help="greedy outputs and ROUGE vs plain transformers generate")
    accuracy.add_argument("--url", help="server to check (default: start the configured server locally)")
    accuracy.add_argument(
        "--dataset",
        type=Path,
        default=REPO_ROOT / "data" / "summarization.jsonl",
        help="JSON lines with id, article, summary (default %(default)s)",
    )
    accuracy.add_argument("--limit", type=int, help="use only the first N articles")
    accuracy.add_argument("--max-new-tokens", type=int, default=64, help="(default %(default)s)")
    accuracy.add_argument("--template", help="prompt template with {article} (default: a one-line instruction)")
    accuracy.add_argument("--concurrency", type=int, default=1, help="server requests in flight (default %(default)s)")
    accuracy.add_argument("--out", type=Path, default=RESULTS / "accuracy.json", help="(default %(default)s)")
    accuracy.set_defaults(func=_accuracy)


def _dataset_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("dataset")
    group.add_argument(
        "--dataset",
        type=Path,
        help="prepare_dataset.py JSON lines (task_id, input_ids|prompt, output_tokens); default: synthetic",
    )
    group.add_argument("--input-tokens", default="fixed:128", help="synthetic prompt lengths (default %(default)s)")
    group.add_argument("--output-tokens", default="fixed:128", help="synthetic output lengths (default %(default)s)")
    group.add_argument("--seed", type=int, default=0, help="for synthetic lengths and Poisson arrivals")


def _codec_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokenizer", help="tokenizer folder or Hub id (default: the configured server model's)")
    parser.add_argument(
        "--prompt-format",
        choices=("auto", "chat", "raw"),
        help="how the server wraps a prompt (default: the configured server's prompt_format)",
    )


def _load_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("load")
    group.add_argument("--concurrency", default="1", help="closed-loop sweep, e.g. 1,2,4,8 (default %(default)s)")
    group.add_argument("--rate", help="open-loop Poisson sweep in requests/s, e.g. 0.5,1,2 (replaces --concurrency)")
    group.add_argument("--max-concurrency", type=int, help="with --rate: cap on requests in flight")
    group.add_argument("--num-requests", type=int, default=32, help="measured requests per level (default %(default)s)")
    group.add_argument("--max-duration", type=float, help="seconds per level after which no request starts")
    group.add_argument("--warmup-waves", type=int, default=1, help="warm-up waves per level (default %(default)s)")
    group.add_argument(
        "--warmup-tokens",
        type=int,
        default=16,
        help="new tokens of a warm-up request; 0 = full length, best on a GPU (default %(default)s)",
    )
    group.add_argument(
        "--ignore-eos",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="force exactly output_tokens tokens, as trtllm-bench does (default: on)",
    )


def _levels(args: argparse.Namespace) -> list[LoadLevel]:
    from scripts.benchmarks.loadgen import LoadLevel

    try:
        if args.rate:
            return [LoadLevel(concurrency=args.max_concurrency, rate=float(r)) for r in args.rate.split(",")]
        return [LoadLevel(concurrency=int(c)) for c in args.concurrency.split(",")]
    except ValueError:
        raise CliError("--concurrency takes integers and --rate numbers, comma-separated (e.g. 1,2,4)") from None


def _requests(args: argparse.Namespace, codec: PromptCodec, count: int) -> tuple[list[BenchRequest], str]:
    from scripts.benchmarks.datasets import LengthDist, load_jsonl, synthetic

    if args.dataset:
        return load_jsonl(args.dataset, codec), str(args.dataset)
    input_len, output_len = LengthDist.parse(args.input_tokens), LengthDist.parse(args.output_tokens)
    requests = synthetic(codec, count, input_len, output_len, args.seed)
    return requests, f"synthetic input {input_len}, output {output_len}"


def _codec(args: argparse.Namespace) -> PromptCodec:
    from scripts.benchmarks.direct import server_codec

    return server_codec(args.tokenizer, args.prompt_format)


def _measure(args: argparse.Namespace, mode: str, open_sender: OpenSender, codec: PromptCodec, **meta: Any) -> int:
    from scripts.benchmarks.loadgen import RunPlan, run_levels
    from scripts.benchmarks.report import headline, print_json_line, print_table, run_meta, write_results

    requests, dataset = _requests(args, codec, args.num_requests)
    plan = RunPlan(args.num_requests, args.warmup_waves, args.warmup_tokens or None, args.max_duration, args.seed)
    summaries = run_levels(requests, open_sender, _levels(args), plan, mode)
    api = meta.get("api")
    print_table(summaries, f"{mode}{f' ({api} API)' if api else ''}: {dataset}")
    paths = write_results(args.out, run_meta(mode=mode, dataset=dataset, ignore_eos=args.ignore_eos, **meta), summaries)
    print("results: " + ", ".join(map(str, paths)))
    print_json_line({"mode": mode, **({"api": api} if api else {}), "runs": [headline(s) for s in summaries]})
    return 0 if all(s.failed == 0 for s in summaries) else 1


def _run(args: argparse.Namespace) -> int:
    from scripts.benchmarks.loadgen import http_sender

    if args.api != "predict" and args.prompt_format is None:  # what an OpenAI server does with the prompt
        args.prompt_format = "chat" if args.api == "openai-chat" else "raw"
    codec = _codec(args)

    def count(text: str) -> int:
        return len(codec.tokenizer(text, add_special_tokens=False).input_ids)

    sender = http_sender(args.url.rstrip("/"), count, ignore_eos=args.ignore_eos, api=args.api, model=args.model)
    return _measure(args, "http", sender, codec, url=args.url, api=args.api, model=args.model)


def _direct(args: argparse.Namespace) -> int:
    from scripts.benchmarks.direct import direct_sender, loaded_model, model_codec

    with loaded_model() as model:
        sender = direct_sender(model.backend, ignore_eos=args.ignore_eos)
        return _measure(args, "direct", sender, model_codec(model))


def _compare(args: argparse.Namespace) -> int:
    from scripts.benchmarks.compare import compare, print_comparison
    from scripts.benchmarks.report import load_results, print_json_line

    for path in (args.a, args.b):
        if not path.is_file():
            raise CliError(f"{path} does not exist; write it with `python main.py bench run --out ...`")
    rows = compare(load_results(args.a)[1], load_results(args.b)[1], in_order=args.in_order)
    if not rows:
        raise CliError(f"{args.a} and {args.b} have no runs to pair")
    mismatched = sorted({row.label for row in rows if row.a_label != row.b_label})
    if mismatched:
        print(f"warning: --in-order paired runs of different load levels: {', '.join(mismatched)}", file=sys.stderr)
    print_comparison(rows, str(args.a), str(args.b))
    print_json_line({"a": str(args.a), "b": str(args.b), "rows": [row.to_dict() for row in rows]})
    return 0


def _plot(args: argparse.Namespace) -> int:
    from scripts.benchmarks.report import load_results, plot_results, print_json_line

    if not args.results.is_file():
        raise CliError(f"{args.results} does not exist; results files come from `python main.py bench run --out ...`")
    resolution = {"dpi": args.dpi} if args.dpi else {}
    paths = plot_results(load_results(args.results)[1], args.out or args.results.with_suffix(""), **resolution)
    print_json_line({"results": str(args.results), "plots": [str(p) for p in paths]})
    return 0


def _dataset(args: argparse.Namespace) -> int:
    from scripts.benchmarks.datasets import write_jsonl
    from scripts.benchmarks.report import print_json_line

    requests, description = _requests(args, _codec(args), args.num_requests)
    write_jsonl(args.out, requests)
    print_json_line({"dataset": str(args.out), "requests": len(requests), "source": description})
    return 0


def _cpu(args: argparse.Namespace) -> int:
    from scripts.benchmarks.cpu import CpuPlan, run_cpu_suite
    from scripts.benchmarks.datasets import LengthDist

    plan = CpuPlan(
        input_len=LengthDist.parse(args.input_tokens),
        output_len=LengthDist.parse(args.output_tokens),
        requests_single=args.requests_c1,
        requests_batched=args.requests_c8,
        requests_probe=args.requests_probe,
        rounds=args.rounds,
        seed=args.seed,
    )
    return 0 if run_cpu_suite(plan, args.out) else 1


def _gpu(args: argparse.Namespace) -> int:
    import torch

    from scripts.benchmarks.gpu import GpuPlan, run_gpu_suite

    if not torch.cuda.is_available():
        raise CliError("bench gpu needs a CUDA GPU; run it on a machine with one (docs/benchmarks.md)")
    try:
        concurrencies = tuple(int(c) for c in args.concurrency.split(","))
    except ValueError:
        raise CliError("--concurrency takes comma-separated integers, e.g. 1,8,32,64") from None
    rows = run_gpu_suite(GpuPlan(concurrencies, args.input_len, args.output_len), args.out)
    return 0 if all(r.backend_failed == 0 for r in rows) else 1


def _guided(args: argparse.Namespace) -> int:
    from scripts.benchmarks.guided import GuidedPlan, print_rows, run_guided_bench
    from scripts.benchmarks.report import print_json_line

    model_dir = args.model_dir
    if model_dir is None:  # the server's embedded model (its cache helpers import the serving stack)
        from model.artifacts import embedded_model_dir
        from scripts.benchmarks.direct import model_cache_dir

        model_dir = embedded_model_dir(model_cache_dir())
    plan = GuidedPlan(model_dir, args.device, args.random_weights, args.max_tokens, args.repeats, args.concurrency)
    summary = print_rows(run_guided_bench(plan), plan)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print_json_line({"guided": summary["rows"], "xgrammar": summary["xgrammar"], "device": summary["device"]})
    return 0


def _accuracy(args: argparse.Namespace) -> int:
    from scripts.benchmarks.accuracy import DEFAULT_TEMPLATE, load_articles, run_summarization_check

    articles = load_articles(args.dataset, args.limit)
    template = args.template or DEFAULT_TEMPLATE
    report = run_summarization_check(args.url, articles, template, args.max_new_tokens, args.concurrency, args.out)
    return 0 if report.identical == report.total else 1
