#!/usr/bin/env bash
# Synthesize the CDK example and run its template tests (pytest; no AWS
# account). Needs Python 3.11+ and Node.js; installs the Python packages into
# a virtual environment ($CDK_VENV, default target/cdk-venv).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${CDK_VENV:-$repo/target/cdk-venv}"

command -v node >/dev/null || { echo "deploy/cdk: Node.js is required (aws-cdk-lib runs on it)" >&2; exit 1; }
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install -q --disable-pip-version-check -r "$here/requirements-dev.txt"
# The splicegate binary the tests ship as the asset and run `check` with.
export SPLICEGATE_BIN="${SPLICEGATE_BIN:-$repo/target/debug/splicegate}"
[ -x "$SPLICEGATE_BIN" ] || cargo build --manifest-path "$repo/Cargo.toml" --bin splicegate
cd "$here"
# jsii prints a banner on every run under a Node.js past its end of life.
export JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION="${JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION:-18,20}"
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider tests "$@"
