# Sourced by the launchers: make sure .venv exists and has this project installed.
# Re-installs when pyproject.toml or the wanted extras changed since the last install.
#   fedgpu_ensure_env ROOT [EXTRAS]   (EXTRAS: comma-separated, default "test")

fedgpu_ensure_env() {
    local root=$1
    local extras=${2:-test}
    local venv="$root/.venv"
    local stamp="$venv/.fedgpu-installed"
    local sum installed="" extra missing=0
    sum=$(cd "$root" && cksum <pyproject.toml | cut -d' ' -f1)
    # The stamp is "CHECKSUM EXTRA..."; an install with more extras than asked for will do.
    [[ -f $stamp ]] && installed=" $(<"$stamp") "
    [[ $installed == " $sum "* ]] || missing=1
    for extra in ${extras//,/ }; do
        [[ $installed == *" $extra "* ]] || missing=1
    done
    if [[ -x $venv/bin/python ]] && ((!missing)); then
        return 0
    fi
    command -v python3 >/dev/null || { echo "fedgpu: python3 not found" >&2; return 1; }
    echo "fedgpu: installing into $venv (first time: several minutes, torch is large)" >&2
    if [[ ! -x $venv/bin/python ]]; then
        python3 -m venv "$venv" || return 1
    fi
    # pip's own lines on stderr as they come (the first install takes minutes), and in install.log.
    if ! "$venv/bin/python" -m pip install --disable-pip-version-check --progress-bar off -e "$root[$extras]" \
            > >(tee "$venv/install.log" >&2) 2>&1; then
        echo "fedgpu: installation failed; full log in $venv/install.log" >&2
        return 1
    fi
    echo "$sum ${extras//,/ }" >"$stamp"
}

# The extras a run of task $1 needs besides "test": transformers for text-imdb only.
fedgpu_extras_for_task() {
    if [[ $1 == text-imdb ]]; then echo test,text; else echo test; fi
}
