#!/bin/sh
# The demo job of docker-compose.yml: make the data set, then train on 2 ranks
# with checkpoints in MinIO, through the API server (RANKWARDEN_URL and
# RANKWARDEN_API_TOKEN come from the compose file). Ends with the job's state.
set -eu
run() {
    id="$1"; shift
    rankwarden jobs submit --job-id "$id" "$@" >/dev/null
    rankwarden jobs logs --follow "$id"
    state=$(rankwarden jobs show "$id" | python -c 'import json,sys; print(json.load(sys.stdin)["state"])')
    echo "job $id: $state"
    [ "$state" = succeeded ]
}
suffix=$(date +%s)
run "dataset-$suffix" /app/demo/make_dataset.py --out /state/data
run "train-$suffix" --nproc-per-node 2 /app/demo/train.py --data /state/data
