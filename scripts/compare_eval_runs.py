"""Compare two tca eval results roots: same predictions per method, and summed seconds (a device check of --cuda-graph)."""
import sys, glob, collections
from dataclasses import asdict
from pathlib import Path
from tca_attention.eval.report import load_results
def load(root):  # archived (results.jsonl.gz) and plain lines alike
    return {(r.method, r.sample_id): asdict(r) for r in load_results([Path(d) for d in glob.glob(root + "/*/")])}
a, b = load(sys.argv[1]), load(sys.argv[2])
same = collections.Counter(); n = collections.Counter(); sa = collections.Counter(); sb = collections.Counter()
for k in a:
    if k in b:
        n[k[0]] += 1; same[k[0]] += a[k]["prediction"] == b[k]["prediction"]
        sa[k[0]] += a[k]["seconds"]; sb[k[0]] += b[k]["seconds"]
for m in n:
    print(f"{m}: {same[m]}/{n[m]} same predictions; seconds eager {sa[m]:.1f} graph {sb[m]:.1f}; decode={[b[k].get('metadata',{}).get('decode') for k in b if k[0]==m][:1]}")
