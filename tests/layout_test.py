"""The code layout of issue #10: no import cycles, no oversized modules or README.

The import graph is read statically with `ast` from every .py file under
pipeline/, launch/, data/ and configs/ (recursively; data/char_corpus is a
package). Every import statement counts, at module level or inside a function,
a try block or an `if`: `import x.y`, `from x import y` (y may be a submodule),
and relative imports. Only project modules (pipeline.*, launch.*, data.*,
configs.*) are nodes; third-party and stdlib imports are ignored. An import
names the most specific project module it reaches: `from pipeline import
storage` is an edge to pipeline.storage when pipeline/storage.py exists, else
to the package pipeline; an edge to a package means its __init__.py.

Not edges: modules loaded by file path rather than by an import statement
(`importlib.util.spec_from_file_location`, as the TFDS source does to import
data/char_corpus when it is not importable by name), and configs/*.py, which
ml_collections' config_flags loads by path (--config=configs/x.py). A path load can still close a cycle at run time,
so `test_path_loaded_builder_does_not_reach_its_loader` checks that case
explicitly: the modules that path-load char_corpus must not be reachable from
it.
"""

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ('pipeline', 'launch', 'data', 'configs')
SIZE_DIRS = PACKAGES + ('tests',)
MAX_LINES = 450
MAX_CORE_MODULES = 18
MAX_README_BYTES = 12000
PATH_LOADERS = ('spec_from_file_location', 'SourceFileLoader', 'run_path')


def _modules(root, packages=PACKAGES):
  """{dotted module name: file path} for the .py files under root/<package>."""
  mods = {}
  for pkg in packages:
    top = os.path.join(root, pkg)
    for dirpath, dirnames, filenames in os.walk(top):
      dirnames[:] = sorted(d for d in dirnames
                           if not d.startswith('.') and d != '__pycache__')
      for name in sorted(filenames):
        if not name.endswith('.py'):
          continue
        rel = os.path.relpath(os.path.join(dirpath, name), root)
        parts = rel[:-len('.py')].split(os.sep)
        if parts[-1] == '__init__':
          parts = parts[:-1]
        mods['.'.join(parts)] = os.path.join(dirpath, name)
  return mods


def _resolve(name, mods):
  """The longest prefix of dotted `name` that is a project module, or None."""
  parts = name.split('.')
  while parts:
    candidate = '.'.join(parts)
    if candidate in mods:
      return candidate
    parts.pop()
  return None


def _imports(module, path, mods):
  """Project modules imported anywhere in the file (module or function level)."""
  with open(path, encoding='utf-8') as f:
    tree = ast.parse(f.read(), filename=path)
  is_package = os.path.basename(path) == '__init__.py'
  targets = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        target = _resolve(alias.name, mods)
        if target:
          targets.add(target)
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = module.split('.') if is_package else module.split('.')[:-1]
        base = base[:len(base) - (node.level - 1)]
        if node.module:
          base += node.module.split('.')
        base = '.'.join(base)
      else:
        base = node.module
      for alias in node.names:
        # `from x import y`: y is the submodule x.y if that exists, else a name in x.
        target = _resolve(f'{base}.{alias.name}', mods) if alias.name != '*' else None
        target = target or _resolve(base, mods)
        if target:
          targets.add(target)
  targets.discard(module)
  return targets


def import_graph(root, packages=PACKAGES):
  """{module: set of project modules it imports} for the tree under root."""
  mods = _modules(root, packages)
  return {m: _imports(m, p, mods) for m, p in mods.items()}


def path_loaders(root, packages=PACKAGES):
  """Modules that load a file by path (a load that is no import statement)."""
  found = {}
  for module, path in _modules(root, packages).items():
    with open(path, encoding='utf-8') as f:
      source = f.read()
    for node in ast.walk(ast.parse(source, filename=path)):
      if isinstance(node, ast.Call):
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, 'id', '')
        if name in PATH_LOADERS:
          found[module] = source
          break
  return found


def find_cycles(graph):
  """Every import cycle found by a depth-first search, each as a closed path.

  One cycle per back edge, e.g. ['a', 'b', 'a'], starting from its smallest
  name; [] means the graph is acyclic.
  """
  cycles, state, stack = [], {}, []

  def visit(node):
    state[node] = 'open'
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 'open':
        loop = stack[stack.index(nxt):]
        first = loop.index(min(loop))  # print each cycle from its smallest name
        loop = loop[first:] + loop[:first]
        cycles.append(loop + [loop[0]])
      elif nxt not in state:
        visit(nxt)
    stack.pop()
    state[node] = 'done'

  for node in sorted(graph):
    if node not in state:
      visit(node)
  return cycles


def reachable(graph, start):
  seen, todo = set(), [start]
  while todo:
    node = todo.pop()
    for nxt in graph.get(node, ()):
      if nxt not in seen:
        seen.add(nxt)
        todo.append(nxt)
  return seen


def _format(cycles):
  return '\n'.join(' -> '.join(c) for c in cycles)


def test_no_import_cycles():
  cycles = find_cycles(import_graph(REPO))
  assert not cycles, f'{len(cycles)} import cycle(s):\n{_format(cycles)}'


def test_path_loaded_builder_does_not_reach_its_loader():
  graph = import_graph(REPO)
  builder = 'data.char_corpus.char_corpus'
  assert builder in graph
  loaders = [m for m, source in path_loaders(REPO).items() if 'char_corpus' in source]
  assert loaders, 'no module path-loads data/char_corpus any more: update this test'
  from_builder = reachable(graph, builder) | reachable(graph, 'data.char_corpus')
  back = sorted(set(loaders) & from_builder)
  assert not back, (f'{builder} is path-loaded by {back} and its imports reach back '
                    f'to them: a cycle the import graph does not show')


def test_module_sizes():
  too_long = []
  for top in SIZE_DIRS:
    for dirpath, dirnames, filenames in os.walk(os.path.join(REPO, top)):
      dirnames[:] = [d for d in dirnames if not d.startswith('.') and d != '__pycache__']
      for name in filenames:
        if name.endswith('.py'):
          path = os.path.join(dirpath, name)
          with open(path, encoding='utf-8') as f:
            lines = sum(1 for _ in f)
          if lines > MAX_LINES:
            too_long.append(f'{os.path.relpath(path, REPO)}: {lines} lines')
  problems = [f'over {MAX_LINES} lines: {t}' for t in sorted(too_long)]
  core = sorted(n for n in os.listdir(os.path.join(REPO, 'pipeline'))
                if n.endswith('.py') and n != '__init__.py')
  if len(core) > MAX_CORE_MODULES:
    problems.append(f'{len(core)} modules directly under pipeline/ (at most '
                    f'{MAX_CORE_MODULES}): ' + ', '.join(core))
  assert not problems, '\n'.join(problems)


def test_readme_stays_short():
  # README is for a new user; measured tables and operator detail go to BUILD.md.
  size = os.path.getsize(os.path.join(REPO, 'README.md'))
  assert size < MAX_README_BYTES, (f'README.md is {size} bytes, over the {MAX_README_BYTES} '
                                   'for a new user: move detail to BUILD.md')


def _write(root, rel, text=''):
  path = root / rel
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)


def test_cycle_detector_finds_a_function_level_cycle(tmp_path):
  _write(tmp_path, 'pipeline/__init__.py')
  _write(tmp_path, 'pipeline/a.py', 'import os\nfrom pipeline import b\n')
  _write(tmp_path, 'pipeline/b.py', 'def f():\n  from . import a\n  return a\n')
  _write(tmp_path, 'pipeline/c.py', 'import pipeline.a\nimport numpy\n')
  graph = import_graph(str(tmp_path), packages=('pipeline',))
  assert graph == {'pipeline': set(), 'pipeline.a': {'pipeline.b'},
                   'pipeline.b': {'pipeline.a'}, 'pipeline.c': {'pipeline.a'}}
  assert find_cycles(graph) == [['pipeline.a', 'pipeline.b', 'pipeline.a']]
  assert _format(find_cycles(graph)) == 'pipeline.a -> pipeline.b -> pipeline.a'


def test_cycle_detector_resolves_names_packages_and_relative_imports(tmp_path):
  _write(tmp_path, 'pipeline/__init__.py')
  _write(tmp_path, 'pipeline/cloud/__init__.py', 'from .plan import X\n')
  _write(tmp_path, 'pipeline/cloud/plan.py',
         'try:\n  from ..storage import read\nexcept ImportError:\n  pass\n')
  _write(tmp_path, 'pipeline/storage.py', 'from pipeline import cloud\n')
  _write(tmp_path, 'launch/__init__.py')
  _write(tmp_path, 'launch/x.py', 'from pipeline import ROOT, storage\n')
  graph = import_graph(str(tmp_path), packages=('pipeline', 'launch'))
  assert graph['pipeline.cloud'] == {'pipeline.cloud.plan'}
  assert graph['pipeline.cloud.plan'] == {'pipeline.storage'}
  assert graph['launch.x'] == {'pipeline', 'pipeline.storage'}
  assert find_cycles(graph) == [
      ['pipeline.cloud', 'pipeline.cloud.plan', 'pipeline.storage', 'pipeline.cloud']]


def test_acyclic_tree_passes(tmp_path):
  _write(tmp_path, 'pipeline/__init__.py')
  _write(tmp_path, 'pipeline/a.py', 'from pipeline import b\n')
  _write(tmp_path, 'pipeline/b.py', 'import tensorflow\n')
  assert find_cycles(import_graph(str(tmp_path), packages=('pipeline',))) == []


if __name__ == '__main__':
  pytest.main([__file__, '-v'])
