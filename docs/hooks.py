"""MkDocs hooks: the pages generated at build time, and the navigation over what is there.

- `_build/docs/` (written by `docs/render_nbs.py`: the executed notebooks) joins the hand-written pages of `docs/`;
- `api/<module>.md` is written for every module found under `res2netplus/` (`_modidx.py` and other `_` names left
  out), so the API reference follows the package as modules move;
- a nav entry `folder/*` in mkdocs.yml becomes that folder's index page followed by its pages, sorted by file name.
"""
from __future__ import annotations
import ast
from pathlib import Path
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ROOT/'_build'/'docs'
PACKAGE = ROOT/'res2netplus'


def modules() -> list[str]:
    "Dotted names of the package's modules, from the files present; a package is named by its `__init__.py`"
    names = []
    for p in sorted(PACKAGE.rglob('*.py')):
        rel = p.relative_to(ROOT).with_suffix('')
        parts = rel.parts[:-1] if rel.name == '__init__' else rel.parts
        if any(s.startswith('_') for s in parts) or '__pycache__' in p.parts: continue
        if rel.name == '__init__' and not _defines_anything(p): continue  # a package that only imports
        names.append('.'.join(parts))
    return names


def _defines_anything(path: Path) -> bool:
    "Whether a module defines functions, classes or variables (dunders aside), rather than only importing"
    tree = ast.parse(path.read_text())
    return any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Assign, ast.AnnAssign))
               and not (isinstance(n, ast.Assign) and all(getattr(t, 'id', '').startswith('__') for t in n.targets))
               for n in tree.body)


def _module_file(name: str) -> Path:
    p = ROOT.joinpath(*name.split('.'))
    return p.with_suffix('.py') if p.with_suffix('.py').exists() else p/'__init__.py'  # res2netplus/data/ holds data


def api_page(name: str) -> str:
    "`::: name`; a module that only re-exports (like `all.py`) gets its docstring, not every imported name"
    if _defines_anything(_module_file(name)):
        return f'# `{name}`\n\n::: {name}\n    options:\n      show_root_heading: false\n'
    return (f'# `{name}`\n\n::: {name}\n    options:\n      show_root_heading: false\n      members: false\n\n'
            'It only re-exports: its names are documented in the modules they come from.\n')


def api_index(names: list[str]) -> str:
    lines = ['# API reference', '', 'Generated at build time from the docstrings of every module in `res2netplus/`.',
             '`from res2netplus.all import *` imports every public name below (and `fastai.vision.all`).', '']
    for name in names:
        doc = ast.get_docstring(ast.parse(_module_file(name).read_text())) or ''
        summary = doc.strip().split('\n\n')[0].replace('\n', ' ')
        lines.append(f'- [`{name}`]({name}.md){": " + summary if summary else ""}')
    return '\n'.join(lines) + '\n'


def on_files(files, config):
    if not (GENERATED/'index.md').exists():
        raise SystemExit('docs: _build/docs/ is missing: run `bash scripts/docs.sh` (it renders the notebooks first)')
    for p in sorted(GENERATED.rglob('*')):
        if p.is_file():
            files.append(File(p.relative_to(GENERATED).as_posix(), src_dir=str(GENERATED),
                              dest_dir=config['site_dir'], use_directory_urls=config['use_directory_urls']))
    names = modules()
    files.append(File.generated(config, 'api/index.md', content=api_index(names)))
    for name in names: files.append(File.generated(config, f'api/{name}.md', content=api_page(name)))
    config['nav'] = _expand(config['nav'], files)
    return files


def _expand(nav, files):
    "Replace `folder/*` entries by the folder's index and pages"
    out = []
    for item in nav:
        if isinstance(item, dict):
            (title, value), = item.items()
            out.append({title: _expand(value, files) if isinstance(value, list) else _glob(value, files)})
        else: out.append(item)
    return out


def _glob(value, files):
    if not (isinstance(value, str) and value.endswith('/*')): return value
    folder = value[:-1]
    pages = sorted(f.src_uri for f in files if f.src_uri.startswith(folder) and f.src_uri.endswith('.md')
                   and '/' not in f.src_uri[len(folder):])
    index = folder + 'index.md'
    return ([index] if index in pages else []) + [p for p in pages if p != index]
