# Sourced by scripts/*: the venv on PATH and Open MPI's switches for running as root
# (containers and CI run as root; Open MPI refuses without these two variables).
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PATH="${MPIRT_VENV:-$root/.venv}/bin:$PATH"
if [ "$(id -u)" = 0 ]; then
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
