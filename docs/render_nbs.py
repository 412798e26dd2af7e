"""Execute the notebooks in `nbs/` as `nbdev-test` does and write them as Markdown pages for MkDocs.

Every notebook found under `nbs/` (recursively, skipping names that start with `_` or `.`, as nbdev does) becomes a
page in `_build/docs/`: `nbs/index.ipynb` the landing page, `nbs/<name>.ipynb` a "how it works" page, and
`nbs/<folder>/<name>.ipynb` a page of that folder (`tutorials/`). Cells run in the notebook's folder, in a fresh
process per notebook, skipping what nbdev-test skips (`#| eval: false`, the `tst_flags` cells); a failing cell fails
the build. nbdev directives are applied and their lines removed: `#| hide` and `#| include: false` cells are left
out, `#| echo: false` shows only the output, `#| output: false` only the code, and exported code is folded.
Executed cells are cached in `_build/cache/` by the notebook's and the package's content, so a rebuild with no
change runs nothing.
"""
from __future__ import annotations
import argparse, hashlib, json, os, re, sys, time, base64
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NBS, OUT, CACHE = ROOT/'nbs', ROOT/'_build'/'docs', ROOT/'_build'/'cache'
REPO_URL = 'https://github.com/res2netplus/res2netplus/blob/main/'
MAX_OUTPUT_LINES = 40
SECTIONS = {'how-it-works': ('How it works', 'One page per module notebook, executed: the prose, the code and '
                             'the tests that define the package (the notebooks in `nbs/` are its source).'),
            'tutorials': ('Tutorials', 'One task each, end to end, on the bundled or generated data; each runs '
                          'in about a minute on two CPU cores.')}


def find_notebooks() -> list[Path]:
    "The notebooks nbdev-test runs: `nbs/**/*.ipynb`, leaving out names starting with `_` or `.`"
    def skipped(p: Path) -> bool: return any(s.startswith(('_', '.')) for s in p.relative_to(NBS).parts)
    return sorted(p for p in NBS.rglob('*.ipynb') if not skipped(p))


def page_path(nb: Path) -> Path:
    "Where notebook `nb` lands in the site, relative to the docs root"
    rel = nb.relative_to(NBS)
    if rel == Path('index.ipynb'): return Path('index.md')
    return (Path('how-it-works')/rel if len(rel.parts) == 1 else rel).with_suffix('.md')


# ---------------------------------------------------------------- execution (in a worker process per notebook)

def execute(nb_path: str) -> dict:
    "Run the cells of `nb_path` that nbdev-test runs; the cells with their outputs, or the error's traceback"
    import warnings
    warnings.filterwarnings('ignore', category=FutureWarning)  # fastai's torch.jit warning, on every import
    warnings.filterwarnings('ignore', message='load_learner` uses')  # fastai's pickle warning: the pages say it
    from execnb.shell import CaptureShell
    from fastcore.xtras import working_directory
    from nbdev.config import get_config
    from nbdev.process import NBProcessor
    from nbdev.test import nb_test_cells
    fn, start = Path(nb_path), time.time()
    flags = get_config().tst_flags
    run_ids = {c.id for c in nb_test_cells(fn, skip_flags=flags.split() if isinstance(flags, str) else flags)}
    nb = NBProcessor(fn, rm_directives=False, process=True).nb
    shell, slowest = CaptureShell(fn), []
    os.environ['IN_TEST'] = '1'  # as under nbdev-test
    try:
        with working_directory(fn.parent):
            shell.run_all(nb, exc_stop=True, preproc=lambda c: c.id not in run_ids, postproc=slowest.append,
                          cell_timeout=get_config().get('cell_timeout') or None)
    except BaseException:
        import traceback
        return dict(error=shell.prettytb(fname=fn) or traceback.format_exc())
    cells = [dict(cell_type=c.cell_type, source=c.source, directives=dict(getattr(c, 'directives_', {}) or {}),
                  outputs=list(c.get('outputs', []))) for c in nb.cells]
    slow = max(slowest, key=lambda c: c.metadata.get('execution', {}).get('total', 0), default=None)
    slow = f"cell {getattr(slow, 'idx_', '?')} {slow.metadata['execution']['total']:.0f} s" if slow is not None else ''
    return dict(cells=json.loads(json.dumps(cells, default=str)), seconds=time.time() - start, slowest=slow)


def cache_key(nb: Path) -> str:
    "Changes when the notebook, the package or the tests' flags change"
    h = hashlib.sha256(nb.read_bytes())
    for p in sorted((ROOT/'res2netplus').rglob('*')):
        if p.is_file() and p.suffix in ('.py', '.cpp', '.npz'): h.update(p.as_posix().encode() + p.read_bytes())
    h.update((ROOT/'pyproject.toml').read_bytes())
    return h.hexdigest()


def execute_all(nbs: list[Path], workers: int) -> dict[Path, dict]:
    "Executed cells for every notebook, from the cache where it is current; exits 1 naming each failing notebook"
    results, todo = {}, []
    for nb in nbs:
        cached = CACHE/nb.relative_to(NBS).with_suffix('.json')
        if cached.exists() and (c := json.loads(cached.read_text())).get('key') == cache_key(nb): results[nb] = c
        else: todo.append(nb)
    print(f'docs: {len(nbs) - len(todo)} notebook(s) cached, executing {len(todo)} with {workers} worker(s)',
          flush=True)
    failed = []
    with ProcessPoolExecutor(workers, max_tasks_per_child=1) as pool:
        for nb, res in zip(todo, pool.map(execute, map(str, todo))):
            if 'error' in res:
                failed.append(nb)
                print(f'docs: {nb.relative_to(ROOT)} failed:\n{res["error"]}', file=sys.stderr, flush=True)
                continue
            print(f'docs: executed {nb.relative_to(ROOT)} in {res["seconds"]:.0f} s (slowest: {res["slowest"]})',
                  flush=True)
            res['key'] = cache_key(nb)
            cached = CACHE/nb.relative_to(NBS).with_suffix('.json')
            cached.parent.mkdir(parents=True, exist_ok=True)
            cached.write_text(json.dumps(res))
            results[nb] = res
    if failed:
        names = ', '.join(str(f.relative_to(ROOT)) for f in failed)
        sys.exit(f'docs: {len(failed)} notebook(s) failed: {names} (tracebacks above; `nbdev-test PATH` reruns one)')
    return results


# ---------------------------------------------------------------- Markdown

ANSI = re.compile(r'\x1b\[[0-9;]*[A-Za-z]')
DIRECTIVE = re.compile(r'^\s*#\s*\|')
# Python's warnings on stderr: "file.py:N: SomeWarning: message" (maybe several lines), then "  source line"
WARNING = re.compile(r'^\S+\.py:\d+: \w*Warning: .*?\n  .*?(?:\n|$)', re.MULTILINE | re.DOTALL)


def strip_directives(source: str) -> str:
    lines = source.splitlines()
    while lines and DIRECTIVE.match(lines[0]): lines.pop(0)
    return '\n'.join(lines).strip('\n')


def fence(text: str, lang: str = '') -> str:
    ticks = '`' * max(3, 1 + max((len(m) for m in re.findall(r'`+', text)), default=0))
    return f'{ticks}{lang}\n{text}\n{ticks}'


def shorten(text: str) -> str:
    "Long outputs keep their head and tail"
    lines = text.rstrip('\n').splitlines()
    if len(lines) <= MAX_OUTPUT_LINES: return '\n'.join(lines)
    cut = len(lines) - MAX_OUTPUT_LINES + 5
    return '\n'.join(lines[:MAX_OUTPUT_LINES - 10] + [f'… ({cut} lines left out)'] + lines[-5:])


def render_outputs(outputs: list, files_dir: Path, stem: str, idx: int) -> list[str]:
    "Markdown for a cell's outputs: streams and text as code blocks, images as files, HTML as it is"
    parts, streams = [], {}
    for i, out in enumerate(outputs):
        kind = out.get('output_type')
        if kind == 'stream':
            streams.setdefault(out.get('name', 'stdout'), []).append(''.join(out.get('text', '')))
            continue
        if kind == 'error':
            text = ANSI.sub('', '\n'.join(out.get('traceback', [])))
            parts.append(fence(shorten(text), 'text'))
            continue
        data = out.get('data', {})
        if 'image/png' in data:
            name = f'{stem}_{idx}_{i}.png'
            files_dir.mkdir(parents=True, exist_ok=True)
            (files_dir/name).write_bytes(base64.b64decode(''.join(data['image/png'])))
            parts.append(f'![output]({files_dir.name}/{name})')
        elif 'text/html' in data:
            html = ''.join(data['text/html']).strip()
            html = re.sub(r'<style[^>]*>.*?</style>', '', html, flags=re.DOTALL)  # fastprogress's page-wide styles
            if html: parts.append(f'<div class="nb-html">\n{html}\n</div>')
        elif 'text/markdown' in data: parts.append(''.join(data['text/markdown']))
        elif 'text/plain' in data: parts.append(fence(shorten(ANSI.sub('', ''.join(data['text/plain']))), 'text'))
    for text in streams.values():
        text = WARNING.sub('', ANSI.sub('', ''.join(text)))
        text = re.sub(r'[^\n]*\r(?!\n)', '', text)  # progress lines rewritten in place: keep the last state
        if text.strip(): parts.insert(0, fence(shorten(text), 'text'))
    return parts


def render_math(md: str) -> str:
    "`$$…$$` as MathML, which browsers draw without scripts"
    from latex2mathml.converter import convert
    def mathml(m): return '\n\n' + convert(m.group(1).strip(), display='block') + '\n\n'
    return re.sub(r'\$\$(.+?)\$\$', mathml, md, flags=re.DOTALL)


def rewrite_links(md: str, nb: Path) -> str:
    "Links to notebooks point at their pages, links to other files of the repository at GitHub"
    page = page_path(nb)

    def fix(m):
        target = m.group(2)
        if re.match(r'^[a-z]+:|^#|^/', target): return m.group(0)
        path, _, anchor = target.partition('#')
        src = (nb.parent/path).resolve()
        if src.suffix == '.ipynb' and src.is_relative_to(NBS):
            rel = os.path.relpath(page_path(src), page.parent)
        elif src.is_relative_to(ROOT/'docs'): rel = os.path.relpath(src.relative_to(ROOT/'docs'), page.parent)
        elif src.is_relative_to(ROOT) and src.exists(): rel = REPO_URL + src.relative_to(ROOT).as_posix()
        else: return m.group(0)
        return f'{m.group(1)}({rel}{"#" + anchor if anchor else ""})'
    return re.sub(r'(\]\s*)\(([^)\s]+)\)', fix, md)


def defined_names(source: str) -> list[str]:
    "The public functions, classes and constants an exported cell defines, for its folded block's title"
    import ast
    try: tree = ast.parse(source)
    except SyntaxError: return []
    names = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    names += [t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)]
    return [n for n in names if not n.startswith('_')][:6]


def render_page(nb: Path, cells: list[dict]) -> str:
    page = page_path(nb)
    files_dir = OUT/page.parent/(page.stem + '_files')
    module = ''
    blocks = []
    for idx, cell in enumerate(cells):
        d = cell['directives']
        if 'default_exp' in d: module = 'res2netplus.' + d['default_exp'].strip()
        if cell['cell_type'] == 'markdown':
            blocks.append(rewrite_links(render_math(cell['source']), nb))
            continue
        if cell['cell_type'] != 'code' or 'hide' in d or str(d.get('include', '')).strip() == 'false': continue
        source = strip_directives(cell['source'])
        code = []
        if source and str(d.get('echo', '')).strip() != 'false':
            exported = {'export', 'exporti', 'exports'} & d.keys()
            if exported:
                target = next((d[k].strip() for k in exported if d[k].strip()), '') or module
                target = target if target.startswith('res2netplus') else 'res2netplus.' + target
                mark = '???+' if 'exports' in d else '???'
                names = ', '.join(f'`{n}`' for n in defined_names(source)) or 'Code'
                code.append(f'{mark} abstract "{names}, exported to `{target}`"\n\n'
                            + '\n'.join('    ' + line if line else '' for line in fence(source, 'python').splitlines()))
            else: code.append(fence(source, 'python'))
        shown = str(d.get('output', '')).strip() != 'false'
        outs = render_outputs(cell['outputs'], files_dir, page.stem, idx) if shown else []
        if outs: code.append('<div class="nb-output" markdown>\n\n' + '\n\n'.join(outs) + '\n\n</div>')
        blocks.extend(code)
    source = nb.relative_to(ROOT).as_posix()
    foot = (f'<p class="nb-source">Source: <a href="{REPO_URL}{source}">{source}</a></p>\n\n'
            f'<!-- generated from {source} by docs/render_nbs.py: edit the notebook -->')  # after the title: MkDocs
    return '\n\n'.join(blocks) + '\n\n' + foot + '\n'                                  # takes a leading H1 only


def title_and_summary(cells: list[dict]) -> tuple[str, str]:
    md = next((c['source'] for c in cells if c['cell_type'] == 'markdown'), '')
    title = next((l[2:].strip() for l in md.splitlines() if l.startswith('# ')), '')
    summary = next((l[1:].strip() for l in md.splitlines() if l.startswith('>')), '')
    return title, summary


def section_index(folder: str, pages: list[tuple[Path, str, str]]) -> str:
    name, intro = SECTIONS.get(folder, (folder.replace('-', ' ').capitalize(), ''))
    lines = [f'# {name}', '', intro, '']
    lines += [f'- [{title or p.stem}]({p.name}){": " + summary if summary else ""}' for p, title, summary in pages]
    return '\n'.join(lines) + '\n'


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--workers', type=int, default=int(os.environ.get('DOCS_WORKERS', min(os.cpu_count() or 1, 2))))
    args = ap.parse_args()
    os.environ.setdefault('PYTHONWARNINGS', 'ignore::FutureWarning')
    nbs = find_notebooks()
    start = time.time()
    results = execute_all(nbs, args.workers)
    import shutil
    shutil.rmtree(OUT, ignore_errors=True)
    sections: dict[str, list] = {}
    for nb in nbs:
        page, cells = page_path(nb), results[nb]['cells']
        (OUT/page).parent.mkdir(parents=True, exist_ok=True)
        (OUT/page).write_text(render_page(nb, cells))
        if page.parent != Path('.'):
            sections.setdefault(page.parent.as_posix(), []).append((page, *title_and_summary(cells)))
    for folder, pages in sections.items(): (OUT/folder/'index.md').write_text(section_index(folder, pages))
    print(f'docs: {len(nbs)} notebook pages in {OUT.relative_to(ROOT)} ({time.time() - start:.0f} s)')


if __name__ == '__main__': main()
