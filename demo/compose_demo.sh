#!/bin/sh
# The demo job of docker-compose.yml: train on 2 ranks with checkpoints in
# MinIO, through the API server, with the demo-train template (the data set is
# baked into the image). RANKWARDEN_URL comes from the compose file, the token
# from the server's state volume. Ends with the job's state.
set -eu
jobs() { rankwarden jobs --state-dir /state "$@"; }
run() {
    id="$1"; shift
    jobs submit --job-id "$id" "$@" >/dev/null
    jobs logs --follow "$id"
    state=$(jobs show --json "$id" | python -c 'import json,sys; print(json.load(sys.stdin)["state"])')
    echo "job $id: $state"
    [ "$state" = succeeded ]
}
run "train-$(date +%s)" --template demo-train --nproc-per-node 2 --param epochs=2 --param final-weights=model.pt
