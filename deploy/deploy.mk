# deploy/ checks' tools, for the top-level Makefile (`include deploy/deploy.mk`).
# promtool comes with Debian's prometheus package; tests/test_deploy.py needs it when CI=true.

.PHONY: deploy-tools
deploy-tools:
	@command -v promtool >/dev/null 2>&1 || { \
	  apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }
	@promtool --version | head -n 1
