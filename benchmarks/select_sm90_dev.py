"""Selection prefill on the card at hand: the default kernel against its variants.

    PYTHONPATH=$PWD python3 benchmarks/select_sm90_dev.py 32768,131072,1048576 out.json

On sm_90 the default is the wgmma kernel (select_sm90.cu) and the variant warps=(8, 1) the
mma.sync kernel (select.cu); the variant's ids are compared with the default's.
"""
import json
import sys

from msa_cupy._bench import harness
from msa_cupy._bench import selection as sb

rows = []


def report(name, **fields):
    rows.append(dict(name=name, **fields))
    print(name, {k: (round(v, 3) if isinstance(v, float) else v) for k, v in fields.items()}, flush=True)


ceil = harness.ceilings()
report("ceilings", card=harness.card()["name"], **ceil)
for n in [int(x) for x in sys.argv[1].split(",")]:
    sb.bench_prefill(report, ceil, n, plain=False, variants=((8, 1),))
json.dump(rows, open(sys.argv[2], "w"), indent=1, default=str)
