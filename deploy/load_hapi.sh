#!/bin/sh
# One-shot loader: wait for HAPI FHIR, then POST every synthetic test-bed transaction Bundle to it.
# Usage (compose service `loader`): load_hapi.sh http://hapi:8080/fhir /data
set -eu
BASE="${1:-http://hapi:8080/fhir}"
DATA="${2:-/data}"
DEADLINE_SECONDS="${LOAD_DEADLINE_SECONDS:-300}"

start=$(date +%s)
until curl -fsS -o /dev/null "$BASE/metadata"; do
  if [ $(( $(date +%s) - start )) -ge "$DEADLINE_SECONDS" ]; then
    echo "HAPI did not answer $BASE/metadata within ${DEADLINE_SECONDS}s" >&2
    exit 1
  fi
  sleep 3
done

count=0
for bundle in "$DATA"/*.json; do
  curl -fsS -o /dev/null -X POST -H 'Content-Type: application/fhir+json' --data-binary "@$bundle" "$BASE"
  count=$((count + 1))
  echo "loaded $(basename "$bundle")"
done
[ "$count" -gt 0 ] || { echo "no bundles in $DATA" >&2; exit 1; }
echo "loaded $count bundles into $BASE"
