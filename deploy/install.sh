#!/bin/sh
# Installs samf @SAMF@ from this folder alone, into the Python environment on PATH (`python3`): no network, no
# compiler. Every wheel is checked against the SHA-256 that requirements.txt and SHA256SUMS pin before anything
# is installed. Made by `make wheelhouse` (deploy/wheelhouse.py) for Python @PYTHON@ on @SYSTEM@ @MACHINE@ (glibc
# @GLIBC@ or newer). A problem is one line on stderr and exit 2, with nothing installed. docs/install.md.
#
#   python3 -m venv /opt/samf && PATH=/opt/samf/bin:$PATH ./install.sh
set -eu
here=$(cd "$(dirname "$0")" && pwd)
fail() { echo "error: $*" >&2; exit 2; }

system=$(uname -s) machine=$(uname -m)
[ "$system $machine" = "@SYSTEM@ @MACHINE@" ] \
    || fail "this wheelhouse is for @SYSTEM@ @MACHINE@; this machine is $system $machine"
py=$(command -v python3 2>/dev/null) || fail "no python3 on PATH: this wheelhouse needs Python @PYTHON@"
version=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) \
    || fail "$py does not run"
[ "$version" = "@PYTHON@" ] || fail "this wheelhouse is for Python @PYTHON@; $py is Python $version"
glibc=$("$py" -c 'import platform; print(platform.libc_ver()[1] or "0")')
"$py" -c 'import sys; have, need = ([int(x) for x in v.split(".")[:2]] for v in sys.argv[1:]); sys.exit(have < need)' \
    "$glibc" "@GLIBC@" || fail "this wheelhouse needs glibc @GLIBC@ or newer; this machine has $glibc"
"$py" -m pip --version >/dev/null 2>&1 || fail "$py has no pip (python3 -m ensurepip, or a venv)"
(cd "$here" && sha256sum --check --quiet --strict SHA256SUMS >/dev/null 2>&1) \
    || fail "a file of $here differs from SHA256SUMS: the wheelhouse was changed or is incomplete"

# pip's configuration files and PIP_* variables are ignored (--isolated, PIP_CONFIG_FILE): only this folder.
PIP_CONFIG_FILE=/dev/null "$py" -m pip --isolated install --quiet --disable-pip-version-check --no-index \
    --find-links "$here" --only-binary :all: --require-hashes -r "$here/requirements.txt" \
    || fail "pip could not install from $here (its message is above)"
echo "samf @SAMF@ installed into $("$py" -c 'import sys; print(sys.prefix)'): samf --help, samf doctor"
