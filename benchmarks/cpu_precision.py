"""Training-step time on a CPU in bf16 autocast against float32, for Res2NetPlus-50 and torchvision's resnet50, in one
interleaved run: what `precision='bf16'` (`CPUAutocast`) and `res2netplus train --precision auto` buy on a CPU that
computes bf16 natively (AVX512-BF16 or AMX), and what they cost on one that emulates it. Medians over the rounds; the
ratio is bf16 time / float32 time of the same model and shape, so load on the machine affects both alike.

    python benchmarks/cpu_precision.py                  # batch 64 and 128 at 32 px (the main job), 8 at 224 px
    python benchmarks/cpu_precision.py --rounds 2       # quicker
"""
import argparse, statistics, time, warnings
import torch
import torch.nn.functional as F
import torchvision
from res2netplus.models import res2netplus50
from res2netplus.learner import native_bf16

SHAPES = [(64, 32), (128, 32), (8, 224)]  # (batch, pixels)

def _step_fn(arch:str, bs:int, size:int, bf16:bool):
    torch.manual_seed(0)
    model = res2netplus50(n_out=10) if arch == 'res2netplus50' else torchvision.models.resnet50(num_classes=10)
    model = model.to(memory_format=torch.channels_last).train()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    x = torch.randn(bs, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (bs,))
    def step():
        opt.zero_grad()
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x), y)
        loss.backward(); opt.step()
    return step

def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--iters', type=int, default=3, help='steps timed per round')
    p.add_argument('--threads', type=int, default=2)
    args = p.parse_args()
    warnings.filterwarnings('ignore')
    torch.set_num_threads(args.threads)
    print(f"CPU computes bf16 natively: {native_bf16('cpu')}; {args.threads} threads, {args.rounds} rounds\n")
    print('| model | batch × px | float32 ms/step | bf16 ms/step | bf16 / float32 |')
    print('|---|---|---:|---:|---:|')
    for bs, size in SHAPES:
        for arch in ('res2netplus50', 'resnet50'):
            steps = {bf16: _step_fn(arch, bs, size, bf16) for bf16 in (False, True)}
            for step in steps.values(): step()  # warm-up: oneDNN picks its kernels
            times = {False: [], True: []}
            for _ in range(args.rounds):
                for bf16, step in steps.items():
                    t = time.perf_counter()
                    for _ in range(args.iters): step()
                    times[bf16].append((time.perf_counter() - t) / args.iters * 1000)
            fp32, bf = statistics.median(times[False]), statistics.median(times[True])
            print(f'| {arch} | {bs} × {size} | {fp32:.0f} | {bf:.0f} | {bf / fp32:.2f}× |', flush=True)

if __name__ == '__main__': main()
