import json, sys
from msa_cupy._bench import harness, selection as sb
rows = []
def report(name, **f):
    rows.append(dict(name=name, **f)); print(name, {k: (round(v, 3) if isinstance(v, float) else v) for k, v in f.items()}, flush=True)
ceil = harness.ceilings()
report("ceilings", card=harness.card()["name"], **ceil)
for n in [int(x) for x in sys.argv[1].split(",")]:
    sb.bench_prefill(report, ceil, n, plain=False, variants=((8, 1),))
json.dump(rows, open(sys.argv[2], "w"), indent=1, default=str)
