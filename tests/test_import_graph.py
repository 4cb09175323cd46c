"""The import graph flows one way (ast over every import, including those inside functions).

main -> lora_jax.run -> {data, eval, lora_jax.train, lora_jax.serve} -> lora_jax.{io, model, lora}
-> sharding -> errors / multihost. Inside lora_jax an import between two wings must point to a lower
rank; eval/ and data/ never import lora_jax; lora_jax never imports configs/ or launch/; configs/ reads
only the jax-free arm table (and data.datasets), so `import configs.base` loads no jax.
"""

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("lora_jax", "eval", "data", "configs", "launch")
MAX_TOP_LEVEL = 8  # modules directly in lora_jax/, beside its wings
# What "down" means between the wings of lora_jax (an import must go to a strictly lower rank).
RANKS = {
    "lora_jax.run": 6,  # the only wing that imports data/ and eval/
    "lora_jax.train": 5,
    "lora_jax.serve": 5,  # same rank as train: neither imports the other
    "lora_jax.io": 4,
    "lora_jax.model": 3,
    "lora_jax.lora": 2,
    "lora_jax.sharding": 1,
    "lora_jax.errors": 0,
    "lora_jax.multihost": 0,
}
CONFIGS_MAY_IMPORT = ("lora_jax", "lora_jax.lora", "lora_jax.lora.arms", "lora_jax.errors", "data", "data.datasets")


def modules(root: str) -> dict[str, str]:
    """Dotted module name -> file, for every .py under the project's packages."""
    found = {}
    for pkg in PACKAGES:
        for d, _, files in os.walk(os.path.join(root, pkg)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(d, f)
                    name = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
                    found[name.removesuffix(".__init__")] = path
    return found


def import_graph(root: str) -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere in its file (module level or in a function)."""
    mods = modules(root)

    def resolve(name):  # the longest project module a dotted name starts with
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    edges = {m: set() for m in mods}
    for m, path in mods.items():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        pkg = m if path.endswith("__init__.py") else m.rpartition(".")[0]
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for n in names:
                t = resolve(n)
                if t and t != m and not m.startswith(t + "."):  # a package's own __init__ is not an edge
                    edges[m].add(t)
    return edges


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10_000))
    try:
        for v in sorted(edges):
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)
    return found


def wing(module: str) -> str | None:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in RANKS:
            return ".".join(parts[:n])
    return None


def wrong_way(edges: dict[str, set[str]]) -> list[str]:
    """Every import that points up or sideways, as 'a imports b: why'."""
    top = lambda m: m.split(".")[0]  # noqa: E731
    bad = []
    for m in sorted(edges):
        for t in sorted(edges[m]):
            why = None
            if top(m) in ("eval", "data") and top(t) == "lora_jax":
                why = f"{top(m)}/ never imports lora_jax (it receives callables)"
            elif top(m) == "data" and top(t) == "eval":
                why = "data/ comes before eval/"
            elif top(m) == "lora_jax" and top(t) in ("configs", "launch"):
                why = "lora_jax never imports configs/ or launch/"
            elif top(m) == "launch" and top(t) == "lora_jax":
                why = "launch/ builds commands; it never imports lora_jax"
            elif top(m) == "configs" and top(t) == "lora_jax" and t not in CONFIGS_MAY_IMPORT:
                why = "configs/ stay jax-free: only lora_jax.lora.arms"
            elif top(m) == "lora_jax" and top(t) in ("data", "eval") and wing(m) != "lora_jax.run":
                why = "only lora_jax.run imports data/ and eval/"
            elif top(m) == "lora_jax" and top(t) == "lora_jax":
                a, b = wing(m), wing(t)
                if a and b and a != b and RANKS[b] >= RANKS[a]:
                    why = f"{b} (rank {RANKS[b]}) is not below {a} (rank {RANKS[a]})"
            if why:
                bad.append(f"{m} imports {t}: {why}")
    return bad


@pytest.fixture(scope="module")
def graph():
    return import_graph(ROOT)


def test_no_circles(graph):
    assert circles(graph) == []


def test_imports_point_down(graph):
    assert wrong_way(graph) == []


def test_every_lora_jax_module_is_in_a_wing(graph):
    loose = [m for m in graph if m.startswith("lora_jax.") and wing(m) is None]
    assert loose == []


def test_lora_jax_has_at_most_eight_top_level_modules():
    lj = os.path.join(ROOT, "lora_jax")
    flat = [f for f in os.listdir(lj) if f.endswith(".py") and f != "__init__.py"]
    assert len(flat) <= MAX_TOP_LEVEL, flat
    wings = {d for d in os.listdir(lj) if os.path.exists(os.path.join(lj, d, "__init__.py"))}
    assert {f"lora_jax.{w}" for w in wings} <= set(RANKS)


def test_configs_load_no_jax():
    code = (
        "import sys, configs.base, launch.sweep; "
        "bad = sorted({m.split('.')[0] for m in sys.modules} & {'jax', 'flax', 'tensorflow', 'optax', 'orbax'}); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_the_walk_sees_imports_inside_functions_and_each_rule(tmp_path):
    """The checks catch what they claim on a planted tree: a circle hidden in a function body, an
    upward import between wings, eval importing lora_jax, lora_jax importing configs."""

    def write(path, text=""):
        p = tmp_path / path
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)

    for pkg in ("lora_jax", "lora_jax/lora", "lora_jax/model", "eval", "configs"):
        write(f"{pkg}/__init__.py")
    write("lora_jax/model/a.py", "def f():\n    from lora_jax.lora import b\n")
    write("lora_jax/lora/b.py", "import lora_jax.model.a\nfrom configs import c\n")
    write("eval/e.py", "from lora_jax.lora.b import x\n")
    write("configs/c.py")
    edges = import_graph(str(tmp_path))
    assert circles(edges) == [["lora_jax.lora.b", "lora_jax.model.a"]]
    assert set(wrong_way(edges)) == {
        "eval.e imports lora_jax.lora.b: eval/ never imports lora_jax (it receives callables)",
        "lora_jax.lora.b imports configs: lora_jax never imports configs/ or launch/",
        "lora_jax.lora.b imports configs.c: lora_jax never imports configs/ or launch/",
        "lora_jax.lora.b imports lora_jax.model.a: lora_jax.model (rank 3) is not below lora_jax.lora (rank 2)",
    }
