#!/usr/bin/env bash
# ./run.sh [clients] [min] [sampled] [rounds] [options] — see launchers/federation.sh
exec "$(dirname "${BASH_SOURCE[0]}")/launchers/federation.sh" "$@"
