"""Summarise pytest junit reports per layer (unit/contract/e2e) and run; exit 1 when no test ran.

usage: summary.py REPORT.xml [...]; env TUNE_REQUIRE_E2E=1 makes 'no e2e test passed' a failure."""
import os
import sys
import xml.etree.ElementTree as ET
from collections import Counter


def layer_of(case) -> str:
    name = (case.get("classname") or "") + "." + (case.get("file") or "")
    for layer in ("unit", "contract", "e2e"):
        if f"tests.{layer}." in name or f"tests/{layer}/" in name:
            return layer
    return "other"


def main(paths):
    total = Counter()
    lines = []
    for path in paths:
        if not os.path.exists(path):
            lines.append(f"{os.path.basename(path)}: no report")
            continue
        per = {}
        for case in ET.parse(path).getroot().iter("testcase"):
            c = per.setdefault(layer_of(case), Counter())
            if case.find("failure") is not None or case.find("error") is not None:
                c["failed"] += 1
            elif case.find("skipped") is not None:
                c["skipped"] += 1
            else:
                c["passed"] += 1
        run = os.path.splitext(os.path.basename(path))[0]
        for layer in sorted(per):
            c = per[layer]
            total.update({f"{layer}.{k}": v for k, v in c.items()})
            total.update(c)
            lines.append(f"  {run:9s} {layer:9s} {c['passed']:4d} passed {c['failed']:3d} failed {c['skipped']:3d} skipped")
    print("test summary per run and layer:")
    print("\n".join(lines))
    print(f"total: {total['passed']} passed, {total['failed']} failed, {total['skipped']} skipped")
    if total["passed"] == 0:
        print("no test ran: failing")
        return 1
    if os.environ.get("TUNE_REQUIRE_E2E") == "1" and total["e2e.passed"] == 0:
        print("the webui sources are present but no e2e test passed: failing")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
