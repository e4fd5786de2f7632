"""Measuring the server: the work behind `python main.py bench ...` (scripts/bench.py is only its CLI).

- datasets.py: prompts (synthetic token-length distributions, TensorRT-LLM prepare_dataset.py JSON lines)
- loadgen.py: closed-loop concurrency / Poisson-rate scheduling, the HTTP streaming client
- direct.py: the same requests through the backend in-process, for the serving-overhead ratio
- stats.py: TTFT, ITL, E2E, throughput and error accounting from per-request timings
- report.py, compare.py: terminal tables, JSON / CSV / PNG results, two result files side by side
- server.py: a local `main.py serve` on a free port for the suites that start their own server
- cpu.py, gpu.py: the CPU targets and the GPU table of README.md (Benchmarks)
- accuracy.py: greedy identity and ROUGE against plain transformers `generate`
"""
