# Sourced by scripts/{run,test,check}.sh: `ensure_venv [extra]` creates .venv in the repo if it is
# missing and `pip install -c constraints.txt -e .[extra]` into it (every package pinned, so
# two fresh installs get the same versions), skipping the install when a stamp says this exact
# pyproject.toml and constraints.txt (hash) are already installed with those extras.
# Sets $VENV_BIN. PYTHON picks the interpreter for a new venv (default python3, must be >= 3.11).

ensure_venv() {
    local extra=${1:-} venv=.venv
    if [[ ! -x $venv/bin/python ]]; then
        local py=${PYTHON:-python3}
        "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
            echo "error: need Python >= 3.11 to create $venv; $py is $("$py" -V 2>&1)." \
                "Set PYTHON=/path/to/python3.11" >&2
            return 1
        }
        echo "[venv] creating $venv with $("$py" -V 2>&1)"
        "$py" -m venv "$venv"
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
