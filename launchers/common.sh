# Sourced by the launchers: the federation's shape from up to four positional arguments.
#   fedgpu_read_shape [clients] [min] [sampled] [rounds]
# Sets clients, min, sampled, rounds (defaults 10 10 5 3); bad input goes to the caller's die_usage.

fedgpu_read_shape() {
    (($# <= 4)) || die_usage "too many arguments: expected at most <clients> <min> <sampled> <rounds>"
    local names=(clients min sampled rounds) defaults=(10 10 5 3) given=("$@") i value
    for i in 0 1 2 3; do
        value=${given[$i]:-${defaults[$i]}}
        [[ $value =~ ^[0-9]+$ ]] && ((10#$value >= 1)) ||
            die_usage "${names[$i]} must be a whole number >= 1, got '$value'"
        printf -v "${names[$i]}" '%d' "$((10#$value))"
    done
    ((min <= clients)) || die_usage "min ($min) must not exceed clients ($clients)"
    ((sampled <= clients)) || die_usage "sampled ($sampled) must not exceed clients ($clients)"
}
