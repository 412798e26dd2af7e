"The package's layout: no module imports another in a cycle (imports inside functions count: a lazy import hides one)"
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]/'res2netplus'

def module_name(path:Path, root:Path=PACKAGE) -> str:
    parts = list(path.relative_to(root.parent).with_suffix('').parts)
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)

def imported(node, package:str) -> list:
    "The module names an import statement may load: `from .x import y` names `x` and, if it is a submodule, `x.y`"
    if isinstance(node, ast.Import): return [a.name for a in node.names]
    if node.level:
        base = package.split('.')[:len(package.split('.')) - node.level + 1]
        module = '.'.join(base + ([node.module] if node.module else []))
    else: module = node.module
    return [module] + [f'{module}.{a.name}' for a in node.names]

def import_graph(root:Path=PACKAGE) -> dict:
    "Each module of the package, and the modules of the package it imports anywhere in its file"
    paths = {module_name(p, root): p for p in root.rglob('*.py')}
    graph = {}
    for name, path in paths.items():
        package = name if path.name == '__init__.py' else name.rpartition('.')[0]
        nodes = [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, (ast.Import, ast.ImportFrom))]
        graph[name] = {m for n in nodes for m in imported(n, package) if m in paths and m != name}
    return graph

def find_cycle(graph:dict):
    "A list of modules that import each other in a circle (first = last), or None"
    state, stack = {}, []
    def visit(m):
        state[m] = 'open'; stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 'open': return stack[stack.index(n):] + [n]
            if n not in state and (cycle := visit(n)): return cycle
        state[m] = 'done'; stack.pop()
    for m in sorted(graph):
        if m not in state and (cycle := visit(m)): return cycle
    return None

def test_the_graph_sees_relative_absolute_and_lazy_imports(tmp_path):
    graph = import_graph()
    assert 'res2netplus.detection.cascade' in graph['res2netplus.detection.learner']  # from .cascade import …
    assert 'res2netplus.detection.train' in graph['res2netplus.detection']  # from . import train
    assert 'res2netplus.models' in graph['res2netplus.detection.backbone']  # from ..models import …
    pkg = tmp_path/'pkg'; (pkg/'sub').mkdir(parents=True)
    for f in ('__init__.py', 'sub/__init__.py'): (pkg/f).write_text('')
    (pkg/'a.py').write_text('def f():\n    from pkg.sub import b\n')  # inside a function, absolute
    (pkg/'sub'/'b.py').write_text('from ..a import f\n')
    lazy = import_graph(pkg)
    assert lazy['pkg.a'] == {'pkg.sub', 'pkg.sub.b'} and lazy['pkg.sub.b'] == {'pkg.a'}
    assert find_cycle(lazy) == ['pkg.a', 'pkg.sub.b', 'pkg.a']
    assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
    assert find_cycle({'a': {'b'}, 'b': set(), 'c': {'a', 'b'}}) is None

def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, 'modules import each other in a circle: ' + ' -> '.join(cycle)
