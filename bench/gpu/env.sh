# Sourced at the start of every command on the GPU machine (see bench/gpu/README.md).
# The machine has no network and its own python3 with torch; lmsan runs from this checkout
# through a package folder of links (no build: the audit path needs no native module).
export PYTHONUNBUFFERED=1
mkdir -p /tmp/pkg/lmsan
ln -sfn "$PWD/auditor" /tmp/pkg/lmsan/auditor
ln -sfn "$PWD/export" /tmp/pkg/lmsan/export
export PYTHONPATH=/tmp/pkg
