"""The score of one config from `mutmut results --all true` (read on stdin):
`mutmut results --all true | summary.py NAME WALL_S EQUIVALENT.md`.

Killed: the tests failed or hung (timeout) on the mutant. A timeout is listed by name: a
surviving mutant whose tests outrun the limit on a loaded machine also reads as one, so
each deserves a look (rerun it alone: `mutmut run NAME` in the stage). Equivalent: a mutant named in
EQUIVALENT.md (it changes no behaviour; the reason is given there); it leaves the count.
Every other mutant, "no tests" (no selected test reaches it) included, counts against the
score. A named equivalent that was killed is reported: the list is stale."""

import re
import sys
from collections import Counter

name, wall_s, equivalent_md = sys.argv[1], int(sys.argv[2]), sys.argv[3]
equivalent = set(re.findall(r"`(palm_serve\.[^`]+__mutmut_\d+)`", open(equivalent_md).read()))
status = dict(line.strip().rsplit(": ", 1) for line in sys.stdin if line.strip().count(": ") >= 1)
counts = Counter(status.values())
scored_status = Counter(s for m, s in status.items() if m not in equivalent)
killed = counts["killed"] + counts["timeout"]
excluded = [m for m in status if m in equivalent and status[m] != "killed"]
stale = sorted(m for m in status if m in equivalent and status[m] == "killed")
scored = len(status) - len(excluded)
print(
    f"{name}: {len(status)} mutants, {killed} killed ({counts['timeout']} by timeout), "
    f"{len(excluded)} equivalent, {scored - killed} not killed "
    f"({scored_status['survived']} survived, {scored_status['no tests']} reached by no test); "
    f"score {100 * killed / max(scored, 1):.1f}%; wall {wall_s} s"
)
for mutant in sorted(status):
    if status[mutant] not in ("killed", "timeout") and mutant not in equivalent:
        print(f"  not killed: {mutant}: {status[mutant]}")
for mutant in sorted(status):
    if status[mutant] == "timeout" and mutant not in equivalent:
        print(f"  killed by timeout: {mutant}")
for mutant in stale:
    print(f"  listed as equivalent but killed (remove it from EQUIVALENT.md): {mutant}")
