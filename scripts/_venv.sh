# Sourced by scripts/{run,test,check}.sh: `ensure_venv [extra]` creates the environment if it is
# missing and `pip install -c constraints.txt -e .[extra]` into it (every package pinned, so
# two fresh installs get the same versions), skipping the install when a stamp says this exact
# pyproject.toml and constraints.txt (hash) are already installed with those extras.
# Sets $VENV_BIN. PYTHON picks the interpreter for a new venv (default python3, must be >= 3.11).
#
# Where it lives: outside the checkout, with `.venv` a symlink to it (`source .venv/bin/activate`
# works as ever). `flwr run .` builds the app bundle by walking every file under the app folder
# before it filters them, and it never enters a symlinked folder (flwr/cli/utils.py,
# collect_files): a real .venv folder here (~54,000 files) costs every `flwr run` about 5 s of CPU
# (docs/measured.md, start-up). GAISNET_VENV_DIR overrides the place (an environment there is
# used as it is); a .venv folder made by hand is used as it is. Removing a checkout leaves its
# environment behind: `rm -rf "$(readlink .venv)"` first.

venv_home() {
    local key name
    # sha256sum (GNU coreutils), or shasum where there is none (macOS): the same digest
    key=$(printf '%s' "$PWD" | { sha256sum 2>/dev/null || shasum -a 256; } | cut -c1-12)
    # The checkout's name with anything but letters, digits, '.', '_' and '-' made '-': a space
    # in the environment's path breaks Flower's SuperLink (check_venv_path).
    name=$(printf '%s' "$(basename "$PWD")" | tr -c 'A-Za-z0-9._-' '-')
    echo "${GAISNET_VENV_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/gaisnet-flwr/venvs/$name-$key}"
}

# Flower 1.42's SuperLink cannot create its database from an installation whose path has a space:
# it hands alembic its migration folders as one space-separated string
# (flwr/supercore/state/alembic/utils.py), so none is found and `flwr run` fails with "no such
# table: fab". Refused before anything is installed, with the way out.
check_venv_path() {
    if [[ $1 == *[[:space:]]* ]]; then
        echo "error: the Python environment would live at '$1', a path with a space;" \
            "Flower 1.42's SuperLink cannot run from there (its database migrations are not" \
            "found: 'no such table: fab'). Set GAISNET_VENV_DIR (or XDG_CACHE_HOME) to a path" \
            "without spaces, e.g. GAISNET_VENV_DIR=/tmp/gaisnet-venv" >&2
        return 1
    fi
}

ensure_venv() {
    local extra=${1:-} venv=.venv
    if [[ ! -x $venv/bin/python ]]; then
        local py=${PYTHON:-python3}
        "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
            echo "error: need Python >= 3.11 to create $venv; $py is $("$py" -V 2>&1)." \
                "Set PYTHON=/path/to/python3.11" >&2
            return 1
        }
        local home
        home=$(venv_home)
        check_venv_path "$home" || return 1
        if [[ -z ${GAISNET_VENV_DIR:-} && -e $home ]]; then
            # Left by an earlier checkout at this path (a fresh clone has no .venv link yet):
            # a fresh checkout gets a fresh environment, as it did inside the checkout.
            echo "[venv] removing $home (an earlier checkout's at this path)"
            rm -rf "$home"
        fi
        if [[ ! -x $home/bin/python ]]; then
            echo "[venv] creating $home with $("$py" -V 2>&1); $venv links to it"
            mkdir -p "$(dirname "$home")"
            "$py" -m venv "$home"
        fi
        rm -f "$venv"  # a link whose environment was removed
        ln -s "$home" "$venv"
    fi
    # Everything runs from the environment's own path, not through the link: a checkout's path
    # may have spaces, and Ray starts its workers with an unquoted sys.executable (and pip writes
    # the path it was run from into every command it installs).
    local real
    real=$(cd "$venv" && pwd -P)
    check_venv_path "$real" || return 1  # one made by hand, too
    VENV_BIN=$real/bin
    local hash
    hash=$("$VENV_BIN/python" -c 'import hashlib
files = (open(n, "rb").read() for n in ("pyproject.toml", "constraints.txt"))
print(hashlib.sha256(b"".join(files)).hexdigest()[:16])')
    local stamp=$venv/.installed-$hash
    # A dev install serves a plain run too.
    if [[ -e $stamp-${extra:-base} || ( -z $extra && -e $stamp-dev ) ]]; then
        return 0
    fi
    echo "[venv] pip install -c constraints.txt -e .${extra:+[$extra]} (torch and friends:" \
        "minutes the first time)"
    rm -f "$venv"/.installed-*
    "$VENV_BIN/python" -m pip install --disable-pip-version-check -q -c constraints.txt \
        -e ".${extra:+[$extra]}"
    touch "$stamp-${extra:-base}"
}
