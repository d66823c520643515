"""A/B: the bare loop of the default model in fresh processes, with and without torch's
THP_MEM_ALLOC_ENABLE=1 (2 MB pages for large CPU tensors), alternating."""
import json, os, subprocess, sys, statistics
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
ONE = r'''
import json, sys
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from spannorm.runs import register_resolvers; register_resolvers()
from spannorm.bench import bare_run
with initialize_config_dir(config_dir=sys.argv[2] + "/conf", version_base=None):
    cfg = compose("train", overrides=["run_dir=/tmp/diag/thp"])
cfg = OmegaConf.to_container(cfg, resolve=True)
print(json.dumps(bare_run(cfg, 3, int(sys.argv[1]))))
'''
pairs = int(sys.argv[1]) if len(sys.argv) > 1 else 3
steps = sys.argv[2] if len(sys.argv) > 2 else "30"
res = {"off": [], "on": []}
for i in range(pairs):
    for arm in (("off", "on") if i % 2 == 0 else ("on", "off")):
        env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
        if arm == "on":
            env["THP_MEM_ALLOC_ENABLE"] = "1"
        out = subprocess.run([sys.executable, "-c", ONE, steps, str(REPO)], env=env, capture_output=True, text=True, cwd=REPO)
        line = [l for l in out.stdout.splitlines() if l.startswith("{")]
        if not line:
            print(out.stderr[-2000:]); sys.exit(1)
        r = json.loads(line[-1]); res[arm].append(r)
        print(arm, round(r["median_step"] * 1000, 1), "ms median,", round(r["faults_per_step"]), "faults/step,", round(r["peak_rss_mib"]), "MiB", flush=True)
for arm in res:
    print(arm, "median of medians", round(statistics.median(r["median_step"] for r in res[arm]) * 1000, 1))
