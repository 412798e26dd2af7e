"""Run each tests/test_*.py in its own pytest process and print one total.

One process for the whole suite grows past the 24 GB of a CI machine: fastai's U-Net on a 2048-channel body has
339 M parameters, and what earlier files leave in the allocator adds up. A fresh process per file returns it."""
import re, subprocess, sys, time
from pathlib import Path

def main(args) -> int:
    "`args`: test files to run (default: all of tests/), then options for pytest"
    files = [Path(a) for a in args if a.endswith('.py')] or sorted(Path('tests').glob('test_*.py'))
    args = [a for a in args if not a.endswith('.py')]
    totals, bad, start = dict(passed=0, failed=0, skipped=0, errors=0), [], time.time()
    for f in files:
        t = time.time()
        r = subprocess.run([sys.executable, '-m', 'pytest', str(f), '-q', '-p', 'no:cacheprovider', *args], capture_output=True, text=True)
        out = r.stdout + r.stderr
        last = next((l for l in reversed(out.strip().splitlines()) if re.search(r'\d+ (passed|failed|skipped|error)', l)), '')
        counts = {k: int(n) for n, k in re.findall(r'(\d+) (passed|failed|skipped|error)', last)}
        counts['errors'] = counts.pop('error', 0)
        for k in totals: totals[k] += counts.get(k, 0)
        if r.returncode not in (0, 5) or counts.get('failed') or counts['errors']:
            bad.append(str(f)); print(out[-6000:])
            if r.returncode not in (0, 1, 5) and not (counts.get('failed') or counts['errors']): totals['errors'] += 1  # killed, crashed
        print(f"{f}: {last.strip('= ') or f'exit status {r.returncode}'} ({time.time() - t:.0f} s)", flush=True)
    secs = time.time() - start
    print(f"{len(files)} files in {secs:.0f} s" + (f"; failing: {', '.join(bad)}" if bad else ''))
    # the summed counts, first as pytest closes a run, then as the plain 'N passed, N failed' line
    parts = [f'{totals[k]} {k}' for k in ('failed', 'passed', 'skipped', 'errors') if totals[k]]
    h, m = divmod(int(secs) // 60, 60)
    print(f"{'=' * 20} {', '.join(parts) or 'no tests ran'} in {secs:.2f}s ({h}:{m:02d}:{int(secs) % 60:02d}) {'=' * 20}")
    print(f"{totals['passed']} passed, {totals['failed'] + totals['errors']} failed, {totals['skipped']} skipped")
    return 1 if bad else 0

if __name__ == '__main__': sys.exit(main(sys.argv[1:]))
