#!/usr/bin/env bash
# Runs berth-container's scenario suite inside a VM booted from our guest kernel (the KVM box
# harness), where cgroup v2 owns every controller. On this project's machines the host's
# memory and pids controllers are bound to cgroup v1 hierarchies, so the OOM and fork-bomb
# scenarios can only run here. Every scenario must pass: CI=true turns skips into failures.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"
binary=$(cargo test --quiet --locked -p berth-container --test container --no-run \
  --message-format=json 2>/dev/null |
  python3 -c '
import json, sys
for line in sys.stdin:
    message = json.loads(line)
    if message.get("reason") == "compiler-artifact" and message.get("executable") \
            and message["target"]["name"] == "container":
        print(message["executable"])
')
[[ -n $binary ]] || { echo "container-suite: cannot find the test binary" >&2; exit 1; }
out=$(mktemp -d /tmp/berth-container-suite.XXXXXX)
trap 'rm -rf "$out"' EXIT
tests/kvm-box/run.sh --out "$out" -- env CI=true "$binary" --test-threads 2
