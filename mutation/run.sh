#!/usr/bin/env bash
# Runs one mutation config (mutation/<name>.cfg) with mutmut: `mutation/run.sh engine`.
#
# mutmut names a mutant by its module path and the served code is imported as palm_serve.*
# (setuptools maps the top-level directories onto that package), so the run happens in a
# staging tree, build/mutate/<name>/, whose palm_serve/ links to them. mutmut copies it to
# mutants/, puts that first on sys.path (ahead of the editable install's finder), runs the
# selected tests once to learn which tests reach which function, then forks one child per
# mutant from a server that has already imported torch and the tests, and runs only the
# tests that reach the mutated function, stopping at the first failure (in no particular
# order: tests/mutation_order.py puts the server tests that start no server first).
set -euo pipefail
name=$1
root=$(cd "$(dirname "$0")/.." && pwd)
stage=$root/build/mutate/$name
# The stage is kept between runs: mutmut keeps each mutant's verdict beside its copy in
# mutants/ and tests again only the functions whose code changed, the tests that changed
# their selection, and (when the config's timeouts change) the timeouts. MUTATE_FRESH=1
# starts over.
[[ ${MUTATE_FRESH:-0} == 1 ]] && rm -rf "$stage"
mkdir -p "$stage/palm_serve" "$root/mutation/results"
touch "$stage/palm_serve/__init__.py"
for package in kernels model engine server; do ln -sfn "$root/$package" "$stage/palm_serve/$package"; done
ln -sfn "$root/tests" "$stage/tests"
ln -sfn "$root/pyproject.toml" "$stage/pyproject.toml"
cp "$root/mutation/$name.cfg" "$stage/setup.cfg"
cd "$stage"
# One worker by default (MUTATE_CHILDREN=2 on a quiet machine), one intra-op thread: the
# tests use tiny tensors.
# mutmut keeps a verdict until the function changes, so a survivor stays one after a test
# for it is written: MUTATE_RETRY=1 tests again, after the mutants without a verdict, every
# mutant not killed (survived, timed out, reached by no test) against the tests as they are.
retry=()
if [[ ${MUTATE_RETRY:-0} == 1 && -d mutants ]]; then
    mapfile -t retry < <("$root/.venv/bin/mutmut" results 2>/dev/null \
        | sed -n 's/^ *\([^ ]*\): \(survived\|timeout\|no tests\|suspicious\|segfault\)$/\1/p')
fi
mutate() {  # named mutants only, or (no names) every mutant without a verdict
    OMP_NUM_THREADS=1 "$root/.venv/bin/mutmut" run --max-children "${MUTATE_CHILDREN:-1}" "$@" \
        >> mutmut-run.log 2>&1 || {
        tail -40 mutmut-run.log
        exit 1
    }
}
# The front's config: its tests' servers run the engine core in a thread, so that each
# server a mutant's tests start costs a fraction of a second (tests/server/server_helpers.py).
[[ $name == server ]] && export PALM_TEST_ENGINE_PROCESS=0
start=$(date +%s)
: > mutmut-run.log
mutate
if ((${#retry[@]})); then mutate "${retry[@]}"; fi
wall=$(($(date +%s) - start))
"$root/.venv/bin/mutmut" results --all true \
    | "$root/.venv/bin/python" "$root/mutation/summary.py" "$name" "$wall" "$root/mutation/EQUIVALENT.md" \
    > "$root/mutation/results/$name.txt"
head -1 "$root/mutation/results/$name.txt"
