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
# (docs/measured.md, start-up). GAISNET_VENV_DIR overrides the place; a .venv folder made by hand
# is used as it is.

venv_home() {
    local key
    key=$(printf '%s' "$PWD" | sha256sum | cut -c1-12)
    echo "${GAISNET_VENV_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/gaisnet-flwr/venvs/$(basename "$PWD")-$key}"
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
        echo "[venv] creating $home with $("$py" -V 2>&1); $venv links to it"
        mkdir -p "$(dirname "$home")"
        "$py" -m venv "$home"
        rm -f "$venv"  # a link whose environment was removed
        ln -s "$home" "$venv"
    fi
    local hash
    hash=$("$venv/bin/python" -c 'import hashlib
files = (open(n, "rb").read() for n in ("pyproject.toml", "constraints.txt"))
print(hashlib.sha256(b"".join(files)).hexdigest()[:16])')
    local stamp=$venv/.installed-$hash
    # A dev install serves a plain run too.
    if [[ -e $stamp-${extra:-base} || ( -z $extra && -e $stamp-dev ) ]]; then
        VENV_BIN=$PWD/$venv/bin
        return 0
    fi
    echo "[venv] pip install -c constraints.txt -e .${extra:+[$extra]} (torch and friends:" \
        "minutes the first time)"
    rm -f "$venv"/.installed-*
    "$venv/bin/python" -m pip install --disable-pip-version-check -q -c constraints.txt \
        -e ".${extra:+[$extra]}"
    touch "$stamp-${extra:-base}"
    VENV_BIN=$PWD/$venv/bin
}
