"""What a module pulls in when imported, checked in a fresh interpreter (this one has imported everything)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

REWARD_WITHOUT_TRANSFORMERS = """
import sys
for name in ("transformers", "tokenizers", "diffusers"):
    sys.modules[name] = None  # any import of them now raises ImportError
import torch
import reward
r = reward.build_reward("pixel")
assert isinstance(r, reward.PixelReward)
video = torch.randint(0, 256, (2, 4, 8, 8, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
scores = r.score(video, ["a", "b"])
assert list(scores) == r.dims and all(s.shape == (2,) and torch.isfinite(s).all() for s in scores.values())
print("ok")
"""


def test_reward_imports_and_scores_pixels_without_transformers_tokenizers_or_diffusers():
    """The learned rewards are imported when built (reward.REWARDS is lazy): a run on the pixel reward, and every
    tool that only names rewards, needs none of their libraries."""
    out = subprocess.run([sys.executable, "-c", REWARD_WITHOUT_TRANSFORMERS], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert out.returncode == 0 and out.stdout == "ok\n", out.stderr[-3000:]


METHODS_WITH_TORCH_ALONE = """
import sys
for name in ("transformers", "tokenizers", "diffusers", "peft", "safetensors", "av"):
    sys.modules[name] = None
import torch
import dpo, grpo, baselines
# Eq. 3 on equal errors is log 2; one SDE step of a zero velocity keeps the mean at z (1 + std^2 dt / (2 s))
e = torch.rand(3)
loss, _ = dpo.segment_dpo_loss(e[:, None], e[:, None], e[:, None], e[:, None], torch.ones(3, 1), 500.0)
assert abs(loss.item() - 0.6931471805599453) < 1e-6, loss
z = torch.randn(2, 3, 2, 4, 4)
prev, log_prob, mean = grpo.sde_step(z, torch.zeros_like(z), [1.0, 0.5, 0.0], 1, 0.7, noise=torch.randn_like(z))
assert prev.shape == z.shape and log_prob.shape == (2,) and torch.isfinite(log_prob).all()
print("ok")
"""


def test_the_methods_import_and_run_with_torch_alone():
    """dpo.py, grpo.py and baselines.py copy into another codebase with torch as their only library: what they
    need of a model, a reward or the job comes in through their arguments."""
    out = subprocess.run([sys.executable, "-c", METHODS_WITH_TORCH_ALONE], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert out.returncode == 0 and out.stdout == "ok\n", out.stderr[-3000:]


def local_imports(path: str, modules: set[str]) -> set[str]:
    """Every project module a file imports, at its top or inside a function (`import x`, `from x import y`)."""
    import ast

    tree = ast.parse(open(path).read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & modules


def test_no_import_cycle_counting_imports_inside_functions():
    """The modules can be read, copied and moved apart one by one: the project's import graph is acyclic. (The
    registries name toy.py, diffusers_models.py and the learned rewards by string and import them on first use.)"""
    files = {f[:-3]: os.path.join(ROOT, f) for f in os.listdir(ROOT) if f.endswith(".py")}
    graph = {m: local_imports(path, set(files)) - {m} for m, path in files.items()}
    state = {}

    def visit(m: str, path: list[str]):
        if state.get(m) == "open":
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
        if state.get(m) is None:
            state[m] = "open"
            for n in sorted(graph[m]):
                visit(n, path + [m])
            state[m] = "done"

    for m in sorted(graph):
        visit(m, [])
