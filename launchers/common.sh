# Sourced by the launchers (run.sh, the Slurm job and its node steps).

# Numbers are checked as text first: bash arithmetic would wrap 18446744073709551617 around to 1.
# Bad input goes to the caller's die_usage.
FEDGPU_MAX_COUNT=999999

# fedgpu_read_count NAME VALUE: sets NAME to VALUE, a whole number from 1 to FEDGPU_MAX_COUNT read as text.
fedgpu_read_count() {
    local digits
    [[ $2 =~ ^[0-9]+$ ]] || die_usage "$1 must be a whole number >= 1, got '$2'"
    digits=${2#"${2%%[!0]*}"}  # without leading zeros
    ((${#digits} <= ${#FEDGPU_MAX_COUNT})) && ((10#${digits:-0} <= FEDGPU_MAX_COUNT)) ||
        die_usage "$1 must be at most $FEDGPU_MAX_COUNT, got '$2'"
    ((10#${digits:-0} >= 1)) || die_usage "$1 must be a whole number >= 1, got '$2'"
    printf -v "$1" '%d' "$((10#$digits))"
}

# fedgpu_read_shape [clients] [min] [sampled] [rounds]
# The federation's shape from up to four positional arguments: sets clients, min, sampled,
# rounds (defaults 10 10 5 3).
fedgpu_read_shape() {
    (($# <= 4)) || die_usage "too many arguments: expected at most <clients> <min> <sampled> <rounds>"
    local names=(clients min sampled rounds) defaults=(10 10 5 3) given=("$@") i
    for i in 0 1 2 3; do
        fedgpu_read_count "${names[$i]}" "${given[$i]:-${defaults[$i]}}"
    done
    ((min <= clients)) || die_usage "min ($min) must not exceed clients ($clients)"
    ((sampled <= clients)) || die_usage "sampled ($sampled) must not exceed clients ($clients)"
}

# fedgpu_stop_groups GRACE PGID...
# TERM each process group, give them GRACE seconds to go, then KILL what is left.
fedgpu_stop_groups() {
    local grace=$1 pid deadline alive
    shift
    for pid in "$@"; do kill -TERM -- "-$pid" 2>/dev/null; done
    deadline=$((SECONDS + grace))
    while ((SECONDS < deadline)); do
        alive=0
        for pid in "$@"; do kill -0 -- "-$pid" 2>/dev/null && alive=1 && break; done
        ((alive)) || break
        sleep 0.1
    done
    for pid in "$@"; do kill -KILL -- "-$pid" 2>/dev/null; done
    return 0
}
