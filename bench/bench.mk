# Benchmark targets (issue #13). Included from the Makefile: `-include bench/bench.mk`.
# `make bench`        full run (≈1 h on 2 cores): JSON in bench/results/, table on stdout,
#                     bench/RESULTS.md rewritten with the date and command.
# `make bench-quick`  ≈1.5-2 minute smoke run (fast, 2s and a short body32k; no RSS run).
# Only the model-sized bodies (leaves RESULTS.md alone, unlike `make bench`):
#   .venv/bin/python bench/run.py --scenarios body32k,upload1m --out bench/results/
# Extra harness flags: make bench BENCH_ARGS="--repeat 5 --rate 1000"
VENV       ?= .venv
BENCH_PY   ?= $(VENV)/bin/python
BENCH_ARGS ?=

.PHONY: bench bench-quick bench-deps

# nginx + echo module (upstream model servers, the nginx rows) and wrk (closed loop).
bench-deps:
	@command -v wrk >/dev/null 2>&1 && command -v nginx >/dev/null 2>&1 \
	  && test -e /usr/lib/nginx/modules/ngx_http_echo_module.so \
	  || { apt-get update && DEBIAN_FRONTEND=noninteractive \
	       apt-get install -y --no-install-recommends nginx libnginx-mod-http-echo wrk; }

bench: install bench-deps
	$(BENCH_PY) bench/run.py --out bench/results/ --results-md bench/RESULTS.md $(BENCH_ARGS)

bench-quick: install bench-deps
	$(BENCH_PY) bench/run.py --quick --out bench/results/ $(BENCH_ARGS)
