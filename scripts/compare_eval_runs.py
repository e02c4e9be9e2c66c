"""Compare two tca eval results roots: same predictions per method, and summed seconds (a device check of --cuda-graph)."""
import json, sys, glob, collections
def load(root):
    out = {}
    for f in glob.glob(root + "/*/results.jsonl"):
        for l in open(f):
            r = json.loads(l); out[(r["method"], r["sample_id"])] = r
    return out
a, b = load(sys.argv[1]), load(sys.argv[2])
same = collections.Counter(); n = collections.Counter(); sa = collections.Counter(); sb = collections.Counter()
for k in a:
    if k in b:
        n[k[0]] += 1; same[k[0]] += a[k]["prediction"] == b[k]["prediction"]
        sa[k[0]] += a[k]["seconds"]; sb[k[0]] += b[k]["seconds"]
for m in n:
    print(f"{m}: {same[m]}/{n[m]} same predictions; seconds eager {sa[m]:.1f} graph {sb[m]:.1f}; decode={[b[k].get('metadata',{}).get('decode') for k in b if k[0]==m][:1]}")
